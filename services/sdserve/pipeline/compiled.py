"""Compiled U-Net forwards (`engine.compile`): one graph for every batch, or one per bucket.

The step batch's row count changes at every step boundary (requests join and leave, guidance
stops), and a compiled graph is specialised to what its guards say about its input shapes.
Two ways keep steady state from compiling again (`engine.compile_shapes`):

- dynamic (auto on a CPU): one graph with symbolic batch, height and width, compiled once at
  start-up. Measured on this project's 2-core CPU (the built-in model's U-Net, bf16): it runs
  every row count and latent size as fast as graphs specialised to each (12.5 ms for 2 rows,
  90.5 ms for 32), and takes one compile instead of one per bucket. Rows are padded to at
  least 2 (a batch of 1 would specialise), and sizes are told apart only where the U-Net's
  own code branches on them (duck sizing is off, so that a square graph also serves oblong
  sizes).
- buckets (auto on CUDA): rows padded up to the next of `engine.compile_buckets` (1 2 4 8 16
  32), one static graph per bucket and latent size, each compiled and warmed at start-up for
  the native size and `engine.compile_sizes`. CUDA graphs (max-autotune) need static shapes.

Padding rows are zeros. Every layer of the U-Net treats rows independently (convolutions, group
norms and attention are per sample), so they do not change a real row's result beyond the
kernels' own dependence on the batch size (`tests/unit/test_compiled.py` measures it).

Forwards with more rows than the largest bucket, or that need LoRA adapters or DeepCache's
branches, run eagerly (`sdserve.pipeline.step`).

Modes are torch.compile's: "default" (inductor: fused C++/OpenMP kernels on a CPU, Triton on
CUDA) and "max-autotune" (tunes matmul templates; CUDA graphs on CUDA). On a CPU the weights are
also frozen into the graph (`torch._inductor.config.freezing`), which lets oneDNN prepack them,
as Intel's guide to inductor on CPUs advises (measured here: 8-15% faster than unfrozen).
Freezing bypasses inductor's on-disk cache, so every start compiles anew: about 2 minutes for
the built-in model on this 2-core machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

MODES = ("off", "default", "max-autotune")
"""Values of `engine.compile` besides "auto"."""

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)

SHAPES = ("dynamic", "buckets")
"""Values of `engine.compile_shapes` besides "auto"."""

DYNAMIC = 0
"""The bucket of a dynamic graph's forwards (metrics label it "dynamic")."""

OnCompile = Callable[[int, tuple[int, ...], float, bool], None]
"""on_compile(bucket rows (DYNAMIC for a dynamic graph), latent shape (C, h, w), seconds,
during warm-up)."""


def resolve_shapes(setting: str, device: torch.device) -> str:
    """`engine.compile_shapes` on `device`: auto is dynamic on a CPU, buckets on CUDA."""
    if setting != "auto":
        if setting not in SHAPES:
            raise ValueError(f"unknown compile shapes {setting!r}")
        return setting
    return "buckets" if device.type == "cuda" else "dynamic"


BIG_FORWARD_S = 1.0
"""auto on a CPU compiles a U-Net whose forward of one guided image (2 rows) takes less."""


def resolve_mode(setting: str, device: torch.device, small_forward_s: float = 0.0) -> str:
    """`engine.compile` on `device`, for a U-Net whose forward of 2 rows takes
    `small_forward_s`. auto is "max-autotune" on CUDA (diffusers' published H100 figure for SD
    1.5: 54.5 it/s eager, 66.0 compiled with max-autotune). On a CPU it is "default" for a
    small, overhead-bound U-Net (under BIG_FORWARD_S; the built-in model's served 1.1x the
    images/s at 16 clients compiled, its lone requests 1.2x faster) and "off" for a large one:
    SD 1.5's compute-bound forward ran slower as one dynamic graph (6.9 s for 2 rows, bf16)
    than eagerly (5.9 s), and graphs per bucket, 6% faster, take minutes each to compile and
    warm on a CPU (bench/bench_roofline.py)."""
    if setting != "auto":
        if setting not in MODES:
            raise ValueError(f"unknown compile mode {setting!r}")
        return setting
    if device.type == "cuda":
        return "max-autotune"
    return "default" if small_forward_s < BIG_FORWARD_S else "off"


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompiledUNet:
    """The U-Net's plain forward, compiled, rows padded to buckets; a `step.FullForward`.

    Call it on the stage's torch thread (under `torch.inference_mode()`, as `unet_step` is)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        mode: str = "default",
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
        on_compile: OnCompile | None = None,
        max_rows: int = 32,
        backend: str = "inductor",
    ):
        """`buckets` None: one dynamic graph for every forward of 2 to `max_rows` rows (more
        run eagerly); else one static graph per bucket. `backend` "eager" traces and guards
        as "inductor" does, without generating kernels (tests of the bucketing itself)."""
        if mode not in MODES or mode == "off":
            raise ValueError(f"compile mode must be default or max-autotune, got {mode!r}")
        self.unet = unet
        self.mode = mode
        self.dynamic = buckets is None
        self.buckets = (2, max(2, max_rows)) if buckets is None else tuple(sorted(set(buckets)))
        """Static: the padded row counts. Dynamic: (2, max_rows), the range it serves."""
        self.on_compile = on_compile
        self.compiles = 0
        """Forwards that compiled a graph (warm-up included)."""
        self.warm = False
        """Whether warm-up has run (compiles after it are recompiles)."""
        import torch._dynamo
        import torch._inductor.config

        # One graph per bucket and latent size (and a spare for each): above dynamo's default
        # limit of 8, beyond which it would silently fall back to eager.
        limit = 4 * len(self.buckets) * 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, limit
        )
        if unet.device.type == "cpu":
            torch._inductor.config.freezing = True
        if self.dynamic:
            import torch.fx.experimental._config as fx_config

            fx_config.use_duck_shape = False  # equal sizes (16x16) need not stay equal
        options = {"mode": mode} if backend == "inductor" else {}
        self._compiled = torch.compile(unet, backend=backend, dynamic=self.dynamic, **options)

    def bucket_for(self, rows: int) -> int | None:
        """The rows a forward of `rows` is padded to (None: more than the largest bucket,
        eager). Dynamic: `rows`, at least 2."""
        if self.dynamic:
            return max(rows, 2) if rows <= self.buckets[-1] else None
        return next((b for b in self.buckets if b >= rows), None)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 added: dict | None) -> torch.Tensor:  # fmt: skip
        """eps of shape x.shape, for x (rows, C, h, w) in the U-Net's dtype."""
        rows = x.shape[0]
        bucket = self.bucket_for(rows)
        if bucket is None:  # larger than every bucket: eager
            return self.unet(x, timesteps, encoder_hidden_states=context,
                             added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip
        pad = bucket - rows
        if pad:
            x, timesteps, context = _pad(x, pad), _pad(timesteps, pad), _pad(context, pad)
            if added is not None:
                added = {k: _pad(v, pad) for k, v in added.items()}
        if x.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's output is copied
        before, started = _graphs(), time.perf_counter()
        eps = self._compiled(x, timesteps, encoder_hidden_states=context,
                             added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip
        if _graphs() != before:
            self._compiled_one(bucket, tuple(x.shape[1:]), time.perf_counter() - started)
        return eps[:rows]

    def _compiled_one(self, rows: int, shape: tuple[int, ...], seconds: float) -> None:
        self.compiles += 1
        if self.warm:
            logger.warning("U-Net recompiled for %d rows of %s after warm-up (%.1fs)", rows,
                           shape, seconds)  # fmt: skip
        if self.on_compile is not None:
            self.on_compile(DYNAMIC if self.dynamic else rows, shape, seconds, not self.warm)

    @torch.inference_mode()
    def warm_up(self, latent_shapes: Sequence[tuple[int, int, int]],
                example: Callable[[int, tuple[int, int, int]], tuple]) -> float:  # fmt: skip
        """Compiles and runs every bucket at every latent shape (C, h, w) once (dynamic: the
        fewest and the most rows; a graph compiled at 2 rows in a process that had compiled
        another was seen to compile again at 32, so warm-up runs the largest batch too, which
        for SD 1.5 on a CPU costs one full batch's forward at start-up); `example(rows,
        shape)` gives (x, timesteps, context, added) of that many rows. Logs its progress;
        returns the seconds it took."""
        started = time.perf_counter()
        runs = [(rows, shape) for shape in latent_shapes for rows in self.buckets]
        for done, (rows, shape) in enumerate(runs, 1):
            t, compiles = time.perf_counter(), self.compiles
            self(*example(rows, shape))
            what = "compiled" if self.compiles > compiles else "ran"
            logger.info("%s the U-Net (%s%s) for %d rows of %s in %.1fs [%d/%d]", what,
                        self.mode, ", dynamic" if self.dynamic else "", rows, shape,
                        time.perf_counter() - t, done, len(runs))  # fmt: skip
        self.warm = True
        return time.perf_counter() - started


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with `rows` more rows of zeros (timesteps: copies of the last, a valid timestep)."""
    if t.dim() == 1:
        return torch.cat([t, t[-1:].expand(rows)])
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])
