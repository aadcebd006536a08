"""The replica side of runtime models (`RuntimeModels`) against a registry kept in a dict, and
AdminService's request checks. tests/integration/test_admin_models.py runs them on Ray."""

from __future__ import annotations

import asyncio

import pytest

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.errors import InvalidArgument
from sdserve.serve import runtime_models
from sdserve.serve.admin import AdminServicer
from sdserve.serve.model_registry import REMOVING, SERVING, Entry
from sdserve.v1 import admin_pb2


class DictRegistry:
    """ModelRegistry's reads and reports, in memory."""

    def __init__(self):
        self.models: dict[str, Entry] = {}
        self.reports: list[tuple[str, str, int]] = []

    def put(self, name: str, state: str) -> None:
        self.models[name] = Entry(ModelConfig(name=name, path=f"/m/{name}"), state, 0.0, 0.0)

    def entries(self) -> list[Entry]:
        return list(self.models.values())

    def report_inflight(self, name: str, replica: str, requests: int) -> None:
        self.reports.append((name, replica, requests))


@pytest.fixture
def watched(monkeypatch):
    """(RuntimeModels on a DictRegistry, the calls it made, the in-flight counts it reads)."""
    monkeypatch.setattr(runtime_models, "model_stage_handles", lambda config, model: "handles")
    calls: list[tuple] = []
    held = {"xl": 0}
    models = runtime_models.RuntimeModels(
        SdserveConfig(),
        on_add=lambda model, handles: calls.append(("add", model.name, handles)),
        on_remove=lambda name: calls.append(("remove", name)),
        inflight=lambda name: held.get(name, 0),
    )
    models.registry = DictRegistry()
    return models, calls, held


def test_a_serving_model_is_added_once_and_a_removing_one_reports_until_deleted(watched):
    models, calls, held = watched
    registry = models.registry
    registry.put("xl", "deploying")
    asyncio.run(models.sync())
    assert calls == []  # not routed to before it serves
    registry.put("xl", SERVING)
    asyncio.run(models.sync())
    asyncio.run(models.sync())
    assert calls == [("add", "xl", "handles")] and "xl" in models.served
    registry.put("xl", REMOVING)
    held["xl"] = 2
    asyncio.run(models.sync())
    assert calls[-1] == ("remove", "xl") and "xl" not in models.served
    held["xl"] = 0
    asyncio.run(models.sync())
    assert [r[2] for r in registry.reports] == [2, 0]
    del registry.models["xl"]  # RemoveModel deleted it
    asyncio.run(models.sync())
    asyncio.run(models.sync())
    assert len(registry.reports) == 2 and calls.count(("remove", "xl")) == 1


def test_a_replica_that_never_served_a_removing_model_reports_it_holds_none(watched):
    models, calls, _ = watched
    models.registry.put("old", REMOVING)
    asyncio.run(models.sync())
    asyncio.run(models.sync())
    assert calls == [] and models.registry.reports[-1][::2] == ("old", 0)


def test_a_model_gone_from_the_registry_is_removed(watched):
    models, calls, _ = watched
    models.registry.put("xl", SERVING)
    asyncio.run(models.sync())
    models.registry.models.clear()  # its application went (Serve was shut down)
    asyncio.run(models.sync())
    assert calls == [("add", "xl", "handles"), ("remove", "xl")]


def _servicer() -> AdminServicer:
    class Runtime:
        registry = DictRegistry()

    return AdminServicer(SdserveConfig(), None, None, Runtime())


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": "x"}, "path"),
        ({"name": "bad name", "path": "/m"}, "name"),
        ({"name": "x" * 65, "path": "/m"}, "name"),
        ({"name": "x", "path": "/m", "config_json": "{"}, "config_json"),
        ({"name": "x", "path": "/m", "config_json": "[1]"}, "config_json"),
        ({"name": "x", "path": "/m", "config_json": '{"dtype": "int8"}'}, "config_json.dtype"),
        ({"name": "x", "path": "/m", "config_json": '{"wings": 2}'}, "config_json.wings"),
    ],
)
def test_add_model_requests_are_checked_field_by_field(request_fields, field):
    with pytest.raises(InvalidArgument) as refused:
        _servicer()._model_config(admin_pb2.AddModelRequest(**request_fields))
    assert refused.value.field == field


def test_add_model_settings_reach_the_model_config():
    request = admin_pb2.AddModelRequest(
        name="xl", path="/m/xl", config_json='{"dtype": "float32", "stages": {"denoiser": '
        '{"num_cpus": 0}}}'
    )  # fmt: skip
    model = _servicer()._model_config(request)
    assert (model.name, model.path, model.dtype) == ("xl", "/m/xl", "float32")
    assert model.stages.denoiser.num_cpus == 0


def test_the_folder_must_be_a_model_on_the_server(tmp_path, tiny_model):
    check = AdminServicer._check_folder
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(InvalidArgument) as refused:
            check(ModelConfig(name="x", path=str(path)))
        assert refused.value.field == "path"
    check(ModelConfig(name="x", path=str(tiny_model)))


def test_without_a_key_file_admin_calls_are_refused():
    from sdserve.errors import PermissionDenied

    with pytest.raises(PermissionDenied, match="no key file"):
        _servicer()._admin(grpc_context=None)


@pytest.mark.parametrize("argv", [["add", "no-folder"], ["add", "x=/m", "--settings", "{"]])
def test_the_cli_refuses_a_malformed_add_before_calling(argv, capsys):
    from sdserve.cli import main

    assert main(["admin", "models", *argv]) == 2
    assert capsys.readouterr().err


def test_the_stage_names_are_the_deployments_names():
    from sdserve.serve.app import STAGE_DEPLOYMENTS
    from sdserve.serve.model_apps import STAGE_NAMES

    assert {stage: d.name for stage, d in STAGE_DEPLOYMENTS.items()} == STAGE_NAMES
