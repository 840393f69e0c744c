"""Builds and owns the job machinery for one process: created in the app lifespan, held on ``app.state``.

Every gateway replica gets the store, the service and the event hub; with ``TGW_WORKER_IN_PROCESS``
(on under ``tgw up``, and in ``tgw worker``) it also runs a worker and the webhook dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.clients.redis import warm_up
from app.observability.metrics import JobsSnapshot
from app.observability.requests import Requests
from app.services.inference import InferenceService
from app.services.jobs.events import EventHub
from app.services.jobs.service import JobService
from app.services.jobs.sockets import JobSockets, SocketLimits
from app.services.jobs.store import JobStore
from app.services.jobs.webhooks import HttpxWebhookSender, WebhookDispatcher, parse_secrets
from app.services.jobs.worker import JobWorker
from app.services.offload import INLINE, Offload
from app.settings import JobsSettings

logger = logging.getLogger(__name__)


class JobsRuntime:
    def __init__(
        self, settings: JobsSettings, inference: InferenceService, offload: Offload = INLINE,
        requests: Requests | None = None, *, redis_url: str, redis_cluster: bool, retry_after_s: int,
        triton_timeout_s: float, stream_max_s: float = 0.0,
    ) -> None:  # fmt: skip
        """``settings``: the jobs group; ``redis_url``: the jobs Redis (``Settings.jobs_redis_address``, one
        that never evicts); the rest come from other groups (TGW_REDIS_CLUSTER, TGW_RETRY_AFTER_S,
        TGW_TRITON_TIMEOUT_S, TGW_STREAM_MAX_DURATION_S)."""
        url = redis_url
        self.settings = settings
        # A pooled connection that died with a Redis restart is retried once on a fresh one (never a
        # stall: a timeout is not retried, it becomes a 503 at once), and idle ones are checked first.
        # Blocking reads (XREADGROUP BLOCK, pub/sub) use a second client without a socket timeout.
        # On a Cluster every job key shares the hash tag {tgw:jobs}, so each script runs on one shard.
        client: Any = RedisCluster if redis_cluster else Redis
        self.redis: Any = client.from_url(
            url, socket_timeout=settings.jobs_redis_timeout_s,
            socket_connect_timeout=settings.jobs_redis_timeout_s, health_check_interval=5,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )  # fmt: skip
        self.blocking: Any = client.from_url(
            url, socket_timeout=None, socket_connect_timeout=5, health_check_interval=30
        )
        self.store = JobStore(self.redis, settings.job_ttl_s, self.blocking)
        self.hub = EventHub(self.store)
        ports = frozenset(settings.webhook_allowed_ports)
        self.service = JobService(
            self.store, inference, settings.queue_max, retry_after_s, settings.webhook_allow_private,
            ports, self.hub, settings.job_max_body_bytes, offload,
        )  # fmt: skip
        self.sockets = JobSockets(
            self.service, inference,
            SocketLimits(settings.ws_send_queue, settings.ws_heartbeat_s, settings.ws_max_in_flight,
                         settings.ws_max_frame_bytes),
            offload, requests,
        )  # fmt: skip
        self.worker: JobWorker | None = None
        self.dispatcher: WebhookDispatcher | None = None
        self.http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        secrets = parse_secrets(settings.webhook_secret)
        if settings.job_worker_in_process:
            # An attempt's last-resort bound: the Triton deadline plus a full store outage on each of
            # its store steps, with room to spare; only a stuck attempt ever reaches it.
            # A decoupled model's job lasts up to the longest stream (TGW_STREAM_MAX_DURATION_S).
            longest = max(triton_timeout_s, stream_max_s)
            attempt_s = longest + 4 * settings.job_store_retry_s + 60
            self.worker = JobWorker(
                self.store, inference, settings.job_worker_concurrency, settings.job_claim_idle_s,
                settings.job_max_attempts, store_retry_s=settings.job_store_retry_s,
                attempt_timeout_s=attempt_s, offload=offload, requests=requests, hub=self.hub,
                stream_max_bytes=settings.job_stream_max_bytes,
                partial_interval_s=settings.job_partial_interval_s,
                progress_interval_s=settings.webhook_progress_interval_s,
            )  # fmt: skip
            t = settings.webhook_timeout_s
            self.http = httpx.AsyncClient(
                timeout=httpx.Timeout(t, connect=min(t, 5.0)), follow_redirects=False, trust_env=False,
                limits=httpx.Limits(
                    max_connections=max(64, settings.webhook_concurrency), max_keepalive_connections=16
                ),
            )  # fmt: skip
            sender = HttpxWebhookSender(
                self.http,
                settings.webhook_allow_private,
                settings.webhook_max_response_bytes,
                t,
                ports,
                first_byte_s=settings.webhook_first_byte_s,
            )
            self.dispatcher = WebhookDispatcher(
                self.store, self.service.view, sender, secrets, settings.webhook_schedule_s,
                concurrency=settings.webhook_concurrency, lease_s=4 * t + 30,
                max_per_host=settings.webhook_max_per_host,
            )  # fmt: skip
            if not secrets:
                logger.warning("TGW_WEBHOOK_SECRET is not set: webhook deliveries go out unsigned")

    async def start(self) -> None:
        self.hub.start()
        self._tasks.append(asyncio.create_task(self._ensure_groups(), name="job-groups"))
        if self.worker is not None:
            self._tasks.append(asyncio.create_task(self.worker.run(), name="job-worker"))
        if self.dispatcher is not None:
            self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="webhook-dispatcher"))

    async def metrics_snapshot(self) -> JobsSnapshot:
        """For the Prometheus collector, read at scrape time (cluster-wide, from Redis)."""
        stats = await self.store.stats()
        return JobsSnapshot(float(stats["queue_depth"]), float(stats["oldest_pending_age_seconds"]))

    def begin_drain(self) -> None:
        """SIGTERM, or the application shutting down: the in-process worker stops taking new entries and
        the dispatcher stops claiming deliveries (those under way finish in ``stop``)."""
        if self.worker is not None:
            self.worker.stopping = True
        if self.dispatcher is not None:
            self.dispatcher.stopping = True

    async def _ensure_groups(self) -> None:
        """Create the consumer group at start-up (autoscalers read its lag before any worker runs). On a
        Cluster both clients learn the slot map first (a fresh one races under a burst: app/clients/redis)."""
        await warm_up(self.redis)
        await warm_up(self.blocking)
        try:
            await self.store.ensure_groups()
        except Exception as exc:
            logger.warning("could not create the job consumer group yet (%s); workers will", exc)

    async def stop(self, drain_s: float = 0.0) -> None:
        if self.worker is not None and drain_s > 0:
            await self.worker.drain(drain_s)
        for task in self._tasks:
            task.cancel()
        if self.worker is not None:
            for task in list(self.worker._active.values()):
                task.cancel()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.hub.stop()
        if self.http is not None:
            await self.http.aclose()
        await self.redis.aclose()
        await self.blocking.aclose()
