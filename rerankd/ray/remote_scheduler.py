"""The ingress side of several models: `RemoteScheduler` stands in for a model's Scheduler
inside the ingress's `RerankService` and sends token ids to that model's engine deployment
(`EngineReplica` in rerankd.ray.replicas), which runs the real Scheduler.

It knows nothing of HTTP: errors leave as rerankd's domain errors, which the app maps to
statuses as in the single process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from rerankd.errors import InferenceFailed, Overloaded, RerankdError, ShuttingDown
from rerankd.types import EncodedPair

log = logging.getLogger(__name__)


class ReplicaUnavailable(ShuttingDown):
    """An engine replica stopped (died, replaced, scaled down) before answering; the same
    503 JSON with Retry-After as a draining server's, since a retry will find another."""


class RemoteScheduler:
    """What `RerankService` needs of a Scheduler (`start`, `submit`, `stop`), served by a
    model's engine deployment: token ids go there, raw scores come back.

    A rerankd error raised in the engine replica (`Overloaded`, `ShuttingDown`,
    `InferenceFailed`, ...) is raised here as itself, so the client gets the single process's
    status and JSON. A replica lost before answering is asked again once, on the replica
    Serve picks then (scoring has no side effects), then it is a 503. A cancelled request
    (client gone, --request-timeout) is cancelled in the engine too: its pairs leave the queue.
    """

    RETRIES = 1

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        #: one per submit waiting for its engine: `abort` fails them
        self._gates: set[asyncio.Future] = set()

    def start(self) -> None:
        """Nothing to start: the engine deployment runs its own scheduler."""

    async def stop(self) -> None:
        """Nothing to stop: Serve drains the engine deployment itself."""

    def abort(self, exc: Exception) -> int:
        """Fail every submit still waiting for its engine with `exc` (the drain ran out of
        time; `RerankService.abort_in_flight`); their engine calls are cancelled."""
        aborted = 0
        for gate in list(self._gates):
            if not gate.done():
                gate.set_exception(exc)
                aborted += 1
        return aborted

    async def submit(self, pairs: list[EncodedPair]) -> list[float]:
        if not pairs:
            return []
        gate = asyncio.get_running_loop().create_future()
        call = asyncio.ensure_future(self._submit(pairs))
        self._gates.add(gate)
        try:
            await asyncio.wait({gate, call}, return_when=asyncio.FIRST_COMPLETED)
            if gate.done():
                call.cancel()
                return gate.result()  # raises what `abort` set
            return call.result()
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            self._gates.discard(gate)
            if not gate.done():
                gate.cancel()

    async def _submit(self, pairs: list[EncodedPair]) -> list[float]:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        attempt = 0
        while True:
            response = self.engine.submit.remote(pairs)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, RerankdError):
                    raise cause from None
                raise InferenceFailed(
                    f"the engine of {self.model_name!r} failed on this request: "
                    f"{type(cause or exc).__name__}: {cause or exc}"
                ) from exc
            except BackPressureError as exc:
                raise Overloaded(
                    f"the engines of {self.model_name!r} are busy ({exc.message}); retry shortly"
                ) from exc
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                if attempt >= self.RETRIES:
                    raise ReplicaUnavailable(
                        f"the engine replicas of {self.model_name!r} stopped before answering "
                        f"({type(exc).__name__}); the request was not completed: retry it"
                    ) from exc
                attempt += 1
                log.warning("an engine replica of %r was lost; asking again", self.model_name)
                await asyncio.sleep(0.2)
