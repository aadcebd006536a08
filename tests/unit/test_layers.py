"""The layers hold: pipeline/ imports no ray, grpc, redis or pydantic (it runs on GPU machines
that have only torch, transformers and diffusers)."""

import subprocess
import sys

from helpers import REPO_ROOT

CHECK = """
import builtins
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("ray", "grpc", "grpc_health", "redis", "pydantic"):
        raise ImportError("pipeline/ must not import " + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
import pkgutil, importlib, sdserve.pipeline
for module in pkgutil.iter_modules(sdserve.pipeline.__path__):
    importlib.import_module("sdserve.pipeline." + module.name)
print("ok")
"""


def test_pipeline_imports_no_serving_dependencies():
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")
