"""The house rules a static import check cannot state.

The layers themselves (imports flow one way, no cycles, no Ray outside serve/, no protobuf in
the request path or the stages, a pure-torch pipeline/) are import-linter contracts in
.importlinter, checked by `make test` and `make lint` (`lint-imports`).
"""

import ast

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "services" / "sdserve"

TOP_LEVEL_MODULES = {"__init__.py", "constants.py", "errors.py", "metrics.py", "stats.py"}
"""The package's loose modules: what every layer shares. Everything else lives in a room."""


def test_the_top_level_holds_only_what_every_layer_shares():
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose <= TOP_LEVEL_MODULES, (
        f"modules outside a room: {sorted(loose - TOP_LEVEL_MODULES)}"
    )


def test_every_private_ray_api_is_in_one_module():
    """`ray._private`, `ray.experimental`, Serve's private context calls and handle options
    appear only in sdserve/serve/_ray.py."""
    markers = ("_private", "experimental", "serve.context._", "_by_reference", "internal_kv")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "v1" in path.parts or path.name == "_ray.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "ray" in code and any(m in code for m in markers):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_long_functions_or_files():
    """No function over 80 lines and no file over 400 in services/sdserve (generated v1/
    aside): a newcomer reads each unit in one sitting."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        if "v1" in path.parts:
            continue
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long.append(f"{path.relative_to(REPO_ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}: {lines}")
    assert not long, "\n".join(long)
