"""The Denoiser's ControlNets: the model's ControlNet folder, and the nets loaded from it, least
recently used out first (each loaded on first use, on the Denoiser's torch thread, and checked
against its U-Net: a net of another model family is the request's INVALID_ARGUMENT)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.constants import resolve_model_dir
from sdserve.errors import FailedPrecondition, InvalidArgument
from sdserve.pipeline.control_images import from_pixels
from sdserve.pipeline.controlnet import (
    Control,
    check_fits,
    controlnet_dir,
    controlnet_folders,
    load_controlnet,
    prepare_image,
)
from sdserve.pipeline.held_cache import HeldCache, hold_while_alive
from sdserve.stages.messages import ControlInput, ControlNetFile

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from sdserve.pipeline.denoise import Denoiser

logger = logging.getLogger(__name__)


class ControlNets:
    """Resolves a request's `ControlInput`s to `Control`s, their nets loaded and checked.
    `resolve` runs on the torch thread; `listing` anywhere."""

    def __init__(self, folder: Path, max_bytes: int, load: Callable[[Path], ControlNetModel],
                 unet) -> None:  # fmt: skip
        self.folder = folder
        self.cache = NetCache(max_bytes)
        self.unet = unet
        self._load = load
        self._misfits: dict[tuple[str, str, int], str] = {}

    @classmethod
    def for_model(cls, config: SdserveConfig, model: ModelConfig,
                  denoiser: Denoiser) -> ControlNets:  # fmt: skip
        folder = controlnet_dir(resolve_model_dir(model.path), model.controlnet_dir)

        def load(path: Path) -> ControlNetModel:
            return load_controlnet(path, denoiser.device, denoiser.dtype,
                                   allow_pickle=model.allow_pickle)  # fmt: skip

        return cls(folder, config.engine.controlnet_cache_mb * 2**20, load, denoiser.unet)

    @classmethod
    def none(cls, unet) -> ControlNets:
        """No ControlNets (a folder that does not exist)."""
        return cls(Path("/nonexistent/controlnets"), 1, load_controlnet, unet)

    def resolve(self, controls: Iterable[ControlInput], width: int,
                height: int) -> tuple[Control, ...]:  # fmt: skip
        """The request's controls, their nets loaded (its job holds them: `Denoiser.make_job`).
        Raises InvalidArgument for a name with no folder or a net of another model family,
        FailedPrecondition for a folder that does not load as a ControlNet."""
        if not controls:
            return ()
        folders = controlnet_folders(self.folder)
        resolving = _Holder()  # holds each net until the caller holds them all
        out = []
        for i, c in enumerate(controls):
            path = folders.get(c.name)
            if path is None:
                raise InvalidArgument(f"controls[{i}].name", f"no ControlNet {c.name!r} in "
                                      f"{self.folder}")  # fmt: skip
            try:
                net = self.cache.get(c.name, lambda p=path, n=c.name, k=i: self._read(p, n, k))
            except ValueError as exc:  # alone over engine.controlnet_cache_mb
                raise FailedPrecondition(str(exc)) from None
            hold_while_alive(resolving, [net])
            image = prepare_image(from_pixels(c.pixels, width, height), width, height)
            out.append(Control(net, image, c.scale, c.start, c.end, c.guess_mode))
        return tuple(out)

    def _read(self, path: Path, name: str, index: int) -> ControlNetModel:
        started = time.perf_counter()
        try:
            net = self._load(path)
        except (ValueError, OSError) as exc:
            raise FailedPrecondition(f"ControlNet {name!r}: {exc}") from exc
        try:
            check_fits(net, self.unet, name)
        except ValueError as exc:
            raise InvalidArgument(f"controls[{index}].name", str(exc)) from None
        logger.info("loaded ControlNet %s from %s (%.1f MB) in %.2fs", name, path,
                    nbytes(net) / 2**20, time.perf_counter() - started)  # fmt: skip
        return net

    def listing(self) -> tuple[ControlNetFile, ...]:
        """Every ControlNet folder, whether it is loaded, and whether it fits the U-Net."""
        loaded = set(self.cache.names())
        return tuple(ControlNetFile(name, _folder_bytes(path), name in loaded,
                                    self.misfit(name, path))
                     for name, path in controlnet_folders(self.folder).items())  # fmt: skip

    def misfit(self, name: str, path: Path) -> str:
        """Why the net in `path` cannot condition the U-Net, read from its config ("": it can);
        read again only when the config changes (health probes list the nets every second)."""
        config_file = path / "config.json"
        try:
            key = (name, str(path), config_file.stat().st_mtime_ns)
        except OSError as exc:
            return str(exc)
        if key not in self._misfits:
            try:
                config = json.loads(config_file.read_text())
                check_fits(SimpleNamespace(config=config), self.unet, name)
                self._misfits[key] = ""
            except (ValueError, OSError) as exc:
                self._misfits[key] = str(exc)
        return self._misfits[key]


class NetCache(HeldCache["ControlNetModel"]):
    """Loaded nets by name, least recently used first out, within `max_bytes`; a net a live
    request holds (`held_cache.hold_while_alive`) is never evicted."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, nbytes, "ControlNet")


def nbytes(net) -> int:
    """The bytes of a module's parameters and buffers."""
    tensors = [*net.parameters(), *net.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _Holder:
    """Owns a request's nets while `ControlNets.resolve` loads them."""
