"""Step batching of diffusion transformers (FLUX, SD3) against diffusers' pipeline serving one
request at a time, side by side.

    .venv/bin/python bench/bench_dit.py [--arch tiny-flux|tiny-sd3] [--rounds 5]
                                        [--requests 96] [--diffusers-requests 32]
                                        [--max-sequence-length N] [--quick] [--out FILE.json]
    python bench/bench_dit.py --arch flux-dev|sd3.5-medium --device cuda     # a GPU, no Ray

A closed loop of 16 clients sends the same requests to both sides. Request i has seed i and
cycles its prompt, its step count (4, 6, 8, 10, 12) and its guidance independently (FLUX: the
embedded guidance 2.5, 3.5, 5; SD3: classifier-free guidance 1 (no negative row), 4.5, 7), at
64x64, T5 padded to the pipeline's default `max_sequence_length` (FLUX 512, SD3 256):

  sdserve    the prompt's CLIP and T5 embeddings (the TextEncoder stage's service over
             `ClipEncoders`: the encodes waiting for the torch thread run as one batch), the
             step-batching engine (`DenoiseEngine` over `TransformerDenoiser`: one transformer
             forward per step over every running request, each at its own sigma) and the VAE
             decoder (the decodes waiting run as one batch, as the VaeDecoder stage runs them),
             in-process on one torch thread, without Ray (serving's hops between stages are
             not what is measured, and its stages would run on cores of their own);
  diffusers  `FluxPipeline` / `StableDiffusion3Pipeline.from_pretrained(folder)`, one request
             at a time: the clients queue for it.

Each side is set up as a user who tunes it would: the faster of float32 and bfloat16, on every
core or on one thread (four short runs, interleaved, the first pass a warm-up). Then the sides
alternate for `--rounds`; the script prints images/s (median of the rounds), p50 and p95
latency and the ratio sdserve / diffusers, and checks that both make the same images (the
first requests' pixels from the timed runs, and with both in float32: max abs difference in
1/255), so that the speedup is for the same work. To say where sdserve's time goes it also
profiles its torch thread (transformer forwards; the rest of each step, per row: the per-row
scheduler steps and the batch's assembly; text encoding; decoding) and times one step at 1 and
at 16 images (per image: the most step batching can gain on this machine).

Models: `tiny-flux` and `tiny-sd3` (`make_tiny_model`, written to a temporary folder) on the
CPU. With `--device cuda`: `flux-dev` and `sd3.5-medium`, random weights at full size
(`testing.dit_models.dit_parts`, bfloat16, 1024x1024, 20/24/28 steps), built in memory and
shared by both sides: the same engine code against the diffusers pipeline of the same parts at
batch 1. That path imports pipeline-level modules only: no Ray, Redis or gRPC (the GPU machine
has none). `--quick` (seconds; the smoke test runs it) builds the tiny model in memory the same
way.

What bounds the gain on a CPU: at FLUX's default 512 T5 tokens on a 64x64 image (16 image
tokens), tiny FLUX's forward is 148 MFLOP per row, three quarters of it attention over 528
tokens, so a step is compute-bound: 16 rows cost about 2.0-2.2x less per row than one, and
that is the most step batching can give. FLUX.1-dev at 1024x1024 has 8 image tokens per text
token; `--size 256 --max-sequence-length 32` keeps that ratio on the tiny model (256 image
tokens, 32 text), where a step over 16 rows costs 3.6x less per row than one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sdserve.constants import DEFAULT_MAX_SEQUENCE_LENGTH
from sdserve.pipeline.dit_denoise import TransformerDenoiser
from sdserve.pipeline.dit_text import T5_PART, ClipEncoders, T5Encoder
from sdserve.pipeline.engine import Cancelled, DenoiseEngine, Failed, Finished
from sdserve.pipeline.models import model_family
from sdserve.pipeline.precision import dtype_name
from sdserve.pipeline.threads import available_cores, set_threads
from sdserve.pipeline.vae import VaeDecoder
from sdserve.stages.batching import CallBatcher
from sdserve.stages.messages import EncodeText, TextEmbeddings
from sdserve.stages.runtime import TorchThread
from sdserve.stages.text_encoder import TextEncoderService
from sdserve.stats import StepStats
from sdserve.testing.dit_models import DIT_ARCHS, FLUX_PIPELINE, dit_parts, dit_pipeline

PROMPTS = (
    "a red circle on a blue background",
    "a green square on a white background",
    "a photo of an astronaut riding a horse",
    "a watercolor of a lighthouse at dusk",
)


@dataclass(frozen=True)
class Preset:
    """One model's load: image side, the step counts and guidance scales requests cycle."""

    size: int
    steps: tuple[int, ...]
    guidances: tuple[float, ...]
    device: str


FLUX_GUIDANCES, SD3_GUIDANCES = (2.5, 3.5, 5.0), (1.0, 4.5, 7.0)
PRESETS = {
    "tiny-flux": Preset(64, (4, 6, 8, 10, 12), FLUX_GUIDANCES, "cpu"),
    "tiny-sd3": Preset(64, (4, 6, 8, 10, 12), SD3_GUIDANCES, "cpu"),
    "flux-dev": Preset(1024, (20, 24, 28), FLUX_GUIDANCES, "cuda"),
    "sd3.5-medium": Preset(1024, (20, 24, 28), SD3_GUIDANCES, "cuda"),
}
QUICK = Preset(64, (2, 3), FLUX_GUIDANCES, "cpu")
"""--quick: the tiny model, 2 or 3 steps."""
CHECKED = 4
"""The first requests whose images are compared between the two sides."""


@dataclass(frozen=True)
class Request:
    seed: int
    prompt: str
    steps: int
    guidance: float


def make_request(preset: Preset, i: int) -> Request:
    """Request i: seed i, each option cycling on its own."""

    def pick(options):
        return options[i % len(options)]

    return Request(i, pick(PROMPTS), pick(preset.steps), pick(preset.guidances))


@dataclass
class Profile:
    """Where sdserve's torch thread spent a run (seconds), from the engine's step stats and a
    timer around the transformer's forward."""

    steps: int = 0
    rows: int = 0
    step_s: float = 0.0
    forward_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0

    def per_image(self, images: int) -> dict:
        rows = max(self.rows, 1)
        return {"rows_per_forward": self.rows / max(self.steps, 1),
                "forward_ms_per_image": 1e3 * self.forward_s / images,
                "step_rest_ms_per_row": 1e3 * (self.step_s - self.forward_s) / rows,
                "encode_ms_per_image": 1e3 * self.encode_s / images,
                "decode_ms_per_image": 1e3 * self.decode_s / images}  # fmt: skip


class Sdserve:
    """sdserve's text encoders, step engine and VAE decoder on `torch_thread`: `send` serves one
    request and returns its pixels."""

    def __init__(self, text: ClipEncoders, denoiser: TransformerDenoiser, vae: VaeDecoder,
                 torch_thread: ThreadPoolExecutor, size: int,
                 max_sequence_length: int):  # fmt: skip
        self.text, self.denoiser, self.vae = text, denoiser, vae
        self.torch, self.size, self.length = torch_thread, size, max_sequence_length
        self.dtype = dtype_name(denoiser.dtype)
        self.profile = Profile()
        self.timing = False
        """Whether the transformer's forwards are timed: only while this side runs (diffusers'
        pipeline of the same parts runs them too)."""
        self._forward_started = 0.0
        transformer = denoiser.transformer
        transformer.register_forward_pre_hook(self._before_forward)
        transformer.register_forward_hook(self._after_forward)
        self.engine = DenoiseEngine(transformer, step=denoiser.step, max_batch_size=16,
                                    on_stats=self._on_stats)  # fmt: skip
        self.engine.start(torch_thread)
        self.text_stage = TextEncoderService(text, TorchThread("bench", torch_thread))
        """The TextEncoder stage's service over `text`: it batches the encodes waiting."""
        self.text_stage.max_batch = 16
        self.decoder = CallBatcher(
            self.text_stage.torch.submit,
            self._decode_many,
            key=lambda latents: tuple(latents.shape),
            max_batch=16,
        )
        for name in ("encode_many", "encode_t5_many"):  # time the encodes (the profile)
            setattr(text, name, self._timed(getattr(text, name)))

    def _timed(self, encode: Callable) -> Callable:
        def timed(*args):
            started = time.perf_counter()
            try:
                return encode(*args)
            finally:
                self.profile.encode_s += time.perf_counter() - started

        return timed

    def _sync(self) -> None:
        if self.denoiser.device.type == "cuda":
            torch.cuda.synchronize()

    def _before_forward(self, *_) -> None:
        if self.timing:
            self._sync()
            self._forward_started = time.perf_counter()

    def _after_forward(self, *_) -> None:
        if self.timing:
            self._sync()
            self.profile.forward_s += time.perf_counter() - self._forward_started

    def _on_stats(self, stats: StepStats) -> None:
        self.profile.steps += 1
        self.profile.rows += stats.rows
        self.profile.step_s += stats.duration_s

    def guided(self, request: Request) -> bool:
        """Whether the request has a negative prompt's row (SD3's CFG; FLUX embeds guidance)."""
        return self.denoiser.family == "sd3" and request.guidance > 1

    def _encode_text(self, request: Request) -> EncodeText:
        return EncodeText(str(request.seed), request.prompt, "", self.guided(request),
                          max_sequence_length=self.length)  # fmt: skip

    def job(self, request: Request, clip, t5, on_event: Callable = lambda event: None):
        """The request's job from its CLIP and T5 embeddings (`TextEmbeddings`)."""
        return self.denoiser.make_job(
            str(request.seed), clip.cond, clip.uncond, width=self.size, height=self.size,
            steps=request.steps, guidance_scale=request.guidance, seeds=[request.seed],
            pooled=clip.cond_pooled, uncond_pooled=clip.uncond_pooled, t5_cond=t5.cond,
            t5_uncond=t5.uncond, on_event=on_event,
        )  # fmt: skip

    def _decode_many(self, latents: list[torch.Tensor]) -> list[np.ndarray]:
        """Torch thread: the latents waiting, decoded in one batch, as the VaeDecoder stage
        decodes them (`VaeDecoderService`; no PNG encoding on either side here)."""
        started = time.perf_counter()
        pixels = self.vae.decode(torch.cat(latents))
        self.profile.decode_s += time.perf_counter() - started
        return list(pixels)

    async def send(self, request: Request) -> np.ndarray:
        """Encodes the request (its CLIP and T5 encodes batched with the other requests waiting
        for the torch thread, as the TextEncoder stage serves them), submits it to the engine,
        awaits its last event, decodes its latents."""
        last: Future = Future()  # set on the torch thread

        def on_event(event) -> None:
            if isinstance(event, Finished | Failed | Cancelled):
                last.set_result(event)

        encode = self._encode_text(request)
        clip, t5 = await asyncio.gather(self.text_stage.encode(encode),
                                        self.text_stage.encode_t5(encode))  # fmt: skip
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self.torch, self.job, request, clip, t5, on_event)
        self.engine.submit(job)
        if not isinstance(event := await asyncio.wrap_future(last), Finished):
            raise RuntimeError(f"sdserve request {request.seed} ended with {event}")
        return await self.decoder(event.latents)

    def _encode_now(self, request: Request) -> tuple:
        """(CLIP, T5) embeddings of one request, on the calling (torch) thread."""
        e = self._encode_text(request)
        clip = self.text.encode(e.prompt, e.negative_prompt, e.with_uncond)
        t5 = self.text.encode_t5(e.prompt, e.negative_prompt, e.with_uncond, self.length)
        return (TextEmbeddings(clip.cond, clip.uncond, clip.pooled, clip.uncond_pooled),
                TextEmbeddings(t5.cond, t5.uncond))  # fmt: skip

    def step_ms(self, requests: list[Request], repeats: int = 3) -> dict:
        """One step over the first 1 and over all of `requests`' images (on the torch thread,
        the engine idle): milliseconds per batch row (an image and, guided, its negative
        prompt's row) of the whole step and of its forward, by images; and `ceiling`, the
        first's ms per row over the second's: the most step batching saves on this machine."""
        jobs = [
            self.job(dataclasses.replace(r, steps=1000), *self._encode_now(r)) for r in requests
        ]  # none ends; fmt: skip
        for job in jobs:
            job.admit()
        samples = [s for job in jobs for s in job.samples]
        out, self.timing = {}, True
        for n in dict.fromkeys((1, len(samples))):
            best = (float("inf"), 0.0)
            for _ in range(repeats + 1):  # the first warms up
                forward_before, started = self.profile.forward_s, time.perf_counter()
                self.denoiser.step(samples[:n])
                self._sync()
                took = time.perf_counter() - started
                best = min(best, (took, self.profile.forward_s - forward_before))
            rows = n + sum(s.guided_now for s in samples[:n])
            out[n] = {"rows": rows, "step_ms_per_row": 1e3 * best[0] / rows,
                      "forward_ms_per_row": 1e3 * best[1] / rows}  # fmt: skip
        self.timing = False
        first, last = out.values()
        return {"by_images": out, "ceiling": first["step_ms_per_row"] / last["step_ms_per_row"]}


class Diffusers:
    """diffusers' FluxPipeline or StableDiffusion3Pipeline; `call` runs one request."""

    def __init__(self, pipe, size: int, max_sequence_length: int):
        self.pipe, self.size, self.length = pipe, size, max_sequence_length
        self.dtype = dtype_name(pipe.transformer.dtype)
        pipe.set_progress_bar_config(disable=True)

    def call(self, request: Request) -> np.ndarray:
        images = self.pipe(
            request.prompt, height=self.size, width=self.size,
            num_inference_steps=request.steps, guidance_scale=request.guidance,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            max_sequence_length=self.length, output_type="np",
        ).images  # fmt: skip
        return (images[0] * 255).round().astype("uint8")  # VaeImageProcessor.numpy_to_pil's


def from_folder(folder: Path, dtype: torch.dtype, thread, size: int, length: int):
    """Both sides on the model folder, as their users load it: (Sdserve, Diffusers)."""
    import diffusers

    name = dtype_name(dtype)
    ours = Sdserve(ClipEncoders(folder, "cpu", name), TransformerDenoiser(folder, "cpu", name),
                   VaeDecoder(folder, "cpu", name), thread, size, length)  # fmt: skip
    pipeline_cls = diffusers.FluxPipeline if model_family(folder) == "flux" else (
        diffusers.StableDiffusion3Pipeline)  # fmt: skip
    pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return ours, Diffusers(pipe, size, length)


def from_parts(arch: str, device: str, dtype: torch.dtype, thread, size: int, length: int):
    """Both sides on one set of random parts built in memory (`dit_parts`), shared: at full size
    one copy is what a GPU holds. (Sdserve, Diffusers)."""
    spec = DIT_ARCHS[arch]
    family = "flux" if spec.pipeline == FLUX_PIPELINE else "sd3"
    parts = dit_parts(arch, 0, device, dtype)
    denoiser = TransformerDenoiser.from_parts(parts["transformer"], spec.scheduler,
                                              dict(parts["vae"].config), family)  # fmt: skip
    ours = Sdserve(clip_encoders_from_parts(parts, family), denoiser,
                   VaeDecoder.from_parts(parts["vae"]), thread, size, length)  # fmt: skip
    return ours, Diffusers(dit_pipeline(arch, parts), size, length)


def clip_encoders_from_parts(parts: dict, family: str) -> ClipEncoders:
    """A `ClipEncoders` (its T5 included) over loaded parts (a full-size model is never written
    as a folder)."""
    t5_part = T5_PART[family]
    t5 = T5Encoder.from_parts(parts[t5_part.replace("text_encoder", "tokenizer")],
                              parts[t5_part], family)  # fmt: skip
    suffixes = ("", "_2") if family == "sd3" else ("",)
    clips = [(parts[f"tokenizer{s}"], parts[f"text_encoder{s}"]) for s in suffixes]
    return ClipEncoders.from_parts(clips, family, t5)


async def closed_loop(send: Callable, preset: Preset, concurrency: int, requests: int,
                      duration_s: float) -> tuple[dict, dict[int, np.ndarray]]:  # fmt: skip
    """`concurrency` clients, each sending its next request when its last one ends, until
    `requests` are sent or `duration_s` has passed. (Images/s and latency percentiles, the
    pixels of the first CHECKED requests.)"""
    started = time.perf_counter()
    latencies: list[float] = []
    kept: dict[int, np.ndarray] = {}
    issued = 0

    async def client() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() - started < duration_s:
            i, issued = issued, issued + 1
            sent = time.perf_counter()
            pixels = await send(make_request(preset, i))
            latencies.append(time.perf_counter() - sent)
            if i < CHECKED:
                kept[i] = pixels

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ranked = sorted(latencies)

    def percentile(q: float) -> float:  # nearest rank
        return ranked[max(1, min(len(ranked), int(np.ceil(q / 100 * len(ranked))))) - 1]

    return {"images": len(ranked), "wall_s": wall, "images_per_s": len(ranked) / wall,
            "p50_s": percentile(50), "p95_s": percentile(95)}, kept  # fmt: skip


class Bench:
    """The two sides in each configuration (dtype, threads), on one torch thread."""

    def __init__(self, pairs: dict[torch.dtype, tuple[Sdserve, Diffusers]], thread, preset,
                 args, threads: tuple[int, ...]):  # fmt: skip
        self.pairs, self.thread, self.preset, self.args = pairs, thread, preset, args
        self.threads = threads
        """The torch thread counts to try (on a GPU: torch's own, untouched)."""

    def run(self, side, threads: int | None, requests: int, concurrency: int | None = None):
        """One closed loop of `side` (Sdserve, or Diffusers behind the torch thread: one
        request at a time) on `threads` torch threads."""
        if threads is not None:
            self.thread.submit(set_threads, threads).result()
        if isinstance(side, Sdserve):
            side.profile, side.timing = Profile(), True
            send = side.send
        else:

            async def send(request: Request) -> np.ndarray:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.thread, side.call, request)

        try:
            return asyncio.run(closed_loop(send, self.preset, concurrency or self.args.concurrency,
                                           requests, self.args.max_seconds))  # fmt: skip
        finally:
            if isinstance(side, Sdserve):
                side.timing = False

    def tune(self, which: int, requests: int, concurrency: int) -> tuple[tuple, dict]:
        """The fastest (dtype, threads) of side `which` (0 sdserve, 1 diffusers): images/s of a
        short run each, the configurations interleaved, the first pass a warm-up."""
        configs = [(dtype, threads) for dtype in self.pairs for threads in self.threads]
        rates: dict[str, float] = {}
        for _ in range(1 if self.args.quick or len(configs) == 1 else 2):
            for dtype, threads in configs:
                summary, _ = self.run(self.pairs[dtype][which], threads, requests, concurrency)
                rates[label(dtype, threads)] = summary["images_per_s"]
        best = max(configs, key=lambda c: rates[label(*c)])
        name = ("sdserve", "diffusers")[which]
        print(f"{name}, images/s: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
              + f"; using {label(*best)}", flush=True)  # fmt: skip
        return best, {"images_per_s": rates, "chosen": label(*best)}


def label(dtype: torch.dtype, threads: int | None) -> str:
    if threads is None:
        return dtype_name(dtype)
    return f"{dtype_name(dtype)}, {threads} thread{'s' if threads > 1 else ''}"


def max_diff(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> int:
    """The largest pixel difference (in 1/255) over the requests both have."""
    both = a.keys() & b.keys()
    assert both, (sorted(a), sorted(b))
    return max(int(np.abs(a[i].astype(int) - b[i].astype(int)).max()) for i in both)


def measure(bench: Bench, args) -> dict:
    """Tuning, interleaved rounds, the image check, the profile and the step's ceiling."""
    short = args.quick or len(bench.pairs) * len(bench.threads) == 1  # or only a warm-up
    ours_cfg, our_tuning = bench.tune(0, 4 if short else 16, 4 if short else 16)
    theirs_cfg, their_tuning = bench.tune(1, 1 if short else 4, 1)
    ours, theirs = bench.pairs[ours_cfg[0]][0], bench.pairs[theirs_cfg[0]][1]
    runs: dict[str, list[dict]] = {"sdserve": [], "diffusers": []}
    images: dict[str, dict[int, np.ndarray]] = {}
    for r in range(args.rounds):
        for name, side, threads, requests in (
            ("sdserve", ours, ours_cfg[1], args.requests),
            ("diffusers", theirs, theirs_cfg[1], args.diffusers_requests),
        ):
            summary, images[name] = bench.run(side, threads, requests)
            if isinstance(side, Sdserve):
                summary["profile"] = side.profile.per_image(summary["images"])
            runs[name].append(summary)
            print(f"  round {r + 1} {name:<9} {summary['images_per_s']:7.2f} img/s, p50 "
                  f"{summary['p50_s']:.3f}s, p95 {summary['p95_s']:.3f}s", flush=True)  # fmt: skip
    check = {"timed": max_diff(images["sdserve"], images["diffusers"]),
             "dtypes": [ours.dtype, theirs.dtype]}  # fmt: skip
    if torch.float32 in bench.pairs and (ours.dtype, theirs.dtype) != ("float32", "float32"):
        ours32, theirs32 = bench.pairs[torch.float32]
        ours_images = bench.run(ours32, ours_cfg[1], CHECKED, CHECKED)[1]  # batched together
        check["float32"] = max_diff(ours_images, bench.run(theirs32, theirs_cfg[1], CHECKED)[1])
    elif ours.dtype == theirs.dtype == "float32":
        check["float32"] = check["timed"]
    if ours_cfg[1] is not None:
        bench.thread.submit(set_threads, ours_cfg[1]).result()
    requests = [make_request(bench.preset, i) for i in range(4 if args.quick else 16)]
    step = bench.thread.submit(ours.step_ms, requests).result()
    return {"sdserve": {"tuning": our_tuning, "dtype": ours.dtype, "threads": ours_cfg[1]},
            "diffusers": {"tuning": their_tuning, "dtype": theirs.dtype,
                          "threads": theirs_cfg[1]},
            "runs": runs, "max_abs_diff_255": check, "step": step}  # fmt: skip


def summarize(result: dict, args) -> dict:
    """Prints the table (medians over rounds) and the ratio; returns the table."""
    table = {}
    for name, runs in result["runs"].items():
        row = {k: statistics.median(r[k] for r in runs)
               for k in ("images_per_s", "p50_s", "p95_s")}  # fmt: skip
        if "profile" in runs[0]:
            row["profile"] = {k: statistics.median(r["profile"][k] for r in runs)
                              for k in runs[0]["profile"]}  # fmt: skip
        table[name] = row
    ratio = table["sdserve"]["images_per_s"] / table["diffusers"]["images_per_s"]
    by_round = [ours["images_per_s"] / theirs["images_per_s"]
                for ours, theirs in zip(*result["runs"].values(), strict=True)]  # fmt: skip
    print(f"\n| side | dtype, threads | images/s (median of {args.rounds}) | p50 s | p95 s |")
    print("|---|---|---:|---:|---:|")
    for name, row in table.items():
        setup = label(getattr(torch, result[name]["dtype"]), result[name]["threads"])
        print(f"| {name} | {setup} | {row['images_per_s']:.2f} | {row['p50_s']:.3f} | "
              f"{row['p95_s']:.3f} |")  # fmt: skip
    check = result["max_abs_diff_255"]
    same = f"{check['timed']}/255 as timed ({' vs '.join(check['dtypes'])})"
    if "float32" in check:
        same += f", {check['float32']}/255 both in float32"
    print(f"\nsdserve / diffusers: {ratio:.2f}x (rounds: "
          f"{', '.join(f'{r:.2f}' for r in by_round)}); images of requests 0-{CHECKED - 1}: "
          f"max difference {same}")  # fmt: skip
    profile = table["sdserve"]["profile"]
    print("sdserve per image: " + ", ".join(f"{k} {v:.2f}" for k, v in profile.items()))
    steps = result["step"]
    print("one step, ms per row: " + ", ".join(
        f"{n} images ({s['rows']} rows) {s['step_ms_per_row']:.2f} (forward "
        f"{s['forward_ms_per_row']:.2f})" for n, s in steps["by_images"].items())
        + f"; step batching's ceiling {steps['ceiling']:.2f}x", flush=True)  # fmt: skip
    return {"table": table, "ratio": ratio, "ratio_by_round": by_round}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(PRESETS), default="tiny-flux",
                        help="tiny-flux, tiny-sd3: written to a temporary folder, on the CPU "
                        "(default tiny-flux); flux-dev, sd3.5-medium: full size, in memory, "
                        "on a GPU")  # fmt: skip
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="default: the preset's (cpu for tiny-*, cuda otherwise)",
    )
    parser.add_argument("--rounds", type=int, help="default 5 (1 on a GPU)")
    parser.add_argument(
        "--requests", type=int, help="sdserve's requests per round (default 96; 16 on a GPU)"
    )
    parser.add_argument("--diffusers-requests", type=int,
                        help="diffusers' requests per round, one at a time: its rate is steady "
                        "(default 32; 4 on a GPU)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float,
                        help="bound of each closed loop: no request is sent after it (default "
                        "60; 300 on a GPU)")  # fmt: skip
    parser.add_argument("--max-sequence-length", type=int, default=0,
                        help="T5 tokens (both sides); 0: the pipeline's default (FLUX 512, SD3 "
                        "256)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="seconds: tiny-flux built in memory (the GPU path's code on the "
                        "CPU), one torch thread, 4 requests of 2-3 steps, 1 round")  # fmt: skip
    parser.add_argument("--size", type=int, default=0,
                        help="image side in pixels, a multiple of 16 (0: the preset's, 64 for "
                        "tiny-*, 1024 at full size)")  # fmt: skip
    parser.add_argument("--out", help="JSON (default bench/results/dit-ARCH.json)")
    args = parser.parse_args()
    preset = PRESETS[args.arch]
    if args.size:
        preset = dataclasses.replace(preset, size=args.size)
    device = args.device or preset.device
    gpu = device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("no CUDA device: on a CPU run a tiny-* preset", file=sys.stderr)
        return 2
    if not gpu and preset.device == "cuda":
        print(f"{args.arch} is full size: run it with --device cuda", file=sys.stderr)
        return 2
    defaults = (1, 16, 4, 300.0) if gpu else (5, 96, 32, 60.0)
    if args.quick:
        args.arch, preset, defaults, args.concurrency = "tiny-flux", QUICK, (1, 4, 2, 60.0), 4
    names = ("rounds", "requests", "diffusers_requests", "max_seconds")
    for name, value in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    family = "flux" if DIT_ARCHS[args.arch].pipeline == FLUX_PIPELINE else "sd3"
    length = args.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # loading bars
    thread = ThreadPoolExecutor(max_workers=1)  # all torch work, as in a replica
    dtypes = (torch.bfloat16,) if gpu else (torch.float32, torch.bfloat16)
    cores = available_cores()
    threads = (None,) if gpu else (1,) if args.quick else tuple(dict.fromkeys((cores, 1)))
    load_before = os.getloadavg()
    print(f"{args.arch} on {device}: {preset.size}x{preset.size}, steps {preset.steps}, "
          f"guidance {preset.guidances}, T5 {length} tokens, {args.concurrency} clients",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if gpu or args.quick:
            pairs = {d: thread.submit(from_parts, args.arch, device, d, thread, preset.size,
                                      length).result() for d in dtypes}  # fmt: skip
        else:
            from sdserve.testing.tiny import make_tiny_model

            folder = make_tiny_model(Path(tmp) / args.arch, arch=args.arch)
            pairs = {d: thread.submit(from_folder, folder, d, thread, preset.size,
                                      length).result() for d in dtypes}  # fmt: skip
        try:
            result = measure(Bench(pairs, thread, preset, args, threads), args)
        finally:
            for ours, _ in pairs.values():
                ours.engine.stop()
    thread.shutdown()
    summary = summarize(result, args)
    if gpu:
        machine = torch.cuda.get_device_name()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_roofline import cpu_name

        machine = cpu_name()
    import diffusers

    setup = {"arch": args.arch, "device": machine, "cores": cores, "size": preset.size,
             "preset": asdict(preset), "max_sequence_length": length,
             "load_average_before": load_before, "load_average_after": os.getloadavg(),
             "torch": torch.__version__, "diffusers": diffusers.__version__}  # fmt: skip
    print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    out = Path(args.out or f"bench/results/dit-{args.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "setup": setup, **summary, **result}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
