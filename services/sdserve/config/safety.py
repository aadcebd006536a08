"""The check that a model's safety checker is where its config says (`ModelConfig.safety`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from sdserve.constants import CHECKER_DIR, FEATURE_EXTRACTOR_DIR, safety_folders


def _yaml_off(value: Any) -> Any:
    return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


SafetyMode = Annotated[Literal["off", "flag", "block"], BeforeValidator(_yaml_off)]
"""`ModelConfig.safety`: off, flag or block."""


def check_safety_folders(model_dir: Path, configured: str | None, model: str) -> None:
    """Raises ValueError naming the field when the model folder is readable here and the
    checker's files are not in it (or in the configured folder). A folder this machine cannot
    read is left to the replica that loads it (a cluster's driver may not see it)."""
    if not model_dir.is_dir():
        return
    checker, extractor = safety_folders(model_dir, configured)
    field = "safety_checker_dir" if configured else "safety"
    missing = [str(path) for path in (checker / "config.json",
                                      extractor / "preprocessor_config.json")
               if not path.is_file()]  # fmt: skip
    if missing:
        raise ValueError(
            f"model {model!r}: {field}: a safety checker needs {' and '.join(missing)} "
            f"(a model folder's {CHECKER_DIR}/ and {FEATURE_EXTRACTOR_DIR}/, or set "
            "safety_checker_dir)"
        )
