"""The requests of a load: a `Mix` of request options that cycle independently."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdserve.v1 import diffusion_pb2


@dataclass(frozen=True)
class Mix:
    """The request options; each list cycles independently."""

    prompts: tuple[str, ...] = ("a red circle on a blue background",)
    steps: tuple[int | None, ...] = (None,)
    schedulers: tuple[str, ...] = ("",)
    widths: tuple[int | None, ...] = (None,)
    heights: tuple[int | None, ...] = (None,)
    guidances: tuple[float | None, ...] = (None,)
    init_image: bytes = field(default=b"", repr=False)
    """Image-to-image (inpainting with `mask_image`) for every `image_every`-th request."""
    mask_image: bytes = field(default=b"", repr=False)
    strengths: tuple[float | None, ...] = (None,)
    image_every: int = 1
    guidance_stops: tuple[float | None, ...] = (None,)
    cache_intervals: tuple[int | None, ...] = (None,)
    max_sequence_lengths: tuple[int | None, ...] = (None,)
    """Diffusion transformers (sd3, flux) only, as `true_cfg_scales` (flux) and `shifts`."""
    true_cfg_scales: tuple[float | None, ...] = (None,)
    shifts: tuple[float | None, ...] = (None,)
    models: tuple[str, ...] = ("",)
    """Served model names ("": the server's default)."""
    loras: tuple[tuple[tuple[str, float], ...], ...] = ((),)
    """LoRA adapter sets, one per request in turn: ((name, scale), ...) each; () for none."""
    controls: tuple[diffusion_pb2.Control, ...] = field(default=(), repr=False)
    """ControlNets of every `control_every`-th request (their images at each one's size)."""
    control_every: int = 1

    def request(self, i: int) -> diffusion_pb2.GenerateRequest:
        def pick(options):
            return options[i % len(options)]

        request = self._text_request(i, pick)
        if self.init_image and i % self.image_every == 0:
            request.init_image, request.mask_image = self.init_image, self.mask_image
            request.ClearField("width")  # the image's size
            request.ClearField("height")
            strength = self.strengths[(i // self.image_every) % len(self.strengths)]
            if strength is not None:
                request.strength = strength
        return request

    def _text_request(self, i: int, pick) -> diffusion_pb2.GenerateRequest:
        request = diffusion_pb2.GenerateRequest(
            prompt=pick(self.prompts), scheduler=pick(self.schedulers), seed=i,
            model=pick(self.models),
        )  # fmt: skip
        for name, scale in pick(self.loras):
            request.loras.add(name=name, scale=scale)
        if self.controls and i % self.control_every == 0:
            request.controls.extend(self.controls)
        optional = {
            "steps": self.steps,
            "width": self.widths,
            "height": self.heights,
            "guidance_scale": self.guidances,
            "guidance_stop": self.guidance_stops,
            "cache_interval": self.cache_intervals,
            "max_sequence_length": self.max_sequence_lengths,
            "true_cfg_scale": self.true_cfg_scales,
            "shift": self.shifts,
        }
        for name, options in optional.items():
            value = pick(options)
            if value is not None:
                setattr(request, name, value)
        return request
