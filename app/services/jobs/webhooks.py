"""Webhook deliveries per the Standard Webhooks specification (https://www.standardwebhooks.com/).

Signing is ~10 lines of stdlib HMAC here (verified against the reference ``standardwebhooks`` package in
the tests) so the gateway takes no runtime dependency for it. The delivery schedule lives in a Redis
sorted set (``tgw:webhooks:schedule``): a restart loses nothing, and a dispatcher that dies mid-delivery
only holds its lease for a while. Every attempt carries the same ``webhook-id`` (``msg_<job id>``) and
the same body, so receivers can deduplicate.

A job that asked for them (``"webhook": {"url": ..., "events": ["progress"]}``) also gets ``job.progress``
messages while it runs (a decoupled model's partial results): its worker stores one at most every
``TGW_WEBHOOK_PROGRESS_INTERVAL_S`` (``{tgw:jobs}:job:<id>:progress:<n>``, scheduled as ``<id>.p<n>``),
each carrying the partial results since the previous one; each is signed, retried on the same schedule
and deduplicated by its own ``webhook-id`` (``msg_<job id>_p<n>``), and counted with the rest, never in
the job's delivery log.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson

from app.observability import metrics
from app.services.jobs.ssrf import UnsafeURL, vet_url
from app.services.jobs.store import Job, JobStore, parse_member, progress_member

logger = logging.getLogger(__name__)


def parse_secrets(value: str | None) -> list[bytes]:
    """``whsec_<base64>`` secrets separated by spaces (several during a rotation)."""
    keys = []
    for part in (value or "").split():
        raw = part.removeprefix("whsec_")
        try:
            keys.append(base64.b64decode(raw, validate=True))
        except ValueError:
            raise ValueError(
                "TGW_WEBHOOK_SECRET: expected whsec_<base64> secrets separated by spaces"
            ) from None
    return keys


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per secret, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    sigs = [hmac.new(key, content, hashlib.sha256).digest() for key in keys]
    return " ".join("v1," + base64.b64encode(sig).decode() for sig in sigs)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    refused: bool = False  # the SSRF guard refused the target: never retried


class WebhookSender(Protocol):
    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult: ...


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


class HttpxWebhookSender:
    """Connects to the address the SSRF guard vetted (Host header and TLS SNI keep the real name), never
    follows redirects and reads at most ``max_response_bytes`` of the answer. Three bounds hold a
    delivery's time: the answer's status and headers must arrive within ``first_byte_s`` of the start
    (resolving, connecting and sending count), the answer's body is read for at most ``BODY_S`` after
    that (the status decides the outcome; the body is read only so that the connection can be reused),
    and the WHOLE delivery ends by ``total_s``: a receiver dripping one byte at a time cannot hold a
    delivery slot longer (httpx's read timeout alone restarts on every byte)."""

    BODY_S = 1.0

    def __init__(
        self, client: httpx.AsyncClient, allow_private: bool, max_response_bytes: int, total_s: float,
        allowed_ports: frozenset[int] = frozenset(), first_byte_s: float | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.allow_private = allow_private
        self.max_response_bytes = max_response_bytes
        self.total_s = total_s
        self.first_byte_s = min(total_s, first_byte_s or total_s)
        self.allowed_ports = allowed_ports

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.total_s
        head_deadline = start + self.first_byte_s  # resolving the host counts too
        try:
            async with asyncio.timeout_at(head_deadline):
                target = await vet_url(url, self.allow_private, self.allowed_ports)
        except UnsafeURL as exc:
            return DeliveryResult(error=f"refused: {exc}", refused=True)
        except TimeoutError:
            return DeliveryResult(error=f"timeout: the host did not resolve within {self.first_byte_s:g} s")
        addr = f"[{target.address}]" if ":" in target.address else target.address
        default_port = 443 if target.scheme == "https" else 80
        host = target.host if ":" not in target.host else f"[{target.host}]"
        host_header = host if target.port == default_port else f"{host}:{target.port}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request = self.client.build_request(
            "POST", f"{target.scheme}://{addr}:{target.port}{target.path}", content=body,
            headers={**headers, "Host": host_header, "Content-Type": "application/json"},
            extensions=extensions,
        )  # fmt: skip
        try:
            async with asyncio.timeout_at(head_deadline):
                response = await self.client.send(request, stream=True, follow_redirects=False)
        except TimeoutError:
            return DeliveryResult(error=f"timeout: no answer within {self.first_byte_s:g} s")
        except httpx.TimeoutException as exc:
            return DeliveryResult(error=f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return DeliveryResult(error=f"{type(exc).__name__}: {exc}"[:300])
        status = response.status_code
        retry_after = _retry_after(response.headers.get("retry-after"))
        # The status arrived in time and decides the outcome: the body is read (then dropped) only
        # briefly, and whatever cuts it off (its bound, a reset) changes nothing.
        try:
            with contextlib.suppress(TimeoutError, httpx.HTTPError):
                async with asyncio.timeout_at(min(deadline, loop.time() + self.BODY_S)):
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= self.max_response_bytes:
                            break
        finally:
            with contextlib.suppress(httpx.HTTPError):
                await response.aclose()
        return DeliveryResult(status, retry_after_s=retry_after)


def receiver_host(url: str) -> str:
    """What the per-receiver cap counts by: the URL's host name (lower case)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


@dataclass(slots=True)
class _Claimed:
    job: Job
    host: str
    claimed_at: float  # time.monotonic()
    progress: int | None = None  # a job.progress message's number; None: the job's final delivery

    @property
    def member(self) -> str:
        """Its member of the schedule."""
        return self.job.id if self.progress is None else progress_member(self.job.id, self.progress)


_UNKNOWN_LATENCY_S = 0.01  # a host never measured is assumed fast: deferring it too little costs a re-claim


class WebhookDispatcher:
    """Claims due deliveries from the schedule and sends them, sharing ``concurrency`` slots fairly.

    Claimed deliveries wait here in one queue per owner and receiver host, and a free slot goes round
    robin over the owners (then over each owner's hosts): an owner holds at most its fair share of the
    slots while another owner waits, and never more than ``concurrency - concurrency // 4`` (the rest are
    kept for owners that show up), and at most ``max_per_host`` deliveries go to one host at once. A
    delivery whose host (or owner) is at its cap waits here for a slot of its own (no sleep: it starts
    when one frees), so a fast receiver gets deliveries back to back, while a slow one only ever holds
    its cap. What cannot start soon goes back on the schedule without counting an attempt, for about
    the time the host (or owner) needs to get through what is ahead of it, measured from its recent
    deliveries: claims then reach the deliveries due behind it, for other owners and hosts."""

    def __init__(
        self,
        store: JobStore,
        payload: Any,  # async (Job) -> dict: the job as GET /v1/jobs/{id} shows it
        sender: WebhookSender,
        secrets: list[bytes],
        schedule_s: list[float],
        concurrency: int = 32,
        poll_s: float = 0.25,
        lease_s: float = 120.0,
        max_per_host: int = 4,
        max_defer_s: float = 30.0,
    ) -> None:
        self.store = store
        self.payload = payload
        self.sender = sender
        self.secrets = secrets
        self.schedule_s = schedule_s
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.concurrency = concurrency
        self.max_per_host = max_per_host
        self.max_per_owner = max(1, concurrency - max(1, concurrency // 4))
        self.max_defer_s = max_defer_s
        self.window = 2 * concurrency  # claimed and not finished, at most (in flight + waiting here)
        # waiting here beyond what is in flight, per host and per owner; more go back on the schedule
        self.host_queue = 2 * max_per_host
        self.owner_queue = max(self.host_queue, concurrency)
        self._in_flight = 0
        self._per_host: dict[str, int] = {}
        self._per_owner: dict[str, int] = {}
        # owner -> host -> FIFO; the dicts' order is the round-robin order
        self._waiting: dict[str, dict[str, collections.deque[_Claimed]]] = {}
        self._waiting_host: dict[str, int] = {}
        self._waiting_owner: dict[str, int] = {}
        self._n_waiting = 0
        self._latency: dict[str, float] = {}  # host -> moving average of its deliveries' durations (s)
        self._owner_latency: dict[str, float] = {}
        self._next_free: dict[str, float] = {}  # host or owner -> when what was sent back is due (epoch s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.stopping = False  # draining: no new claims; deliveries under way finish (or ``stop``)

    async def run(self) -> None:
        try:
            while not self.stopping:
                room = self.window - self._in_flight - self._n_waiting
                ids: list[str] = []
                if room > 0:
                    try:
                        ids = await self.store.claim_due_webhooks(self.lease_s, room)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        logger.warning("webhook schedule unavailable: %s", exc)
                if ids:
                    await self._admit(ids)
                self._dispatch()
                if room > 0 and len(ids) == room:
                    continue  # more may be due: claim on
                self._wake.clear()
                # until a delivery ends (room, and what was put back for its host may be due: a fast
                # host's deliveries then follow each other at its pace) or the next poll
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:
            if self.stopping:
                await self._give_back()

    async def _admit(self, ids: list[str]) -> None:
        """Queue claimed deliveries here, or send them back on the schedule for when they can start."""
        members = [parse_member(i) for i in ids]
        try:
            jobs = await asyncio.gather(*(self.store.get(job_id) for job_id, _ in members))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # they come back after their lease
            logger.warning("webhook deliveries unreadable: %s", exc)
            return
        later: dict[str, float] = {}
        drop: list[str] = []
        now, mono = time.time(), time.monotonic()
        for job_id, (_, progress), job in zip(ids, members, jobs, strict=True):
            final_due = job is not None and job.webhook_status in ("pending", "retrying")
            if job is None or not job.webhook_url or (progress is None and not final_due):
                drop.append(job_id)
                continue
            host = receiver_host(job.webhook_url)
            if self.stopping:
                later[job_id] = now
            elif self._held(host, self._waiting_host, self._per_host) >= self.max_per_host + self.host_queue:
                later[job_id] = self._later(host, self._latency, self.max_per_host, self.host_queue, now)
            elif (
                self._held(job.owner, self._waiting_owner, self._per_owner)
                >= self.max_per_owner + self.owner_queue
            ):
                later[job_id] = self._later(
                    job.owner, self._owner_latency, self.max_per_owner, self.owner_queue, now
                )
            else:
                self._queue(_Claimed(job, host, mono, progress))
        with contextlib.suppress(Exception):  # else they return after their lease
            for job_id in drop:
                await self.store.unschedule(job_id)
            if later:
                await self.store.defer_webhooks(later)

    @staticmethod
    def _held(key: str, waiting: dict[str, int], in_flight: dict[str, int]) -> int:
        return waiting.get(key, 0) + in_flight.get(key, 0)

    def _later(self, key: str, latency: dict[str, float], cap: int, ahead: int, now: float) -> float:
        """When a delivery of this host (or owner) that cannot wait here can start: after what is
        waiting and what was already sent back, at the pace its deliveries have been taking."""
        step = latency.get(key, _UNKNOWN_LATENCY_S) / cap
        slot = ("host:" if latency is self._latency else "owner:") + key
        queued = min(self._next_free.get(slot, 0.0), now + self.max_defer_s)
        at = max(queued, now + ahead * step) + step
        self._next_free[slot] = at
        if len(self._next_free) > 4096:
            self._next_free = {k: v for k, v in self._next_free.items() if v > now}
        return min(at, now + self.max_defer_s)

    def _queue(self, item: _Claimed) -> None:
        owner, host = item.job.owner, item.host
        self._waiting.setdefault(owner, {}).setdefault(host, collections.deque()).append(item)
        self._waiting_host[host] = self._waiting_host.get(host, 0) + 1
        self._waiting_owner[owner] = self._waiting_owner.get(owner, 0) + 1
        self._n_waiting += 1

    def _owner_may_start(self, owner: str, above_share: bool) -> bool:
        held = self._per_owner.get(owner, 0)
        if held >= self.max_per_owner:
            return False
        if above_share:
            return True
        active = len(self._waiting.keys() | self._per_owner.keys())
        return held < max(1, self.concurrency // max(1, active))

    def _dispatch(self) -> None:
        """Start waiting deliveries while slots are free: round robin over the owners, each within its
        fair share first; then, slots still free and nothing else able to start, above it."""
        for above_share in (False, True):
            started = True
            while started and self._in_flight < self.concurrency and self._n_waiting:
                started = False
                for owner in list(self._waiting):
                    if self._in_flight >= self.concurrency:
                        return
                    if self._owner_may_start(owner, above_share) and self._start_one(owner):
                        started = True
                        self._waiting[owner] = self._waiting.pop(owner)  # to the back of the round
                        if not self._waiting[owner]:
                            del self._waiting[owner]

    def _start_one(self, owner: str) -> bool:
        hosts = self._waiting[owner]
        for host in list(hosts):
            if self._per_host.get(host, 0) >= self.max_per_host:
                continue
            queue = hosts.pop(host)
            item = queue.popleft()
            if queue:
                hosts[host] = queue  # to the back of this owner's round
            self._waiting_host[host] -= 1
            if not self._waiting_host[host]:
                del self._waiting_host[host]
            self._waiting_owner[owner] -= 1
            if not self._waiting_owner[owner]:
                del self._waiting_owner[owner]
            self._n_waiting -= 1
            self._in_flight += 1
            self._per_host[host] = self._per_host.get(host, 0) + 1
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
            task = asyncio.create_task(self._guarded(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True
        return False

    async def _guarded(self, item: _Claimed) -> None:
        job_id, host, owner = item.job.id, item.host, item.job.owner
        started = time.monotonic()
        try:
            if started - item.claimed_at > self.lease_s / 2:  # its lease may run out under way: re-claim
                await self.store.defer_webhooks({item.member: time.time()})
            elif item.progress is not None:
                await self._attempt_progress(item.job, item.progress)
            else:
                await self._attempt(item.job)
        except Exception:
            logger.exception("webhook delivery for job %s failed; it returns after its lease", job_id)
        finally:
            took = time.monotonic() - started
            for key, table in ((host, self._latency), (owner, self._owner_latency)):
                before = table.pop(key, None)  # re-inserted last: the oldest entries are trimmed
                table[key] = took if before is None else 0.7 * before + 0.3 * took
                if len(table) > 4096:
                    del table[next(iter(table))]
            self._in_flight -= 1
            for key, counts in ((host, self._per_host), (owner, self._per_owner)):
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]
            if not self.stopping:
                self._dispatch()
            self._wake.set()

    async def _give_back(self) -> None:
        """Draining: what was claimed and has not started goes back on the schedule now, for another
        replica to take at once (not after its lease)."""
        ids = {i.member: time.time() for hosts in self._waiting.values() for q in hosts.values() for i in q}
        self._waiting.clear()
        self._waiting_host.clear()
        self._waiting_owner.clear()
        self._n_waiting = 0
        if ids:
            with contextlib.suppress(Exception):
                await self.store.defer_webhooks(ids)

    def _headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        ts = int(time.time())
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
        if self.secrets:
            headers["webhook-signature"] = sign(self.secrets, msg_id, ts, body)
        return headers

    def _next_attempt(self, attempt: int, res: DeliveryResult) -> tuple[str, str, float | None]:
        """(outcome, state, next attempt at) of an attempt: the same rules for every message."""
        code = res.status_code
        if code is not None and 200 <= code < 300:
            outcome, state = "delivered", "delivered"
        elif code == 410:
            outcome, state = "gone", "stopped"
        elif res.refused or (code is not None and 300 <= code < 500 and code != 429):  # no redirects
            outcome, state = "failed", "dead"
        elif attempt > len(self.schedule_s):
            outcome, state = "dead", "dead"
        else:
            outcome, state = "retry", "retrying"
        next_at = None
        if state == "retrying":
            delay = self.schedule_s[attempt - 1] * random.uniform(0.8, 1.2)
            if res.retry_after_s is not None:
                delay = max(delay, min(res.retry_after_s, 86400.0))
            next_at = time.time() + delay
        return outcome, state, next_at

    async def _attempt_progress(self, job: Job, n: int) -> None:
        """One attempt of a ``job.progress`` message: the body stored by the worker, its own id."""
        assert job.webhook_url is not None
        stored = await self.store.progress(job.id, n)
        if stored is None:  # delivered or given up meanwhile, or expired
            await self.store.unschedule(progress_member(job.id, n))
            return
        body, attempts = stored
        attempt = attempts + 1
        res = await self.sender.send(job.webhook_url, body, self._headers(f"msg_{job.id}_p{n}", body))
        outcome, _state, next_at = self._next_attempt(attempt, res)
        await self.store.record_progress(job.id, n, attempt, outcome, next_at)
        metrics.record_webhook_delivery(outcome)
        logger.info("progress webhook %d for job %s attempt %d: %s", n, job.id, attempt, outcome)

    async def _attempt(self, job: Job) -> None:
        job_id = job.id
        assert job.webhook_url is not None
        attempt = job.webhook_attempts + 1
        view = await self.payload(job)
        built = orjson.dumps(
            {"type": f"job.{job.status}", "timestamp": view.get("finished_at"), "data": view}
        )
        body = await self.store.webhook_body(job_id, built)
        started = time.monotonic()
        res = await self.sender.send(job.webhook_url, body, self._headers(f"msg_{job_id}", body))
        code = res.status_code
        outcome, state, next_at = self._next_attempt(attempt, res)
        record = {
            "attempt": attempt, "at": time.time(), "status_code": code, "error": res.error,
            "outcome": outcome, "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "next_attempt_at": next_at,
        }  # fmt: skip
        await self.store.record_delivery(job_id, record, state, next_at)
        if state == "dead":
            reason = f"webhook: {res.error or f'HTTP {code}'} after {attempt} attempts"
            await self.store.dead_letter_webhook(job_id, reason)
        metrics.record_webhook_delivery(outcome)
        logger.info("webhook for job %s attempt %d: %s", job_id, attempt, outcome)

    async def stop(self) -> None:
        self.stopping = True
        await self._give_back()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
