"""The Denoiser engine: step-level (continuous) batching of diffusion requests.

One engine runs per Denoiser replica, on the replica's torch thread. At every step boundary it

1. drops cancelled requests and requests past their deadline (they are never decoded);
2. admits waiting requests into the running batch, up to `max_batch_size` images per bucket,
   and pauses or resumes bulk requests around interactive ones (`scheduling`: request classes,
   deadlines, tenants, preemption; `policy="fifo"`: first come, first served);
3. runs ONE U-Net forward over one bucket of running images (`unet_step`): each image at its own
   timestep, with its own scheduler, generator, step count and guidance; images with guidance
   <= 1, or past their guidance stop, add no unconditional row; images on a DeepCache shallow
   step go into a second, shallow forward; images with different LoRA adapters and ControlNets
   share it (`lora_policy="one_set"` keeps each adapter set to forwards of its own, to compare);
4. reports progress, and hands finished latents back.

Latents of different shapes sit in separate buckets, which take turns, so a rare size is not
starved by a common one. `strategy="request"` batches whole requests instead, as Ray Serve's
`@serve.batch` does (a bucket admits only when its batch has finished), to measure what
step-level batching buys (bench/). The engine emits plain events (`engine_events`) and
`sdserve.stats.StepStats`; it knows nothing of Ray, gRPC or metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait

import torch

from sdserve.errors import Unavailable
from sdserve.pipeline import adapter_sets, scheduling
from sdserve.pipeline.denoise import DenoiseJob
from sdserve.pipeline.engine_events import (  # noqa: F401 (re-exported: the engine's events)
    DEADLINE_EXCEEDED,
    Cancelled,
    Event,
    Failed,
    Finished,
    Paused,
    Queued,
    Started,
    Step,
)  # fmt: skip
from sdserve.pipeline.sample import Sample
from sdserve.pipeline.step import FullForward, unet_step
from sdserve.pipeline.threads import set_threads
from sdserve.stats import StepStats

logger = logging.getLogger(__name__)


class DenoiseEngine:
    """Continuous batching over a U-Net. Thread-safe `submit` / `cancel`; `step()` does one
    iteration (tests drive it directly); `start(executor)` runs iterations on that executor.

    The engine never owns a thread of its own: each iteration is one task on the executor,
    which the engine submits again while it has work. On a single-thread executor (the stage's
    torch thread), other torch work submitted there (preparing a request, encoding a prompt,
    decoding latents) runs between two U-Net steps, on the thread that loaded the model.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        max_batch_size: int = 16,
        strategy: str = "step",
        on_stats: Callable[[StepStats], None] | None = None,
        threads_for_rows: Callable[[int], int] | None = None,
        lora_policy: str = "mixed",
        forward: FullForward | None = None,
        batch_invariant: bool = False,
        step: Callable[[list[Sample]], None] | None = None,
        policy: str = "priority",
        bulk_images_with_interactive: int = 0,
    ):
        known = {"strategy": ("step", "request"), "policy": scheduling.POLICIES,
                 "lora_policy": adapter_sets.POLICIES}  # fmt: skip
        for what, value in zip(known, (strategy, policy, lora_policy), strict=True):
            if value not in known[what]:
                raise ValueError(f"unknown {what} {value!r}")
        self.prioritized = policy == "priority" and strategy == "step"
        """Request classes, deadlines, tenants and preemption (`sdserve.pipeline.scheduling`);
        False: first come, first served."""
        self.bulk_beside = bulk_images_with_interactive
        self._order = scheduling.FairOrder()
        self.lora_policy = lora_policy
        """mixed: rows of any LoRA adapters and ControlNets share a forward. one_set: a forward
        takes one adapter set's rows, the sets in turn, to compare (`adapter_sets`)."""
        self._set_turn = 0
        self.unet = unet
        self.max_batch_size = max_batch_size
        self.strategy = strategy
        self.on_stats = on_stats
        self.threads_for_rows = threads_for_rows
        """Torch threads for a forward of so many rows (`threads.ThreadPlan.threads_for`);
        None: leave torch's setting alone."""
        self.forward = forward
        """The U-Net's plain forward (a `compiled.CompiledUNet`), or None: eager."""
        self.batch_invariant = batch_invariant
        """Each image's rows in a forward of their own: its pixels never depend on its
        neighbours in the batch (at the cost of batching)."""
        self._step = step or (lambda samples: unet_step(self.unet, samples, self.forward))
        """One forward over a bucket's samples: a U-Net's (`unet_step`) unless given (a
        diffusion transformer's, `TransformerDenoiser.step`)."""
        self._lock = threading.Lock()
        self._waiting: deque[DenoiseJob] = deque()
        self._running: dict[tuple[int, ...], list[DenoiseJob]] = {}
        self._turns: deque[tuple[int, ...]] = deque()  # buckets in turn order
        self._executor: Executor | None = None
        self._scheduled: Future | None = None  # the next iteration, once submitted
        self._stopping = False

    # -- called from any thread ---------------------------------------------------------------
    def submit(self, job: DenoiseJob) -> None:
        """Queues a request; a stopped engine fails it at once (UNAVAILABLE)."""
        with self._lock:
            stopping = self._stopping
            if not stopping:
                position = len(self._waiting)
                self._waiting.append(job)
                self._schedule()
        if stopping:
            self._emit(job, Failed(error=Unavailable("the Denoiser engine is stopping")))
        else:
            self._emit(job, Queued(position=position))

    def cancel(self, request_id: str, reason: str = "cancelled by the client") -> None:
        """Marks a request cancelled; it leaves the batch at the next step boundary."""
        with self._lock:
            for job in self._jobs():
                if job.request_id == request_id and job.cancelled is None:
                    job.cancelled = reason
            self._schedule()

    def work_ahead(self, request_class: str | None = None) -> int:
        """Image-steps left of every request waiting or running (one per image per step), or
        of those of one class."""
        with self._lock:
            return sum(job.images * (job.total - job.steps_done) for job in self._jobs()
                       if request_class in (None, job.request_class))  # fmt: skip

    def paused(self) -> int:
        """Running requests paused now."""
        with self._lock:
            return sum(job.paused_since is not None for job in self._jobs())

    def counts(self) -> tuple[int, int]:
        """(waiting requests, running requests)."""
        with self._lock:
            return len(self._waiting), sum(len(jobs) for jobs in self._running.values())

    def start(self, executor: Executor) -> None:
        """Runs iterations on `executor` from now on, whenever there is work (use the thread
        that loaded the model: torch is fastest when one thread does all of a process's
        compute)."""
        with self._lock:
            self._executor = executor
            self._stopping = False
            self._schedule()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Runs no further iteration; waits up to `timeout_s` for the one in progress, then
        fails every request still held, waiting or running, with UNAVAILABLE (their callers
        may retry elsewhere), so that none is left unanswered."""
        with self._lock:
            self._stopping = True
            scheduled = self._scheduled
        if scheduled is not None:
            wait([scheduled], timeout_s)
        for job in self._take_everything():
            self._emit(job, Failed(error=Unavailable("the Denoiser engine stopped")))

    def _schedule(self) -> None:
        """Submits the next iteration if there is work and none is pending. Hold the lock."""
        if self._executor is None or self._stopping or self._scheduled is not None:
            return
        if self._waiting or self._running:
            self._scheduled = self._executor.submit(self._iterate)

    # -- the engine thread --------------------------------------------------------------------
    def _jobs(self):
        yield from self._waiting
        yield from self._jobs_running()

    def _jobs_running(self):
        for jobs in self._running.values():
            yield from jobs

    def _iterate(self) -> None:
        """One iteration on the executor, then the next one is submitted if there is work."""
        try:
            self.step()
        except Exception as exc:  # a bug in the loop itself: fail what it holds, keep serving
            logger.exception("denoise engine iteration failed; failing every pending request")
            for job in self._take_everything():
                self._emit(job, Failed(error=exc))
        finally:
            with self._lock:
                self._scheduled = None
                self._schedule()

    def _drop_cancelled(self, now: float) -> list[DenoiseJob]:
        dropped = []
        for job in list(self._jobs()):
            if job.cancelled is None and job.deadline is not None and now > job.deadline:
                job.cancelled = DEADLINE_EXCEEDED
            if job.cancelled is not None:
                dropped.append(job)
        for job in dropped:
            if job in self._waiting:
                self._waiting.remove(job)
            else:
                self._running[job.shape].remove(job)
        return dropped

    def _admit(self, now: float) -> list[DenoiseJob]:
        """Moves waiting jobs into their buckets: in the policy's order (`scheduling`), or
        FIFO; a job that does not fit holds back the jobs after it in its bucket."""
        admitted = []
        blocked: set[tuple[int, ...]] = set()
        ordered = self._order.order(self._waiting) if self.prioritized else list(self._waiting)
        interactive_running = any(map(scheduling.interactive, self._jobs_running()))
        for job in ordered:
            shape = job.shape
            if shape in blocked:
                continue  # keep the order within a bucket
            bucket = self._running.setdefault(shape, [])
            images = sum(j.images for j in bucket)
            if self.strategy == "request" and bucket and not any(j in admitted for j in bucket):
                blocked.add(shape)  # whole-request batching: wait for the batch to finish
                continue
            if self.prioritized:
                fits = scheduling.fits(job, bucket, self.max_batch_size, self.bulk_beside,
                                       interactive_running)  # fmt: skip
                interactive_running |= fits and scheduling.interactive(job)
            else:
                fits = not bucket or images + job.images <= self.max_batch_size
            if not fits:
                blocked.add(shape)
                continue
            self._order.charge(job)
            bucket.append(job)
            if shape not in self._turns:
                self._turns.append(shape)
            self._waiting.remove(job)
            admitted.append(job)
        for shape in [s for s, jobs in self._running.items() if not jobs]:
            del self._running[shape]
            self._turns.remove(shape)
        return admitted

    def step(self) -> StepStats | None:
        """One iteration: drop cancelled, admit, one U-Net forward on the next bucket."""
        now = time.monotonic()
        with self._lock:
            dropped = self._drop_cancelled(now)
            admitted = self._admit(now)
            shape, jobs, paused = self._next_forward(now)
            waiting = len(self._waiting)
            running = sum(len(j) for j in self._running.values())
        for job in dropped:
            self._emit(job, Cancelled(reason=job.cancelled or "cancelled"))
        for job in paused:
            self._emit(job, Paused())
        unprepared = [job for job in admitted if not self._start(job, now)]
        jobs = [job for job in jobs if job not in unprepared]
        if not jobs:
            return None

        if self.lora_policy == "one_set":
            jobs = adapter_sets.one_set(jobs, self._set_turn)
            self._set_turn += 1
        samples = [s for job in jobs for s in job.samples if not s.done]
        rows = len(samples) + sum(s.guided_now for s in samples)
        shallow_rows = sum(1 + s.guided_now for s in samples if s.shallow)
        controlled = sum(s.controlled_now for s in samples)
        if self.threads_for_rows is not None:
            set_threads(self.threads_for_rows(self._padded(rows)))
        started = time.perf_counter()
        try:
            for group in [[s] for s in samples] if self.batch_invariant else [samples]:
                self._step(group)
        except Exception as exc:
            self._fail_forward(shape, jobs, exc)
            return None
        stats = StepStats(
            request_ids=tuple(j.request_id for j in jobs),
            batch_size=len(samples),
            rows=rows,
            shallow_rows=shallow_rows,
            controlled=controlled,
            latent_shape=shape,
            waiting=waiting,
            running=running,
            duration_s=time.perf_counter() - started,
        )
        self._report(shape, jobs)
        if self.on_stats is not None:
            try:
                self.on_stats(stats)
            except Exception:  # statistics never cost a request its step
                logger.exception("recording the stats of a U-Net step failed")
        return stats

    def _next_forward(self, now: float):
        """(the bucket whose forward runs now, its jobs in it, jobs paused now). Hold the lock."""
        if not self._turns:
            return None, [], []
        if not self.prioritized:
            shape = self._turns[0]
            self._turns.rotate(-1)
            return shape, list(self._running[shape]), []
        paused = scheduling.plan(self._running, self.max_batch_size, self.bulk_beside, now)
        shape = scheduling.next_bucket(list(self._turns), self._running)
        if shape is None:
            return None, [], paused
        self._turns.remove(shape)
        self._turns.append(shape)  # its turn is taken: the others' come first
        return shape, scheduling.active(self._running[shape]), paused

    def _start(self, job: DenoiseJob, now: float) -> bool:
        """Makes an admitted job's samples (its noise and per-row tensors: only now that it
        runs) and tells it; a job whose samples cannot be made fails alone. Whether it runs."""
        try:
            job.admit()
        except Exception as exc:
            logger.exception("preparing the images of %s failed", job.request_id)
            with self._lock:
                self._running[job.shape].remove(job)
            self._emit(job, Failed(error=exc))
            return False
        self._emit(job, Started(wait_s=now - job.submitted_at))
        return True

    def _padded(self, rows: int) -> int:
        """The rows a forward of `rows` computes: its bucket when compiled."""
        bucket_for = getattr(self.forward, "bucket_for", None)
        return (bucket_for(rows) or rows) if bucket_for is not None else rows

    def _report(self, shape: tuple[int, ...], jobs: list[DenoiseJob]) -> None:
        """After a forward: step events (with latents on preview steps), finished requests."""
        finished = [job for job in jobs if job.done]
        if finished:
            with self._lock:
                for job in finished:
                    self._running[shape].remove(job)
        elapsed = time.monotonic()
        for job in jobs:
            k = job.samples[0].index
            preview = job.preview_every and (k % job.preview_every == 0 or k == job.total)
            latents = job.latents() if preview else None
            self._emit(job, Step(step=k, total=job.total, elapsed_s=elapsed - job.submitted_at,
                                 latents=latents))  # fmt: skip
        for job in finished:
            self._emit(job, Finished(latents=job.latents(), paused_s=job.paused_s))

    def _emit(self, job: DenoiseJob, event: Event) -> None:
        """Hands a request its event. A callback that raises loses its own request, never
        another's: dropped at the next step boundary, or, when the event was its last
        (Finished, Cancelled), failed with the callback's error, so that its caller still
        gets an answer."""
        try:
            job.on_event(event)
        except Exception as exc:
            logger.exception("event callback of %s failed; dropping it", job.request_id)
            if not isinstance(event, Finished | Cancelled | Failed):
                job.cancelled = "its event callback failed"
            elif not isinstance(event, Failed):
                self._emit(job, Failed(error=exc))

    def _fail_forward(self, shape: tuple[int, ...], jobs: list[DenoiseJob], exc: Exception) -> None:
        """A U-Net forward raised: the requests in it fail (the others go on). Out of memory
        frees the cached GPU memory first, so that smaller batches can run."""
        logger.exception("U-Net step failed for %s", [j.request_id for j in jobs])
        if is_out_of_memory(exc) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        with self._lock:
            for job in jobs:
                self._running[shape].remove(job)
        for job in jobs:
            self._emit(job, Failed(error=exc))

    def _take_everything(self) -> list[DenoiseJob]:
        """Empties the engine: every request it held, waiting or running."""
        with self._lock:
            jobs = list(self._jobs())
            self._waiting.clear()
            self._running.clear()
            self._turns.clear()
        return jobs


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a forward failed for lack of (GPU) memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
