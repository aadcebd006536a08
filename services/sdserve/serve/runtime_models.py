"""A replica's view of the models added at runtime, kept current from the registry.

Each Pipeline and JobWorker replica runs one `RuntimeModels` loop. Every `poll_s` it reads the
registry (`sdserve.serve.model_registry`) and:
- a model that is `serving` and new to this replica: takes handles to its stages and calls
  `on_add`, from which point the replica routes requests to it;
- a model that is `removing` (or gone): calls `on_remove`, from which point the replica takes
  no new request for it, then reports how many it still holds (`inflight`) until RemoveModel
  has deleted it. RemoveModel waits for those reports to reach zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.serve import _ray
from sdserve.serve.client import StageHandles
from sdserve.serve.model_apps import model_stage_handles
from sdserve.serve.model_registry import REMOVING, SERVING, ModelRegistry

logger = logging.getLogger("ray.serve")

POLL_S = 0.5
"""How often each replica reads the registry: an added model is routed to, and a removed one
refused, within about this long of the registry saying so."""


class RuntimeModels:
    """Calls `on_add(model, handles)` and `on_remove(name)` as models are added and removed."""

    def __init__(
        self,
        config: SdserveConfig,
        on_add: Callable[[ModelConfig, StageHandles], None],
        on_remove: Callable[[str], None],
        inflight: Callable[[str], int],
        poll_s: float = POLL_S,
    ):
        self.config = config
        self.registry = ModelRegistry(config.server.app_name)
        self.served: dict[str, ModelConfig] = {}
        """The added models this replica routes requests to."""
        self.poll_s = poll_s
        self._on_add, self._on_remove, self._inflight = on_add, on_remove, inflight
        self._removing: set[str] = set()  # removed here, still reported until deleted
        self._replica = _ray.replica_name() or uuid.uuid4().hex
        self._failing_since: float | None = None

    async def run(self) -> None:
        """Polls the registry until cancelled; a failing read is logged once a minute."""
        while True:
            try:
                await self.sync()
                self._failing_since = None
            except Exception as exc:  # a GCS hiccup must not stop the loop
                now = time.monotonic()
                if self._failing_since is None or now - self._failing_since > 60:
                    self._failing_since = now
                    logger.warning("reading the added models failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def sync(self) -> None:
        """One poll: follow the registry, and report what removed models still hold here."""
        entries = {e.name: e for e in await asyncio.to_thread(self.registry.entries)}
        for name, entry in entries.items():
            if entry.state == SERVING and name not in self.served:
                app = self.config.server.app_name
                handles = await asyncio.to_thread(model_stage_handles, app, name)
                self._on_add(entry.config, handles)
                self.served[name] = entry.config
                logger.info("model %s added: routing requests to it", name)
        for name in list(self.served):
            entry = entries.get(name)
            if entry is None or entry.state == REMOVING:
                self._on_remove(name)
                del self.served[name]
                self._removing.add(name)
                logger.info("model %s is being removed: taking no new requests for it", name)
        for name in list(self._removing):
            if name not in entries:  # deleted
                self._removing.discard(name)
                continue
            held = self._inflight(name)
            await asyncio.to_thread(self.registry.report_inflight, name, self._replica, held)
        # Removing models this replica never served hold nothing here: say so.
        for name, entry in entries.items():
            if entry.state == REMOVING and name not in self._removing:
                self._removing.add(name)
