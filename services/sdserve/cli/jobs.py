"""`sdserve submit` and `sdserve job`: asynchronous jobs kept in Redis."""

from __future__ import annotations

import argparse
import sys
import time

from sdserve.cli import options
from sdserve.cli.options import Parents


def register(sub, parents: Parents) -> None:
    submit = sub.add_parser(
        "submit",
        help="queue an asynchronous job and print its id",
        description="Call DiffusionService.SubmitJob: the job is kept in Redis and runs on a "
        "JobWorker, even if the server restarts. Follow it with `sdserve job ID --wait`.",
        parents=[parents.request, parents.server, parents.timeout(30.0)],
    )
    submit.add_argument(
        "--priority",
        default="normal",
        choices=["high", "normal", "low"],
        help="workers take higher priorities first (default %(default)s)",
    )
    submit.add_argument(
        "--callback-url",
        metavar="URL",
        help="when the job ends, the server POSTs a signed JSON event (Standard Webhooks) to "
        "URL, retrying until it is delivered; its host must be on the server's allow-list",
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting again with the same key returns the first job instead of a new one",
    )
    submit.set_defaults(func=run_submit)

    job = sub.add_parser(
        "job",
        help="show, wait for or cancel an asynchronous job",
        description="Show a job's state (GetJob); with --wait follow it with a progress bar "
        "(WatchJob) and write its images; with --cancel cancel it (CancelJob). Exit status: 0, "
        "or 1 when the job FAILED, 2 on a gRPC error.",
        parents=[
            parents.server,
            parents.output,
            parents.timeout(3600.0, "how long --wait waits"),
            parents.quiet,
        ],  # fmt: skip
    )
    job.add_argument("job_id", metavar="ID", help="the id `sdserve submit` printed")
    what = job.add_mutually_exclusive_group()
    what.add_argument("--wait", action="store_true", help="follow the job until it ends")
    what.add_argument("--cancel", action="store_true", help="cancel the job")
    job.set_defaults(func=run_job)


def run_submit(args: argparse.Namespace) -> int:
    from sdserve.client import ClientError

    try:
        with options.client(args) as client:
            submitted = client.submit(args.prompt, priority=args.priority,
                                      idempotency_key=args.idempotency_key,
                                      callback_url=args.callback_url,
                                      **options.request_options(args))  # fmt: skip
    except ClientError as exc:
        return options.rpc_error(exc)
    print(submitted.job_id)
    if not submitted.created:
        print("(an existing job: same idempotency key)", file=sys.stderr)
    return 0


def describe(job) -> str:
    """One line (two with an error) about a `sdserve.client.Job`."""
    parts = [f"{job.job_id}: {job.state}"]
    if job.state == "RUNNING":
        parts.append(f"step {job.step}/{job.total_steps}")
    parts.append(f"attempts {job.attempts}")
    if job.finished_at:
        parts.append(f"took {job.finished_at - job.created_at:.1f}s from submission")
    elif job.created_at:
        parts.append(f"submitted {time.time() - job.created_at:.1f}s ago")
    if job.cancel_requested and job.state == "RUNNING":
        parts.append("cancel requested")
    lines = [", ".join(parts)]
    if job.error:
        lines.append(f"  error: {job.error}")
    if job.callback_url:
        lines.append(f"  webhook: {job.callback_url}")
        for at, status, error in job.webhook_attempts:
            when = time.strftime("%H:%M:%S", time.localtime(at))
            lines.append(f"    {when} {status or 'no reply'}{f' ({error})' if error else ''}")
    return "\n".join(lines)


def _wait(client, args: argparse.Namespace):
    """Follows the job with a progress bar; returns its last state, or None on Ctrl-C."""
    from tqdm import tqdm

    bar = tqdm(desc="queued", unit="step", disable=True if args.quiet else None, leave=False)

    def show(job) -> None:
        bar.set_description(job.state.lower())
        if job.total_steps:
            bar.total = job.total_steps
        bar.update(job.step - bar.n)

    try:
        return client.wait(args.job_id, on_progress=show, timeout=args.timeout)
    except KeyboardInterrupt:  # the watch is cancelled; the job goes on
        print(f"stopped watching; the job goes on: {args.job_id}", file=sys.stderr)
        return None
    finally:
        bar.close()


def run_job(args: argparse.Namespace) -> int:
    from sdserve.client import ClientError

    try:
        with options.client(args, timeout=30) as client:
            if args.cancel:
                job = client.cancel(args.job_id)
            elif not args.wait:
                job = client.job(args.job_id)
            elif (job := _wait(client, args)) is None:
                return 130
    except ClientError as exc:
        return options.rpc_error(exc)
    print(describe(job))
    if job.result is not None and (args.wait or args.output):
        options.write_images(job.result, args.output)
    return 0 if job.state != "FAILED" else 1
