"""The layers hold. Imports flow one way:

    config, constants, errors, stats, types, metrics  <-  pipeline  <-  stages  <-  orchestration
        <-  jobs, serve  <-  cli

- pipeline/ imports no ray, grpc, redis or pydantic (it runs on GPU machines that have only
  torch, transformers and diffusers);
- only serve/ imports Ray;
- the stage services and the request path import no grpc and no redis (they run in-process);
- the job queue imports no grpc.

Each rule imports every module of the packages it covers in a fresh interpreter in which the
forbidden packages cannot be imported.
"""

import subprocess
import sys

import pytest
from helpers import REPO_ROOT

CHECK = """
import builtins, importlib, pkgutil, sys
forbidden, packages = sys.argv[1].split(","), sys.argv[2].split(",")
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in forbidden:
        raise ImportError("must not import " + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
for package in packages:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), package + "."):
        if not info.name.startswith("sdserve.serve"):
            importlib.import_module(info.name)
print("ok")
"""

EVERYTHING_BUT_SERVE = ",".join(
    f"sdserve.{name}"
    for name in ("config", "constants", "errors", "stats", "types", "metrics", "loadtest",
                 "pipeline", "stages", "orchestration", "jobs", "shapes", "testing", "cli")
)  # fmt: skip

RULES = {
    "pipeline: torch, transformers and diffusers only": (
        "ray,grpc,grpc_health,redis,pydantic",
        "sdserve.pipeline",
    ),
    "only serve/ imports Ray": ("ray", EVERYTHING_BUT_SERVE),
    "stage services and the request path: no grpc, no redis": (
        "ray,grpc,grpc_health,redis",
        "sdserve.stages,sdserve.orchestration",
    ),
    "the job queue: no grpc": ("ray,grpc,grpc_health", "sdserve.jobs"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_layer(rule):
    forbidden, packages = RULES[rule]
    run = subprocess.run([sys.executable, "-c", CHECK, forbidden, packages], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")


def test_every_private_ray_api_is_in_one_module():
    """`ray._private`, `ray.experimental`, Serve's private context calls and handle options
    appear only in sdserve/serve/_ray.py."""
    markers = ("_private", "experimental", "serve.context._", "_by_reference", "internal_kv")
    offenders = []
    for path in (REPO_ROOT / "services" / "sdserve").rglob("*.py"):
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
    import ast

    long = []
    for path in (REPO_ROOT / "services" / "sdserve").rglob("*.py"):
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
