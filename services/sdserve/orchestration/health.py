"""Whether each served model can serve now: every one of its stages answers a bounded probe.

What gRPC's Health/Check and Watch and the HTTP API's `/healthz` report. A probe asks each stage
of a model for its `Info` (`StageClient.stage_infos`, all its stages at once) and counts the
model healthy when all answer within `timeout_s`. A killed replica makes its stage's call fail
or hang: either way the model is unhealthy within `timeout_s`, and healthy again when Serve has
restored the replica. Answers are cached for `ttl_s` so that health checkers polling often (a
load balancer every second, Kubernetes probes, many Watch streams) cost one probe per second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from sdserve.orchestration.client import StageClient

logger = logging.getLogger(__name__)


class StageHealth:
    """Probes the stages of every served model, at most once per `ttl_s`."""

    def __init__(
        self, clients: Mapping[str, StageClient], *, ttl_s: float = 1.0, timeout_s: float = 2.0
    ):
        self.clients = dict(clients)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._checked: dict[str, tuple[float, bool]] = {}  # model -> (monotonic time, healthy)
        self._probes: dict[str, asyncio.Task] = {}  # one probe in flight per model

    async def healthy(self, model: str) -> bool:
        """Whether every stage of `model` answered its latest probe (at most `ttl_s` old)."""
        checked = self._checked.get(model)
        if checked is not None and time.monotonic() - checked[0] < self.ttl_s:
            return checked[1]
        probe = self._probes.get(model)
        if probe is None or probe.done():
            probe = self._probes[model] = asyncio.ensure_future(self._probe(model))
        return await asyncio.shield(probe)  # a caller that leaves does not cancel the probe

    async def all_healthy(self) -> bool:
        """Whether every served model is healthy."""
        return all(await asyncio.gather(*(self.healthy(m) for m in self.clients)))

    async def _probe(self, model: str) -> bool:
        try:
            await asyncio.wait_for(self.clients[model].stage_infos(), self.timeout_s)
            healthy = True
        except Exception as exc:  # a dead, hung or failing stage: not serving
            if isinstance(exc, asyncio.TimeoutError):
                exc = TimeoutError(f"no answer in {self.timeout_s:g} s")
            healthy = False
            was = self._checked.get(model, (0.0, True))[1]
            log = logger.warning if was else logger.debug
            log("model %s is not serving: a stage did not answer its probe (%s)", model, exc)
        if healthy and not self._checked.get(model, (0.0, True))[1]:
            logger.info("model %s is serving again: every stage answers", model)
        self._checked[model] = (time.monotonic(), healthy)
        return healthy
