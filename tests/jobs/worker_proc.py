"""A job worker in its own process, for the tests that SIGKILL one.

    python worker_proc.py REDIS_URL KEY_PREFIX LEASE_S MODE [MAX_ATTEMPTS]

MODE "slow": the runner reports 20 steps, 0.1 s apart, and returns b"slow:" + the request.
MODE "crash": the runner SIGKILLs its own process as soon as it starts (a worker that dies
mid-job, every time).

Prints "started" (flushed) once the worker is connected and about to claim jobs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sdserve.jobs.queue import JobQueue
from sdserve.jobs.worker import Worker


async def slow(request: bytes, job_id: str, report) -> bytes:
    for step in range(1, 21):
        await asyncio.sleep(0.1)
        await report(step, 20)
    return b"slow:" + request


async def crash(request: bytes, job_id: str, report) -> bytes:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process was killed")


async def main(url: str, prefix: str, lease_s: float, mode: str, max_attempts: int) -> None:
    queue = JobQueue(url, key_prefix=prefix, lease_s=lease_s, max_attempts=max_attempts)
    await queue.ensure_groups()
    worker = Worker(queue, {"slow": slow, "crash": crash}[mode], concurrency=1, block_ms=100)
    print("started", flush=True)
    await worker.run_forever()


if __name__ == "__main__":
    url, prefix, lease, mode = sys.argv[1:5]
    attempts = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    asyncio.run(main(url, prefix, float(lease), mode, attempts))
