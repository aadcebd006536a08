"""Where the time goes while sdserve serves a closed loop: CPU per process and the Denoiser's
torch thread sampled with py-spy.

    .venv/bin/python bench/profile_serving.py [--model default|tiny-sd15-layout]
                                              [--concurrency 16] [--seconds 30]

It starts sdserve (default configuration) on a free port, or uses the one at `--target` (which
serves `--model`), warms it up, then for `--seconds`
drives a closed loop while it
  - reads every process's CPU time (/proc) before and after: the Denoiser, the other stage
    replicas, the ingress, Serve's proxy and controller, Ray's own daemons;
  - samples the Denoiser replica with `py-spy record --idle` (100 Hz) and sorts the torch
    thread's samples into: the U-Net forward, scheduler steps, guidance and batching, request
    preparation, preview/latents conversion, and idle (waiting for work).
It prints both tables (docs/performance.md quotes one run) and writes the JSON.
py-spy comes with Ray; it needs permission to read another process (root or ptrace).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdserve.config import SdserveConfig
from sdserve.loadtest import Mix, run_loadtest

# Frames that identify what the torch thread is doing, checked innermost first.
CATEGORIES = [
    ("U-Net forward", ("UNet2DConditionModel.forward", "forward (diffusers/models/unets")),
    ("scheduler steps", ("scheduler.step", "/schedulers/scheduling_", "scale_model_input")),
    ("guidance and batching", ("unet_step",)),
    ("request preparation", ("make_job", "make_sample", "_prepare")),
    ("latents out, previews", ("returned (sdserve/stages/tensors", "preview_pixels", "_message")),
]


def classify(stack: str) -> str:
    for name, needles in CATEGORIES:
        if any(needle in stack for needle in needles):
            return name
    if "_iterate" in stack or "step (sdserve/pipeline/engine" in stack:
        return "engine bookkeeping"
    return "idle (waiting for work)" if "_worker (concurrent/futures" in stack else "other"


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (process name, user+system CPU seconds) of every process."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = _name(cmd) or stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def _name(cmd: str) -> str:
    if "ray::ServeReplica:" in cmd:
        return cmd.split("ray::ServeReplica:")[1].split()[0].split(":")[-1] + " replica"
    if "ray::" in cmd:
        return cmd.split("ray::")[1].split()[0]
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env"):
        if daemon in cmd:
            return f"ray {daemon}"
    return "load generator (this process)" if str(os.getpid()) == cmd else ""


def pid_of(name: str, before: dict) -> int:
    (pid,) = [p for p, (n, _) in before.items() if n == name]
    return pid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's bench)")
    parser.add_argument("--out", default="bench/results/profile-serving.json")
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "off", "default"],
        help="engine.compile (default %(default)s, as sdserve serves)",
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serving import PROMPTS, add_target_arguments, model_for, sdserve_for

    add_target_arguments(parser)  # --target: a running sdserve serving --model
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, size, steps = model_for(args.model, Path(tmp))
        steps = args.steps or steps
        config = SdserveConfig.model_validate({"model": {"path": str(model)},
                                               "engine": {"compile": args.compile}})  # fmt: skip
        target, shutdown, _ = sdserve_for(args, config)
        try:
            mix = Mix(prompts=PROMPTS, steps=(steps,), schedulers=("ddim",), widths=(size,),
                      heights=(size,), guidances=(7.5,))  # fmt: skip
            asyncio.run(run_loadtest(target, mix=mix, concurrency=4, requests=16))  # warm-up
            before = cpu_seconds()
            denoiser = pid_of("Denoiser replica", before)
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(denoiser),
                 "--idle", "--threads", "--rate", "100", "--format", "raw",
                 "--duration", str(int(args.seconds)), "--output", f"{tmp}/stacks.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            started = time.perf_counter()
            report = asyncio.run(run_loadtest(target, mix=mix, concurrency=args.concurrency,
                                              duration_s=args.seconds))  # fmt: skip
            wall = time.perf_counter() - started
            after = cpu_seconds()
            spy.wait(timeout=120)
            stacks = Path(f"{tmp}/stacks.txt").read_text().splitlines()
        finally:
            shutdown()
    return summarize(report.summary(), wall, before, after, stacks, args)


def summarize(summary, wall, before, after, stacks, args) -> int:
    cpu = collections.Counter()
    for pid, (name, seconds) in after.items():
        if pid in before and name:
            cpu[name] += seconds - before[pid][1]
    print(
        f"\n{summary['images_per_s']:.2f} images/s over {wall:.1f}s, {args.concurrency} "
        f"clients, {os.cpu_count()} cores; CPU seconds per process (share of the run):"
    )
    for name, seconds in cpu.most_common(12):
        print(f"  {name:<36} {seconds:6.1f}s  {seconds / wall:6.1%} of one core")
    torch_thread = collections.Counter()
    for line in stacks:
        stack, _, count = line.rpartition(" ")
        if "thread (" in stack and "denoiser" not in stack.split(";")[0]:
            continue  # only the torch thread (named "denoiser_0")
        torch_thread[classify(stack)] += int(count)
    total = sum(torch_thread.values()) or 1
    print("\nthe Denoiser's torch thread (py-spy samples, idle included):")
    for name, n in torch_thread.most_common():
        print(f"  {name:<36} {n / total:6.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "concurrency": args.concurrency,
                               "summary": summary, "wall_s": wall, "cpu_s": dict(cpu),
                               "torch_thread": {k: v / total for k, v in torch_thread.items()}},
                              indent=2))  # fmt: skip
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
