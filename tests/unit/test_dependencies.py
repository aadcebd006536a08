"""pyproject.toml's dependencies match the imports (deptry), and the load tester's optional
packages (the `loadtest` extra) are asked for by name when they are missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from sdserve.cli import main
from sdserve.cli.loadtest import EXTRA_MODULES


def _deptry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deptry", "--no-ansi", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_package_imports_what_it_declares_and_declares_what_it_imports():
    """Nothing imported and undeclared (or declared only for development, or only pulled in by
    another package); nothing declared and unused but the two pyproject.toml explains."""
    done = _deptry("services")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_tests_and_benchmarks_import_only_declared_packages():
    """They may use the dev packages (that is what those are for), but nothing undeclared."""
    done = _deptry("tests", "bench", "--ignore", "DEP002,DEP004", "--exclude", r"\.venv")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_loadtest_extra_holds_what_the_cli_asks_for():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extra = {r.split(">")[0].split("=")[0] for r in project["optional-dependencies"]["loadtest"]}
    assert set(EXTRA_MODULES.values()) <= extra
    declared = {r.split(">")[0].split("=")[0].split("[")[0] for r in project["dependencies"]}
    assert not extra & declared  # a server's install leaves them out


@pytest.mark.parametrize(("option", "value"), [("--plot", "out.png"), ("--http", "http://x")])
def test_a_missing_loadtest_package_is_named_with_its_extra_before_any_load(
    monkeypatch, tmp_path, option, value
):
    module = EXTRA_MODULES[option.removeprefix("--")]
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed

    def no_load(*args, **kwargs):
        raise AssertionError("the load started")

    monkeypatch.setattr("sdserve.loadtest.run_loadtest", no_load)
    with pytest.raises(SystemExit) as exited:
        main(["loadtest", option, value, "--requests", "1"])
    message = str(exited.value.code)
    assert f"{option} needs {module}" in message
    assert "pip install 'sdserve[loadtest]'" in message
