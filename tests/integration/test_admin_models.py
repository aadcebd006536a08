"""Models added and removed while the shared server serves (AdminService, issue 31 item 3).

- A tiny SDXL is added while 16 clients load the built-in model: none of their requests fails,
  no replica of the main application restarts (the same Ray actors before and after), and the
  new model answers Generate, a job, /v1/models and the metrics within `ADD_LIMIT_S`.
- It is removed while it holds requests: each of them ends OK, then it is gone.
- Every admin call refuses a key without the admin role (PERMISSION_DENIED) and no key
  (UNAUTHENTICATED).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import pytest
from helpers import ADMIN, API_KEYS, with_metadata

from sdserve.v1 import admin_pb2, admin_pb2_grpc, diffusion_pb2

ADD_LIMIT_S = 180.0
"""The stated bound on adding a model (call to answering) on this 2-core machine under the
16 clients' load; measured about 25-60 s (the test prints it)."""

NAME = "sdxl-live"
SETTINGS = '{"dtype": "float32", "stages": {"denoiser": {"num_cpus": 0, "torch_threads": 1}}}'
"""The added model computes in float32 and reserves no CPU, like the server's own tiny SDXL."""


@pytest.fixture(scope="module")
def admin(raw_channel):
    channel = with_metadata(raw_channel, ("authorization", f"Bearer {ADMIN['key']}"))
    return admin_pb2_grpc.AdminServiceStub(channel)


def main_app_actors(app_name: str) -> set[str]:
    """The ids of the live Ray actors of the application's replicas (from the GCS)."""
    import ray

    prefix = f"ServeReplica:{app_name}:"
    return {actor_id for actor_id, info in ray._private.state.actors().items()
            if info.get("State") == "ALIVE"
            and info.get("ActorClassName", "").startswith(prefix)}  # fmt: skip


class Load:
    """`clients` threads calling Generate on `model` until stopped (bounded: `max_s`)."""

    def __init__(self, stub, model: str, clients: int = 16, max_s: float = 600.0):
        self.stub, self.model, self.max_s = stub, model, max_s
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        ends = time.monotonic() + self.max_s
        n = 0
        while not self._stop.is_set() and time.monotonic() < ends:
            request = diffusion_pb2.GenerateRequest(prompt=f"load {i}", model=self.model,
                                                    steps=4, seed=i * 1000 + n)  # fmt: skip
            n += 1
            try:
                self.stub.Generate(request, timeout=120)
                with self._lock:
                    self.ok += 1
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)


@dataclass
class Added:
    before: set[str]
    """The main application's replica actors before the add."""
    after: set[str]
    reply: admin_pb2.AddModelResponse
    answered_s: float
    """From the AddModel call to the new model's first image."""
    load: Load
    ok_before: int
    """The load's requests done before the add began."""


@pytest.fixture(scope="module")
def added(server, stub, admin, tiny_sdxl_model) -> Added:
    """The tiny SDXL added as NAME while 16 clients load the built-in model ("shapes")."""
    app = server.config.server.app_name
    before = main_app_actors(app)
    with Load(stub, model="shapes") as load:
        time.sleep(3.0)  # the clients are running
        ok_before = load.ok
        started = time.monotonic()
        reply = admin.AddModel(
            admin_pb2.AddModelRequest(name=NAME, path=str(tiny_sdxl_model), config_json=SETTINGS),
            timeout=ADD_LIMIT_S,
        )
        first = stub.Generate(diffusion_pb2.GenerateRequest(prompt="new", model=NAME, steps=4))
        answered_s = time.monotonic() - started
        assert len(first.images) == 1 and first.parameters.model == NAME
        time.sleep(2.0)  # more of the load after the add
    print(f"\nAddModel took {reply.seconds:.1f}s; the new model answered after "
          f"{answered_s:.1f}s; the load: {load.ok} requests OK, {load.ok - ok_before} of them "
          "during and after the add")  # fmt: skip
    return Added(before, main_app_actors(app), reply, answered_s, load, ok_before)


def test_adding_a_model_under_load_fails_nothing_and_restarts_no_replica(server, added):
    app = server.config.server.app_name
    assert added.before, "no replicas of the main application found"
    assert added.load.failures == []
    assert added.load.ok > added.ok_before, "the load made no progress during the add"
    assert added.answered_s < ADD_LIMIT_S
    model = added.reply.model
    assert model.name == NAME and model.state == "serving" and model.source == "added"
    assert model.application == f"{app}.{NAME}"
    assert added.after == added.before  # not one replica restarted or added


def test_an_added_model_is_listed_run_as_a_job_and_measured(server, stub, admin, added):
    models = [m.name for m in stub.ListModels(diffusion_pb2.ListModelsRequest()).models]
    assert models[-1] == NAME
    admin_models = admin.ListModels(admin_pb2.AdminListModelsRequest()).models
    assert [(m.name, m.source) for m in admin_models][-1] == (NAME, "added")
    assert {m.source for m in admin_models[:-1]} == {"config"}
    http = f"http://127.0.0.1:{server.config.server.http_port}"
    listed = httpx.get(f"{http}/v1/models", timeout=30,
                       headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}"})  # fmt: skip
    assert NAME in [m["id"] for m in listed.json()["data"]]
    # The JobWorkers follow too: a job on the new model succeeds.
    job = stub.SubmitJob(diffusion_pb2.SubmitJobRequest(
        request=diffusion_pb2.GenerateRequest(prompt="job", model=NAME, steps=4)))  # fmt: skip
    for record in stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job.job_id), timeout=120):
        last = record
    assert last.state == diffusion_pb2.JOB_STATE_SUCCEEDED, last.error
    # Its stage replicas' series carry its name (Ray exports them every second).
    port = server.config.metrics.export_port
    deadline, text = time.monotonic() + 20, ""
    while time.monotonic() < deadline and f'model="{NAME}"' not in text:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        time.sleep(1.0)
    assert f'model="{NAME}"' in text


def test_removing_a_model_lets_its_requests_end_then_it_is_gone(server, stub, admin, added):
    app = server.config.server.app_name
    before = main_app_actors(app)
    held = 4

    def one(i: int) -> str:
        request = diffusion_pb2.GenerateRequest(prompt=f"held {i}", model=NAME, steps=40, seed=i)
        events = stub.GenerateStream(request, timeout=300)
        for event in events:
            if event.WhichOneof("event") == "progress":
                started.release()  # it is in the Denoiser
            if event.WhichOneof("event") == "result":
                return "OK" if len(event.result.images) == 1 else "no image"
        return "no result"

    started = threading.Semaphore(0)
    with ThreadPoolExecutor(held) as pool:
        outcomes = [pool.submit(one, i) for i in range(held)]
        for _ in range(held):
            assert started.acquire(timeout=120)
        removed = admin.RemoveModel(admin_pb2.RemoveModelRequest(name=NAME), timeout=300)
        results = [f.result(timeout=300) for f in outcomes]
    assert results == ["OK"] * held
    assert removed.drained_requests == held
    names = [m.name for m in stub.ListModels(diffusion_pb2.ListModelsRequest()).models]
    assert NAME not in names
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(diffusion_pb2.GenerateRequest(prompt="gone", model=NAME, steps=4))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("model:")
    assert main_app_actors(f"{app}.{NAME}") == set()
    assert main_app_actors(app) == before


def test_every_admin_call_needs_the_admin_role(raw_channel, channel, tiny_sdxl_model):
    calls = {
        "AddModel": admin_pb2.AddModelRequest(name="nope", path=str(tiny_sdxl_model)),
        "RemoveModel": admin_pb2.RemoveModelRequest(name="default"),
        "ListModels": admin_pb2.AdminListModelsRequest(),
    }
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert set(calls) == {method.name for method in service.methods}  # every admin call
    for key_channel, code in ((channel, grpc.StatusCode.PERMISSION_DENIED),
                              (raw_channel, grpc.StatusCode.UNAUTHENTICATED)):  # fmt: skip
        stub = admin_pb2_grpc.AdminServiceStub(key_channel)
        for method, request in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request, timeout=30)
            assert refused.value.code() == code, method


def test_bad_admin_requests_are_refused_by_field(admin, tmp_path, tiny_sdxl_model):
    cases = [
        (admin_pb2.AddModelRequest(name="x", path=str(tmp_path / "none")), "path"),
        (admin_pb2.AddModelRequest(name="x", path=str(tmp_path)), "path"),
        (admin_pb2.AddModelRequest(name="bad name!", path=str(tmp_path)), "name"),
        (admin_pb2.AddModelRequest(name="default", path=str(tiny_sdxl_model)), "name"),
        (admin_pb2.AddModelRequest(name="x", path=str(tmp_path), config_json='{"dtype": 1}'),
         "config_json.dtype"),
    ]  # fmt: skip
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as refused:
            admin.AddModel(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert refused.value.details().startswith(f"{field}:"), refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        admin.RemoveModel(admin_pb2.RemoveModelRequest(name="default"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as refused:
        admin.RemoveModel(admin_pb2.RemoveModelRequest(name="never-added"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
