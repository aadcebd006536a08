"""The SafetyChecker stage: CheckImages -> CheckedImages, after the VaeDecoder.

It takes the VaeDecoder's PNGs as they are (the contract between the two stays PNG bytes, and
a model without a checker pays nothing), decodes their pixels, and checks every image of the
requests waiting for it in one forward (`CallBatcher`; the feature extractor brings images of
any size to the checker's). Each PNG gets a `safety` text chunk, `passed`, `flagged` or
`blocked`: a passed or flagged image keeps its bytes, the chunk spliced in before its end, so
its pixels and compression are untouched; a blocked one (`safety: block`) is re-encoded black,
its other text chunks (`parameters`) kept, as diffusers' pipeline returns a black image.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.constants import resolve_model_dir, safety_folders
from sdserve.metrics import StatsLogger
from sdserve.pipeline.safety import SafetyChecker
from sdserve.stages.batching import CallBatcher
from sdserve.stages.messages import CheckedImages, CheckImages
from sdserve.stages.runtime import OneCallStage, TorchThread
from sdserve.stats import ImagesChecked

SAFETY_TEXT = "safety"
"""The PNG text chunk that says what the checker did: `passed`, `flagged` or `blocked`."""


class SafetyCheckerService(OneCallStage):
    """Runs the model's safety checker (`safety_checker_dir`, else the model folder's
    `safety_checker/` and `feature_extractor/`) on its torch thread, in `model.safety`'s mode
    (flag or block), batched across requests unless `engine.batch_invariant`; records how
    many images passed, were flagged and were blocked (`ImagesChecked`)."""

    part_cls, stage = SafetyChecker, "safety_checker"
    mode: str = "flag"
    model_name: str = ""
    stats: StatsLogger | None = None

    @classmethod
    def from_config(cls, config: SdserveConfig, stats: StatsLogger,
                    torch_thread: TorchThread | None = None,
                    model: ModelConfig | None = None) -> SafetyCheckerService:  # fmt: skip
        service = super().from_config(config, stats, torch_thread, model)
        service.stats = stats
        return service

    @classmethod
    def part_kwargs(cls, config: SdserveConfig, model: ModelConfig) -> dict:
        checker, extractor = safety_folders(resolve_model_dir(model.path),
                                            model.safety_checker_dir)  # fmt: skip
        return {"checker_dir": checker, "feature_extractor_dir": extractor}

    def configure(self, config: SdserveConfig, model: ModelConfig) -> None:
        self.max_batch = 1 if config.engine.batch_invariant else config.engine.max_batch_size
        self.mode = "block" if model.safety == "block" else "flag"
        self.model_name = model.name

    def _check_many(self, reqs: list[CheckImages]) -> list[CheckedImages]:
        images = [_open(png) for req in reqs for png in req.pngs]
        nsfw = self.part.check([np.asarray(image.convert("RGB")) for image in images])
        out, i = [], 0
        for req in reqs:
            n = len(req.pngs)
            flags = tuple(nsfw[i : i + n])
            blocked = tuple(flag and self.mode == "block" for flag in flags)
            mine = zip(req.pngs, images[i : i + n], flags, blocked, strict=True)
            pngs = tuple(_marked(png, image, flag, block) for png, image, flag, block in mine)
            out.append(CheckedImages(pngs, flags, blocked))
            i += n
        return out

    @functools.cached_property
    def _calls(self) -> CallBatcher:
        return self.batcher(self._check_many)

    async def check(self, req: CheckImages) -> CheckedImages:
        """Each image's verdict, and the images to return."""
        checked = await self._calls(req)
        if self.stats is not None:
            flagged, blocked = sum(checked.nsfw), sum(checked.blocked)
            passed = len(checked.nsfw) - flagged
            self.stats.record(ImagesChecked(self.model_name, passed, flagged - blocked, blocked))
        return checked


def _open(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _marked(png: bytes, image: Image.Image, nsfw: bool, blocked: bool) -> bytes:
    """The image to return: black if blocked, with its `safety` text."""
    if not blocked:
        return add_text(png, SAFETY_TEXT, "flagged" if nsfw else "passed")
    info = PngInfo()
    for key, value in getattr(image, "text", {}).items():
        info.add_text(key, value)
    info.add_text(SAFETY_TEXT, "blocked")
    buf = io.BytesIO()
    Image.new("RGB", image.size).save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def add_text(png: bytes, key: str, value: str) -> bytes:
    """`png` with a tEXt chunk `key: value` (Latin-1) before its IEND chunk, the rest of its
    bytes as they are."""
    data = key.encode("latin-1") + b"\0" + value.encode("latin-1")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data))
    end = png.rfind(b"IEND") - 4
    if end < 8:
        raise ValueError("not a PNG: it has no IEND chunk")
    return png[:end] + chunk + png[end:]
