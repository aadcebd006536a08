"""Images of the default model made the way the server makes them (for the evaluations).

`evaluate.py` judges diffusers' pipeline by default; with `eval-default-model --dtype` it
judges sdserve's own path instead: `TextEncoder.encode`, `Denoiser.make_job` and one
`DenoiseEngine`, which batches every request's rows into the same U-Net forwards, then
`VaeDecoder.decode`, in the dtype the server would use (`dtype: auto` and the others). The
adapter evaluation (`lora_eval.py`) uses the same path with adapters on some rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class ServedParts:
    """The TextEncoder, Denoiser and VaeDecoder of a model, as the stages load them."""

    text: object
    denoiser: object
    vae: object

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str = "auto", compile_mode: str = "off",
             max_rows: int = 64) -> ServedParts:  # fmt: skip
        """The parts in `dtype`, the U-Net compiled as `engine.compile: compile_mode` would
        (on the threads torch has now) for forwards of up to `max_rows` rows."""
        from sdserve.pipeline.compiled import resolve_mode
        from sdserve.pipeline.denoise import Denoiser
        from sdserve.pipeline.text import TextEncoder
        from sdserve.pipeline.vae import VaeDecoder

        denoiser = Denoiser(model_dir, dtype=dtype)
        mode = resolve_mode(compile_mode, denoiser.device, denoiser.forward_seconds(compile_mode))
        if mode != "off":
            buckets = None if denoiser.device.type == "cpu" else (1, 2, 4, 8, 16, 32)
            denoiser.compile(mode, buckets, max_rows=max_rows)
        return cls(TextEncoder(model_dir, dtype=dtype), denoiser,
                   VaeDecoder(model_dir, dtype=dtype))  # fmt: skip

    def __iter__(self):
        return iter((self.text, self.denoiser, self.vae))

    def generate(self, prompts: list[str], *, sampler: str, steps: int, guidance: float,
                 seed: int, batch_size: int = 32, **knobs) -> list[Image.Image]:  # fmt: skip
        """One image per prompt, image i from the noise of `seed + i` (as `evaluate.generate`);
        `knobs`: guidance_stop, cache_interval, cache_levels (`Denoiser.make_job`)."""
        rows = [(prompt, seed + i, ()) for i, prompt in enumerate(prompts)]
        images, _, _ = generate_rows(self, rows, sampler=sampler, steps=steps, guidance=guidance,
                                     batch_size=batch_size, **knobs)  # fmt: skip
        return images


def generate_rows(parts, rows: list[tuple[str, int, tuple]], *, sampler: str, steps: int,
                  guidance: float, batch_size: int, **knobs) -> tuple[list, int, int]:  # fmt: skip
    """One image per (prompt, seed, loras) or (prompt, seed, loras, controls) row, all
    submitted to one engine, in that order (`controls`: the row's `controlnet.Control`s).
    Returns (images, U-Net forwards, forwards that mixed rows with and without adapters)."""
    from sdserve.pipeline.engine import DenoiseEngine, Finished

    text, denoiser, vae = parts
    engine = DenoiseEngine(denoiser.unet, max_batch_size=batch_size, forward=denoiser.forward)
    width, height = denoiser.native_size
    latents: dict[str, object] = {}
    for i, (prompt, seed, loras, *controls) in enumerate(rows):
        emb = text.encode(prompt, "", guidance > 1, loras=loras)

        def on_event(event, key=str(i)):
            if isinstance(event, Finished):
                latents[key] = event.latents

        engine.submit(denoiser.make_job(str(i), emb.cond, emb.uncond, width=width, height=height,
                                        steps=steps, guidance_scale=guidance, scheduler=sampler,
                                        seeds=[seed], loras=loras, on_event=on_event,
                                        controls=controls[0] if controls else (),
                                        **knobs))  # fmt: skip
    forwards = mixed = 0
    while engine.counts() != (0, 0):
        stats = engine.step()
        if stats is not None:
            kinds = {bool(rows[int(r)][2]) for r in stats.request_ids}
            forwards, mixed = forwards + 1, mixed + (len(kinds) == 2)
    images = [Image.fromarray(vae.decode(latents[str(i)])[0]) for i in range(len(rows))]
    return images, forwards, mixed
