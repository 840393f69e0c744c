"""Webhook deliveries per the Standard Webhooks specification (https://www.standardwebhooks.com/).

Signing is ~10 lines of stdlib HMAC here (verified against the reference ``standardwebhooks`` package in
the tests) so the gateway takes no runtime dependency for it. The delivery schedule lives in a Redis
sorted set (``tgw:webhooks:schedule``): a restart loses nothing, and a dispatcher that dies mid-delivery
only holds its lease for a while. Every attempt carries the same ``webhook-id`` (``msg_<job id>``) and
the same body, so receivers can deduplicate.
"""

from __future__ import annotations

import asyncio
import base64
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
from app.services.jobs.store import Job, JobStore

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
    follows redirects, reads at most ``max_response_bytes`` of the answer, and bounds the WHOLE delivery
    (connect, send, headers, body) by ``total_s``: a receiver dripping one byte at a time cannot hold it
    longer (httpx's read timeout alone restarts on every byte)."""

    def __init__(
        self, client: httpx.AsyncClient, allow_private: bool, max_response_bytes: int, total_s: float,
        allowed_ports: frozenset[int] = frozenset(),
    ) -> None:  # fmt: skip
        self.client = client
        self.allow_private = allow_private
        self.max_response_bytes = max_response_bytes
        self.total_s = total_s
        self.allowed_ports = allowed_ports

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult:
        deadline = asyncio.get_running_loop().time() + self.total_s  # resolving the host counts too
        try:
            async with asyncio.timeout_at(deadline):
                target = await vet_url(url, self.allow_private, self.allowed_ports)
        except UnsafeURL as exc:
            return DeliveryResult(error=f"refused: {exc}", refused=True)
        except TimeoutError:
            return DeliveryResult(error=f"timeout: the host did not resolve within {self.total_s:g} s")
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
        status: int | None = None
        retry_after: float | None = None
        try:
            async with asyncio.timeout_at(deadline):
                response = await self.client.send(request, stream=True, follow_redirects=False)
                status = response.status_code
                retry_after = _retry_after(response.headers.get("retry-after"))
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= self.max_response_bytes:
                            break
                finally:
                    await response.aclose()
        except TimeoutError:
            if status is None:
                return DeliveryResult(error=f"timeout: no answer within {self.total_s:g} s")
            # the status arrived in time; only the body was cut off at the bound
        except httpx.TimeoutException as exc:
            return DeliveryResult(error=f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return DeliveryResult(error=f"{type(exc).__name__}: {exc}"[:300])
        return DeliveryResult(status, retry_after_s=retry_after)


def receiver_host(url: str) -> str:
    """What the per-receiver cap counts by: the URL's host name (lower case)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


class WebhookDispatcher:
    """Claims due deliveries from the schedule and sends them, ``concurrency`` at once in all and at
    most ``max_per_host`` to one receiver host: a delivery whose host is at its cap goes back on the
    schedule for ``defer_s`` (no attempt counted) instead of holding a slot, so slow receivers cannot
    starve the others."""

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
        defer_s: float = 1.0,
    ) -> None:
        self.store = store
        self.payload = payload
        self.sender = sender
        self.secrets = secrets
        self.schedule_s = schedule_s
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.max_per_host = max_per_host
        self.defer_s = defer_s
        self._slots = asyncio.Semaphore(concurrency)
        self._per_host: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopping = False  # draining: no new claims; deliveries under way finish (or ``stop``)

    async def run(self) -> None:
        while not self.stopping:
            try:
                free = max(1, self._slots._value)  # claim only what we can start now
                ids = await self.store.claim_due_webhooks(self.lease_s, free)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("webhook schedule unavailable: %s", exc)
                ids = []
            for job_id in ids:  # claimed: each is sent, even if draining began meanwhile
                await self._slots.acquire()
                task = asyncio.create_task(self._guarded(job_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not ids:
                await asyncio.sleep(self.poll_s)

    async def _guarded(self, job_id: str) -> None:
        try:
            await self.deliver(job_id)
        except Exception:
            logger.exception("webhook delivery for job %s failed; it returns after its lease", job_id)
        finally:
            self._slots.release()

    async def deliver(self, job_id: str) -> None:
        job = await self.store.get(job_id)
        if job is None or job.webhook_status not in ("pending", "retrying") or not job.webhook_url:
            await self.store.unschedule(job_id)
            return
        host = receiver_host(job.webhook_url)
        if self._per_host.get(host, 0) >= self.max_per_host:
            await self.store.defer_webhook(job_id, time.time() + self.defer_s)
            return
        self._per_host[host] = self._per_host.get(host, 0) + 1
        try:
            await self._attempt(job)
        finally:
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

    async def _attempt(self, job: Job) -> None:
        job_id = job.id
        assert job.webhook_url is not None
        attempt = job.webhook_attempts + 1
        view = await self.payload(job)
        built = orjson.dumps(
            {"type": f"job.{job.status}", "timestamp": view.get("finished_at"), "data": view}
        )
        body = await self.store.webhook_body(job_id, built)
        msg_id = f"msg_{job_id}"
        ts = int(time.time())
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
        if self.secrets:
            headers["webhook-signature"] = sign(self.secrets, msg_id, ts, body)
        started = time.monotonic()
        res = await self.sender.send(job.webhook_url, body, headers)
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
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
