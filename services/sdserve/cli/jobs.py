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
    import grpc

    from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

    submit = diffusion_pb2.SubmitJobRequest(
        request=options.generate_request(args),
        idempotency_key=args.idempotency_key or "",
        priority=diffusion_pb2.JobPriority.Value(f"JOB_PRIORITY_{args.priority.upper()}"),
    )
    with grpc.insecure_channel(args.server) as channel:
        try:
            reply = diffusion_pb2_grpc.DiffusionServiceStub(channel).SubmitJob(
                submit, timeout=args.timeout, metadata=options.call_metadata()
            )
        except grpc.RpcError as exc:
            return options.rpc_error(exc)
    print(reply.job_id)
    if not reply.created:
        print("(an existing job: same idempotency key)", file=sys.stderr)
    return 0


def _state(job) -> str:
    from sdserve.v1 import diffusion_pb2

    return diffusion_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def describe(job) -> str:
    """One line (two with an error) about a Job message."""
    state = _state(job)
    parts = [f"{job.job_id}: {state}"]
    if state == "RUNNING":
        parts.append(f"step {job.step}/{job.total_steps}")
    parts.append(f"attempts {job.attempts}")
    if job.finished_at:
        parts.append(f"took {job.finished_at - job.created_at:.1f}s from submission")
    elif job.created_at:
        parts.append(f"submitted {time.time() - job.created_at:.1f}s ago")
    if job.cancel_requested and state == "RUNNING":
        parts.append("cancel requested")
    line = ", ".join(parts)
    return f"{line}\n  error: {job.error}" if job.error else line


def _watch(stub, request, args: argparse.Namespace):
    """Follows WatchJob with a progress bar; returns the last Job, or None on Ctrl-C."""
    from tqdm import tqdm

    call = stub.WatchJob(request, timeout=args.timeout, metadata=options.call_metadata())
    bar = tqdm(desc="queued", unit="step", disable=True if args.quiet else None, leave=False)
    job = None
    try:
        for job in call:
            bar.set_description(_state(job).lower())
            if job.total_steps:
                bar.total = job.total_steps
            bar.update(job.step - bar.n)
    except KeyboardInterrupt:
        call.cancel()  # stops watching; the job goes on (cancel it with --cancel)
        print(f"stopped watching; the job goes on: {args.job_id}", file=sys.stderr)
        return None
    finally:
        bar.close()
    return job


def run_job(args: argparse.Namespace) -> int:
    import grpc

    from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

    request = diffusion_pb2.GetJobRequest(job_id=args.job_id)
    with grpc.insecure_channel(args.server) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        try:
            metadata = options.call_metadata()
            if args.cancel:
                job = stub.CancelJob(request, timeout=30, metadata=metadata)
            elif not args.wait:
                job = stub.GetJob(request, timeout=30, metadata=metadata)
            elif (job := _watch(stub, request, args)) is None:
                return 130
        except grpc.RpcError as exc:
            return options.rpc_error(exc)
    print(describe(job))
    if job.HasField("result") and (args.wait or args.output):
        options.write_images(job.result, args.output)
    return 0 if job.state != diffusion_pb2.JOB_STATE_FAILED else 1
