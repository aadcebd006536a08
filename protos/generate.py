"""Regenerates the Python code for protos/sdserve/v1/*.proto into services/sdserve/v1/.

Usage: python protos/generate.py [OUT_ROOT]   (OUT_ROOT defaults to services/)

The generated code is committed. tests/unit/test_protos.py regenerates into a temporary folder
and fails when the result differs from what is committed, so run `make protos` after editing a
.proto file. grpcio-tools and mypy-protobuf are pinned in pyproject's dev extras, because their
versions are written into the output.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE_DIR = Path("sdserve") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) with the python, grpc and mypy plugins.

    Returns the generated files, relative to `out_root`.
    """
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto")
    )
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    init = out_root / PACKAGE_DIR / "__init__.py"
    init.write_text('"""Generated protobuf code for sdserve.v1 (see protos/generate.py)."""\n')
    return sorted(
        p.relative_to(out_root) for p in (out_root / PACKAGE_DIR).iterdir() if p.is_file()
    )


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "services"
    for path in generate(out):
        print(out / path)
