"""The models added at runtime, in Ray's cluster KV store: what every ingress and JobWorker
replica on every node reads to learn which added models to route to (`RuntimeModels`), and
where the admin API (`sdserve.serve.admin`) records what it is doing.

One key per added model, `sdserve/APP/models/NAME` -> JSON {config, state, since}:
- `deploying`: AddModel claimed the name (an atomic put-if-absent) and is deploying it;
- `serving`: its application runs; replicas route requests to it;
- `removing`: RemoveModel began; replicas stop routing new requests to it and report, under
  `sdserve/APP/inflight/NAME/REPLICA`, how many they still hold, until none.

The store lives as long as the Ray cluster: a redeployed ingress finds the added models there.
`sdserve serve` clears it when it shuts Serve down, since the models' applications go with it.
Every call here is a GCS round trip of about a millisecond; async callers run them in a thread.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sdserve.config import ModelConfig
from sdserve.serve import _ray

DEPLOYING, SERVING, REMOVING = "deploying", "serving", "removing"


@dataclass(frozen=True)
class Entry:
    """One added model's record."""

    config: ModelConfig
    state: str
    since: float
    """When it entered `state` (time.time())."""
    added: float
    """When AddModel claimed its name (time.time())."""

    @property
    def name(self) -> str:
        return self.config.name


class ModelRegistry:
    """The added models of the Serve application `app_name`."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._models = f"sdserve/{app_name}/models/"
        self._inflight = f"sdserve/{app_name}/inflight/"

    def claim(self, config: ModelConfig) -> bool:
        """Records `config` as deploying, unless its name is taken: whether it was claimed."""
        record = self._dump(config, DEPLOYING, added=time.time())
        return not _ray.kv_put(self._models + config.name, record, overwrite=False)

    def set_state(self, name: str, state: str) -> None:
        entry = self.get(name)
        if entry is not None:
            _ray.kv_put(self._models + name, self._dump(entry.config, state, entry.added))

    def get(self, name: str) -> Entry | None:
        raw = _ray.kv_get(self._models + name)
        return None if raw is None else self._load(raw)

    def entries(self) -> list[Entry]:
        """Every added model, in the order they were added."""
        raws = (_ray.kv_get(key) for key in _ray.kv_keys(self._models))
        entries = [self._load(raw) for raw in raws if raw is not None]
        return sorted(entries, key=lambda e: e.added)

    def drop(self, name: str) -> None:
        """Forgets the model and its replicas' reports."""
        _ray.kv_del(self._models + name)
        _ray.kv_del(f"{self._inflight}{name}/", by_prefix=True)

    def clear(self) -> None:
        """Forgets every added model (their applications are gone)."""
        _ray.kv_del(self._models, by_prefix=True)
        _ray.kv_del(self._inflight, by_prefix=True)

    def report_inflight(self, name: str, replica: str, requests: int) -> None:
        """A replica's count of the requests for `name` it still holds."""
        report = json.dumps({"requests": requests, "at": time.time()}).encode()
        _ray.kv_put(f"{self._inflight}{name}/{replica}", report)

    def inflight(self, name: str, since: float) -> tuple[int, int]:
        """(requests for `name` held in all, replicas that reported) over the reports made
        after `since`."""
        total = replicas = 0
        for key in _ray.kv_keys(f"{self._inflight}{name}/"):
            raw = _ray.kv_get(key)
            report = json.loads(raw) if raw else {"at": 0.0}
            if report["at"] >= since:
                total += report["requests"]
                replicas += 1
        return total, replicas

    @staticmethod
    def _dump(config: ModelConfig, state: str, added: float) -> bytes:
        record = {"config": config.model_dump(mode="json"), "state": state,
                  "since": time.time(), "added": added}  # fmt: skip
        return json.dumps(record).encode()

    @staticmethod
    def _load(raw: bytes) -> Entry:
        record = json.loads(raw)
        return Entry(ModelConfig.model_validate(record["config"]), record["state"],
                     record["since"], record["added"])  # fmt: skip
