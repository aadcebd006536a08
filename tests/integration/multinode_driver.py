"""The multi-node scenario of test_multinode.py, in its own process (a process joins one Ray
cluster, and the test session's process has its own).

    python multinode_driver.py MODEL_DIR REDIS_URL REPORT.json [node-loss|autoscale]

On this machine it starts a Ray cluster of three nodes: a "CPU-type" head (custom resource
cpu_node) and two "GPU-type" workers (gpu_node). It deploys sdserve on it from config, attached
with `server.ray_address` as `sdserve serve --address` does: Denoiser replicas on the GPU-type
nodes (at most one per node), everything else on the CPU-type node. Then:

node-loss  two Denoiser replicas; it generates, queues jobs, kills one GPU-type node's
           processes, generates again and waits for every job;
autoscale  Denoiser autoscaling between 1 and 2 replicas; a burst of load adds the second
           replica and, once the burst ends, the autoscaler removes it again, while requests
           and jobs keep coming.

It writes what it saw to REPORT.json and the test asserts on it.
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from sdserve.config import SdserveConfig
from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

QUICK = dict(prompt="a red circle", width=64, height=64, steps=4, guidance_scale=7.5)
ENDED = {diffusion_pb2.JOB_STATE_SUCCEEDED, diffusion_pb2.JOB_STATE_FAILED,
         diffusion_pb2.JOB_STATE_CANCELLED}  # fmt: skip
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 5.0,
    "look_back_period_s": 2.0,
}
"""Quick to react, so that the test takes seconds: Serve's defaults wait 30 s to add a replica
and 10 minutes to remove one."""


HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
"""The GCS declares a node dead after 3 failed health checks 0.5 s apart (Ray's defaults: 5, 3 s
apart, which took 13 s here after the node-loss scenario killed a node). A check fails when the
raylet does not answer within Ray's 10 s timeout, unchanged, so a busy node is not declared dead;
a killed one refuses at once."""


def free_port() -> int:
    from sdserve.testing.ports import free_port

    return free_port()


def replica_nodes() -> dict[str, list[str]]:
    """Deployment name -> node ids of its live replicas (from the GCS's actor table)."""
    import ray

    nodes: dict[str, list[str]] = {}
    for info in ray._private.state.actors().values():
        name = info.get("ActorClassName", "")
        if info.get("State") == "ALIVE" and name.startswith("ServeReplica:sdserve:"):
            deployment = name.rsplit(":", 1)[1]
            nodes.setdefault(deployment, []).append(info["Address"]["NodeID"])
    return nodes


def generate(stub, n: int, seed0: int) -> list[str]:
    """n Generate calls; the status code of each."""
    codes = []
    for i in range(n):
        try:
            stub.Generate(diffusion_pb2.GenerateRequest(**QUICK, seed=seed0 + i), timeout=60)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    return codes


def replica_count() -> int:
    return len(replica_nodes().get("Denoiser", []))


SCALE_UP_WITHIN_S = 150.0
SCALE_DOWN_WITHIN_S = 150.0
"""How long the burst may take to add the second replica, and the calm after it to remove it:
about 7 times the slowest of three runs on this 2-core machine (9.5 to 20.5 s to add it, 10 to
17 s to remove it), so that a busy machine does not run out of them and an autoscaler that does
not act does."""


class Timeline:
    """The Denoiser's replica count at every change, and what the driver did, in seconds since
    the burst began: the test's message when a wait runs out."""

    def __init__(self):
        self.started = time.monotonic()
        self.counts: list[tuple[float, int]] = []
        self.events: list[tuple[float, str]] = []

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def count(self) -> int:
        count = replica_count()
        if not self.counts or self.counts[-1][1] != count:
            self.counts.append((self.now(), count))
        return count

    def event(self, what: str) -> None:
        self.events.append((self.now(), what))


def autoscale(stub, report: dict) -> None:
    """A burst of 12 clients until the second replica is up and 12 more requests have been
    served, then one request at a time until the autoscaler is back to one replica; jobs
    throughout. Each wait is on the replica count, bounded far from its normal time
    (SCALE_UP_WITHIN_S, SCALE_DOWN_WITHIN_S)."""
    import threading

    codes, stop, timeline = [], threading.Event(), Timeline()
    report["timeline"], report["events"] = timeline.counts, timeline.events
    long = diffusion_pb2.GenerateRequest(**{**QUICK, "steps": 30})
    jobs = [stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=long), timeout=30).job_id
            for _ in range(4)]  # fmt: skip

    def client(seed: int) -> None:
        while not stop.is_set():
            codes.extend(generate(stub, 1, seed))

    burst = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    timeline.event("burst begins")
    for thread in burst:
        thread.start()
    try:
        scaled_up = _poll(lambda: timeline.count() == 2, SCALE_UP_WITHIN_S)
        if scaled_up:
            served = len(codes)
            _poll(lambda: len(codes) >= served + len(burst), SCALE_UP_WITHIN_S)
    finally:
        stop.set()
        for thread in burst:
            thread.join()
    timeline.event(f"burst ends after {len(codes)} requests")
    report["burst_requests"] = len(codes)
    if not scaled_up:
        report["timed_out"] = f"no second replica within {SCALE_UP_WITHIN_S:.0f}s of the burst"
        return
    jobs += [stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=long), timeout=30).job_id
             for _ in range(4)]  # fmt: skip
    calm_began = time.monotonic()
    while True:  # one request at a time, until one replica is left
        codes.extend(generate(stub, 1, 1000 + len(codes)))
        if timeline.count() == 1:
            break
        if time.monotonic() - calm_began > SCALE_DOWN_WITHIN_S:
            report["timed_out"] = (f"still two replicas {SCALE_DOWN_WITHIN_S:.0f}s after the "
                                   "burst")  # fmt: skip
            break
    report["codes"], report["requests"] = sorted(set(codes)), len(codes)
    report["jobs"] = wait_for_jobs(stub, jobs)
    timeline.event("jobs ended")


def _poll(predicate, within_s: float, every_s: float = 0.5) -> bool:
    """Polls `predicate` until it is true (True) or `within_s` ran out (False)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def wait_for_jobs(stub, jobs: list[str]) -> list[dict]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        got = [stub.GetJob(diffusion_pb2.GetJobRequest(job_id=j), timeout=30) for j in jobs]
        if all(j.state in ENDED for j in got):
            break
        time.sleep(0.2)
    return [{"state": diffusion_pb2.JobState.Name(j.state), "attempts": j.attempts,
             "error": j.error} for j in got]  # fmt: skip


def main(model: str, redis_url: str, out: str, scenario: str = "node-loss") -> None:
    import ray
    from ray.cluster_utils import Cluster

    from sdserve.serve import server

    report: dict = {"scenario": scenario}
    began = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"cpu_node": 100},  # GCS: a random port
                        "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )  # fmt: skip
    gpu_nodes = [cluster.add_node(num_cpus=2, resources={"gpu_node": 100}) for _ in range(2)]
    report["cpu_node"] = cluster.head_node.node_id
    report["gpu_nodes"] = [node.node_id for node in gpu_nodes]
    on_cpu = {"resources": {"cpu_node": 1}}
    config = SdserveConfig.model_validate({
        "model": {"path": model},
        "server": {"ray_address": cluster.address, "grpc_port": free_port(),
                   "http_port": free_port(), "proxy_location": "HeadOnly"},
        "stages": {
            "ingress": on_cpu, "text_encoder": on_cpu, "vae_decoder": on_cpu, "vae_encoder": on_cpu,
            "job_worker": on_cpu,
            # 60 of a node's 100: one Denoiser replica per GPU-type node.
            "denoiser": {"num_replicas": 2, "num_cpus": 1, "resources": {"gpu_node": 60},
                         "autoscaling": AUTOSCALING if scenario == "autoscale" else None},
        },
        "jobs": {"redis_url": redis_url, "key_prefix": f"multinode{free_port()}:",
                 "lease_s": 2.0},
        "engine": {"compile": "off"},  # placement is the subject; start in seconds
    })  # fmt: skip
    target = f"127.0.0.1:{config.server.grpc_port}"
    try:
        server.start_ray(config)
        server.deploy(config)
        server.wait_healthy(target, timeout_s=180)
        report["ready_after_s"] = round(time.monotonic() - began, 1)  # the cluster, sdserve
        report["phases"] = []  # node-loss: [seconds since ready, what happened]
        ready = time.monotonic()

        def mark(what: str) -> None:
            report["phases"].append((round(time.monotonic() - ready, 1), what))

        report["placement"] = replica_nodes()
        if scenario == "autoscale":
            with grpc.insecure_channel(target) as channel:
                autoscale(diffusion_pb2_grpc.DiffusionServiceStub(channel), report)
            return
        with grpc.insecure_channel(target) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            report["before"] = generate(stub, 4, 0)

            long = diffusion_pb2.GenerateRequest(**{**QUICK, "steps": 40})
            jobs = [stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=long),
                                   timeout=30).job_id for _ in range(8)]  # fmt: skip
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                states = [stub.GetJob(diffusion_pb2.GetJobRequest(job_id=j), timeout=30).state
                          for j in jobs]  # fmt: skip
                if states.count(diffusion_pb2.JOB_STATE_RUNNING) >= 2:
                    break
                time.sleep(0.05)

            # Kill every process of the second GPU-type node (raylet, object store, workers).
            killed = gpu_nodes[1]
            report["killed"] = killed.node_id
            mark("node killed")
            cluster.remove_node(killed, allow_graceful=False)
            # Wait until Serve counts one live Denoiser replica (the other cannot be placed).
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if len(replica_nodes().get("Denoiser", [])) == 1:
                    break
                time.sleep(0.5)
            mark(f"{len(replica_nodes().get('Denoiser', []))} Denoiser replica(s) alive")
            time.sleep(2.0)  # routers learn of the dead replica through Serve's long poll
            report["placement_after"] = replica_nodes()
            report["after"] = generate(stub, 6, 100)
            mark("6 requests after")
            report["jobs"] = wait_for_jobs(stub, jobs)
            mark("jobs ended")
    finally:
        report["took_s"] = round(time.monotonic() - began, 1)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        ray.shutdown()  # then the cluster, sdserve in it: Serve's graceful stop would only wait
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
