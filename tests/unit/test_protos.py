"""The committed generated code is what protos/generate.py makes from the .proto files."""

import importlib.util

from helpers import REPO_ROOT


def _generator():
    spec = importlib.util.spec_from_file_location("generate", REPO_ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path):
    generated = _generator().generate(tmp_path)
    committed_dir = REPO_ROOT / "services" / "sdserve" / "v1"
    committed = sorted(p.name for p in committed_dir.iterdir() if p.is_file())
    assert sorted(p.name for p in generated) == committed, "run `make protos`"
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (committed_dir / rel.name).read_bytes(), (
            f"{rel} is stale: run `make protos` and commit the result"
        )


def test_every_rpc_and_field_is_commented():
    for proto in (REPO_ROOT / "protos" / "sdserve" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("syntax", "package", "option", "//"))
            )
            if stripped.startswith(("rpc ", "message ", "service ")) or is_field:
                assert lines[i - 1].strip().startswith("//"), (
                    f"{proto.name}:{i + 1} lacks a comment"
                )
