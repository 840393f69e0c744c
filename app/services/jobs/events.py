"""Fan-out of job events to this replica's WebSocket subscribers.

Every gateway replica holds ONE Redis pub/sub subscription on ``tgw:jobs:events``; whichever replica or
worker finished a job, the finishing script published there, so every replica hears it and hands it to
its local subscribers of that job id. Delivery to a subscriber is ``put_nowait`` on its own queue: a slow
socket can never hold up the hub or other sockets. Pub/sub is at-most-once, so after a reconnect every
watcher is woken to re-read, and watchers re-read the job hash every ~15 s anyway (``JobService.watch``);
the event stream is the fast path, the store the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson

from app.services.jobs.store import EVENTS, JobStore
from app.tasks import stop_task

logger = logging.getLogger(__name__)

Listener = Callable[[str, str], None]  # (job_id, status)
PartialListener = Callable[[str, list[Any]], None]  # (job_id, [{"seq", "result"}, ...])


def _add(table: Any, job_id: str, listener: Any) -> Callable[[], None]:
    """``listener`` added to ``job_id``'s set in ``table`` (a defaultdict of sets); returns what removes it
    (and the set, once empty)."""
    table[job_id].add(listener)

    def unsubscribe() -> None:
        listeners = table.get(job_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                table.pop(job_id, None)

    return unsubscribe


class EventHub:
    def __init__(self, store: JobStore) -> None:
        self.store = store  # its pub/sub uses a client without a socket timeout: the subscription idles
        self._listeners: dict[str, set[Listener]] = defaultdict(set)
        self._partials: dict[str, set[PartialListener]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0

    def subscribe(self, job_id: str, listener: Listener) -> Callable[[], None]:
        return _add(self._listeners, job_id, listener)

    def subscribe_partials(self, job_id: str, listener: PartialListener) -> Callable[[], None]:
        """Partial results of a running job (a decoupled model's responses), as the worker publishes them;
        they never wake the status listeners (no re-read of the job per partial)."""
        return _add(self._partials, job_id, listener)

    def dispatch_partials(self, job_id: str, partials: list[Any]) -> None:
        for listener in list(self._partials.get(job_id, ())):
            try:
                listener(job_id, partials)
            except Exception:
                logger.exception("job partial listener failed")

    def dispatch(self, job_id: str, status: str) -> None:
        for listener in list(self._listeners.get(job_id, ())):
            try:
                listener(job_id, status)
            except Exception:
                logger.exception("job event listener failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-events")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            pubsub: Any = None
            try:
                pubsub = await self.store.events()
                await pubsub.subscribe(EVENTS)
                if self.reconnects:  # events published while we were away are lost: every watcher re-reads
                    for job_id in list(self._listeners):
                        self.dispatch(job_id, "")
                self.reconnects += 1
                self.connected.set()
                backoff = 0.2
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        data = orjson.loads(msg["data"])
                        if "partials" in data:
                            if self._partials:
                                self.dispatch_partials(str(data["job_id"]), list(data["partials"]))
                            continue
                        self.dispatch(str(data["job_id"]), str(data["status"]))
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        logger.warning("ignoring a malformed job event")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                logger.warning("job event subscription lost (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
