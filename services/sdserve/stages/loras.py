"""A stage's LoRA adapters: the model's adapter folder, and the adapters loaded from it, least
recently used out first (the TextEncoder loads an adapter's text-encoder weights, the Denoiser
its U-Net weights, each on first use, on its torch thread)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.constants import resolve_model_dir
from sdserve.errors import FailedPrecondition, InvalidArgument
from sdserve.pipeline.lora import LoraAdapter, LoraCache, hold_while_alive
from sdserve.pipeline.lora_files import lora_dir, lora_files
from sdserve.stages.messages import LoraFile, LoraScales

logger = logging.getLogger(__name__)

Applied = tuple[tuple[LoraAdapter, float], ...]
"""A request's adapters, loaded, with their scales (what the pipeline takes as `loras`)."""


class Adapters:
    """Resolves a request's (name, scale) pairs to loaded adapters. Call on the torch thread."""

    def __init__(self, folder: Path, max_bytes: int, load: Callable[[Path, str], LoraAdapter]):
        self.folder = folder
        self.cache = LoraCache(max_bytes)
        self._load = load

    @classmethod
    def for_model(cls, config: SdserveConfig, model: ModelConfig,
                  load: Callable[[Path, str], LoraAdapter]) -> Adapters:  # fmt: skip
        folder = lora_dir(resolve_model_dir(model.path), model.lora_dir)
        return cls(folder, config.engine.lora_cache_mb * 2**20, load)

    def files(self) -> dict[str, Path]:
        return lora_files(self.folder)

    def resolve(self, loras: LoraScales) -> Applied:
        """The adapters of a stage message's `loras`, loaded. Raises InvalidArgument for a name
        with no file, FailedPrecondition for a file that is not a LoRA of this model."""
        if not loras:
            return ()
        files = self.files()
        out = []
        resolving = _Resolving()  # holds each adapter until the caller holds them all
        for i, (name, scale) in enumerate(loras):
            path = files.get(name)
            if path is None:
                raise InvalidArgument(f"loras[{i}].name", f"no adapter {name!r} in "
                                      f"{self.folder}")  # fmt: skip
            adapter = self.cache.get(name, lambda p=path, n=name: self._read(p, n))
            # loading the next adapter of this request must not evict this one
            hold_while_alive(resolving, [(adapter, scale)])
            out.append((adapter, scale))
        return tuple(out)

    def _read(self, path: Path, name: str) -> LoraAdapter:
        started = time.perf_counter()
        try:
            adapter = self._load(path, name)
        except (ValueError, OSError) as exc:
            raise FailedPrecondition(f"adapter {name!r}: {exc}") from exc
        logger.info("loaded LoRA adapter %s from %s (%.1f MB) in %.2fs", name, path,
                    adapter.nbytes / 2**20, time.perf_counter() - started)  # fmt: skip
        return adapter

    def listing(self) -> tuple[LoraFile, ...]:
        """Every adapter file, and whether it is loaded."""
        loaded = set(self.cache.names())
        return tuple(LoraFile(name=name, file_bytes=path.stat().st_size, loaded=name in loaded)
                     for name, path in self.files().items())  # fmt: skip


class _Resolving:
    """Owns a request's adapters while `Adapters.resolve` loads them (`hold_while_alive`)."""
