"""Jobs, pure logic: webhook signing (checked by the reference Standard Webhooks library), the SSRF address
and port rules, the job record and its compact inputs, what is retried, per-host webhook caps, and the
package's shape (only the store talks to Redis; the WebSocket router is thin)."""

from __future__ import annotations

import ast
import asyncio
import base64
import ipaddress
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.errors import InvalidInput, ServiceUnavailable, UpstreamError
from app.services.jobs.runtime import JobsRuntime
from app.services.jobs.ssrf import UnsafeURL, literal_ip, parse_url, unsafe_reason, vet_url
from app.services.jobs.store import Job, JobStatus, decode_inputs, encode_inputs, new_job_id, valid_job_id
from app.services.jobs.webhooks import DeliveryResult, WebhookDispatcher, _retry_after, parse_secrets, sign
from app.services.jobs.worker import client_error
from app.settings import Settings
from tests.eventually import eventually_async

SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 24).decode()


def test_signature_verifies_with_standardwebhooks_for_every_rotated_secret() -> None:
    keys = parse_secrets(f"{SECRET_A} {SECRET_B}")
    body = b'{"type":"job.succeeded","data":{"id":"x"}}'
    import time

    ts = int(time.time())
    headers = {
        "webhook-id": "msg_x",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(keys, "msg_x", ts, body),
    }
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded", "data": {"id": "x"}}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"c" * 32).decode()).verify(body, headers)
    with pytest.raises(ValueError):
        parse_secrets("whsec_not*base64")


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254",
        "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "2002:a00:1::",
        "2001:0:4136:e378:8000:63bf:80ff:fffe", "64:ff9b::7f00:1", "100.100.100.200",
    ],
)  # fmt: skip
def test_internal_addresses_are_refused(ip: str) -> None:
    assert unsafe_reason(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert unsafe_reason(ipaddress.ip_address(ip)) is None


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "0177.0.0.1", "0x7f000001", "127.1", "[::ffff:7f00:1]"]
)
def test_encoded_ipv4_forms_are_decoded(host: str) -> None:
    ip = literal_ip(host)
    assert ip is not None and unsafe_reason(ip) is not None


async def test_vet_url_rules() -> None:
    for url in [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@8.8.8.8/",
        "http:///x",
        "gopher://a",
    ]:
        with pytest.raises(UnsafeURL):
            await vet_url(url)
    with pytest.raises(UnsafeURL, match="port 8443 is not allowed"):
        await vet_url("https://8.8.8.8:8443/hook?x=1")
    for url in ["http://8.8.8.8:6379/", "http://8.8.8.8:22/", "https://[::1/", "http://[::1/"]:
        with pytest.raises(UnsafeURL):
            await vet_url(url)
    assert (await vet_url("http://8.8.8.8/")).port == 80
    target = await vet_url("https://8.8.8.8:8443/hook?x=1", allowed_ports={8443})
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https",
        "8.8.8.8",
        8443,
        "/hook?x=1",
        "8.8.8.8",
    )
    with pytest.raises(UnsafeURL, match="loopback"):
        await vet_url("http://localhost:9/", allowed_ports={9})
    with pytest.raises(UnsafeURL, match="port 9 is not allowed"):  # private allowed, the port is not
        await vet_url("http://localhost:9/", allow_private=True)
    target = await vet_url("http://localhost:9/", allow_private=True, allowed_ports={9})
    assert target.address in ("127.0.0.1", "::1")
    assert parse_url("http://EXAMPLE.com")[1:] == ("example.com", 80, "/")


def test_retry_after_parsing() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_sender_vets_again_at_delivery_time() -> None:
    import httpx

    from app.services.jobs.webhooks import HttpxWebhookSender

    async with httpx.AsyncClient() as client:
        result = await HttpxWebhookSender(client, False, 1024, 5.0, frozenset({9})).send(
            "http://localhost:9/x", b"{}", {}
        )
    assert result.refused and result.status_code is None and "loopback" in (result.error or "")


# --- the jobs package's shape (issue 10: jobs encapsulated) -----------------------------------------
JOBS_CODE = Path(__file__).resolve().parents[2] / "app"


def _redis_touches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"imports {n}" for n in names if n.split(".")[0] == "redis"]
        elif isinstance(node, ast.Attribute) and node.attr in ("redis", "blocking"):
            found.append(f"uses .{node.attr} (line {node.lineno})")
    return found


def test_only_the_job_store_talks_to_redis() -> None:
    files = [*sorted((JOBS_CODE / "services" / "jobs").glob("*.py")), JOBS_CODE / "frontends" / "jobs" / "routes.py",
             JOBS_CODE / "frontends" / "ws" / "routes.py"]  # fmt: skip
    exempt = {"store.py", "runtime.py"}  # the store; the runtime only builds the clients it hands it
    touches = {f.name: t for f in files if f.name not in exempt and (t := _redis_touches(f))}
    assert touches == {}


def test_the_websocket_router_is_thin() -> None:
    tree = ast.parse((JOBS_CODE / "frontends" / "ws" / "routes.py").read_text())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    functions = [n.name for n in tree.body if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)]
    assert classes == [] and functions == ["job_socket", "multiplexed_socket"]


def test_job_record_round_trip_and_missing_status() -> None:
    job = Job(
        id=new_job_id(), owner="t1", status=JobStatus.SUCCEEDED, model="m", version="2", priority="high",
        created_at=1.5, finished_at=2.5, request_id="rid", spec=b'{"outputs":null}', result=b'{"a":1}',
        cache="HIT", webhook_url="https://example.com/h",
    )  # fmt: skip
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in job.fields().items()}
    back = Job.from_hash(raw)
    assert back is not None
    assert (back.id, back.owner, back.status, back.version, back.result, back.cache, back.finished_at) == (
        job.id, "t1", JobStatus.SUCCEEDED, "2", b'{"a":1}', "HIT", 2.5,
    )  # fmt: skip
    assert Job.from_hash({}) is None
    assert Job.from_hash({b"webhook_status": b"retrying"}) is None  # never read as "queued"
    assert {s for s in JobStatus if s.terminal} == {"succeeded", "failed", "cancelled"}


def test_job_ids_are_only_what_the_gateway_issues() -> None:
    assert valid_job_id(new_job_id())
    for bad in ("x", "0" * 31, "0" * 32 + ":deliveries", "A" * 32, "", "0" * 33):
        assert not valid_job_id(bad)


def test_inputs_are_stored_as_tensor_bytes() -> None:
    inputs = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([[1, -2]], dtype=np.int64),
        "c": np.array([[b"x", "é".encode()]], dtype=np.object_),
    }
    blob = encode_inputs(inputs, {"a": "FP32", "b": "INT64", "c": "BYTES"})
    assert len(blob) < 24 + 16 + 14 + 200  # raw bytes plus a small header, no JSON numbers
    back, datatypes = decode_inputs(blob)
    assert datatypes == {"a": "FP32", "b": "INT64", "c": "BYTES"}
    for name, arr in inputs.items():
        assert back[name].shape == arr.shape and back[name].tolist() == arr.tolist()


def test_client_errors_are_not_retried() -> None:
    assert client_error(InvalidInput("bad"))
    assert client_error(UpstreamError("x", {"grpc_status": "INVALID_ARGUMENT"}))
    assert client_error(UpstreamError("x", {"http_status": 400}))
    assert not client_error(UpstreamError("x", {"grpc_status": "INTERNAL"}))
    assert not client_error(UpstreamError("x", {"http_status": 500}))
    assert not client_error(ServiceUnavailable("down"))


class _Store:
    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs, self.deferred, self.recorded = jobs, {}, []
        self.due: list[str] = []

    async def claim_due_webhooks(self, lease_s: float, limit: int) -> list[str]:
        ids, self.due = self.due[:limit], self.due[limit:]
        return ids

    async def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def defer_webhooks(self, due: dict[str, float]) -> None:
        self.deferred.update(due)

    async def webhook_body(self, job_id: str, build: bytes) -> bytes:
        return build

    async def record_delivery(self, job_id: str, attempt: Any, state: str, next_at: Any) -> None:
        self.recorded.append((job_id, state))

    async def unschedule(self, job_id: str) -> None:
        pass


class _SlowSender:
    """Holds every delivery to a host named ``slow…`` until released; others answer at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sending: list[str] = []
        self.active = self.most = 0

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult:
        self.sending.append(url)
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            if "//slow" in url:
                await self.release.wait()
            else:
                await asyncio.sleep(0.001)
        finally:
            self.active -= 1
        return DeliveryResult(200)


def _hook_job(host: str, owner: str = "") -> Job:
    return Job(
        id=new_job_id(), owner=owner, status=JobStatus.SUCCEEDED, model="m", version=None, priority="normal",
        created_at=1.0, webhook_url=f"https://{host}/h", webhook_status="pending",
    )  # fmt: skip


async def _view(j: Job) -> dict[str, Any]:
    return {"id": j.id}


async def test_a_busy_receiver_host_waits_for_its_own_slot_without_holding_others() -> None:
    """Past its cap a host's deliveries wait in the dispatcher (no deferral sleep: each starts as soon as
    one of the host's slots frees), and another host's delivery starts at once."""
    jobs = [_hook_job("slow.example") for _ in range(5)] + [_hook_job("other.example")]
    store, sender = _Store({j.id: j for j in jobs}), _SlowSender()
    store.due = [j.id for j in jobs]
    dispatcher = WebhookDispatcher(store, _view, sender, [], [1.0], max_per_host=2, poll_s=0.01)  # type: ignore[arg-type]
    running = asyncio.create_task(dispatcher.run())
    # other.example, while slow.example holds two
    await eventually_async(lambda: len(store.recorded) == 1, 10, 0.002)
    assert sender.sending.count("https://slow.example/h") == 2 and not store.deferred
    sender.release.set()
    await eventually_async(lambda: len(store.recorded) == 6, 10, 0.002)
    assert sender.most == 3 and not store.deferred  # never more than 2 to slow.example, nothing deferred
    dispatcher.stopping = True
    await asyncio.wait_for(running, 1.0)


async def test_slots_are_shared_across_owners() -> None:
    """One owner's many slow hosts fill at most 3/4 of the slots; another owner's deliveries start at once
    and take the freed slots first (the first owner is above its fair share)."""
    slow = [_hook_job(f"slow{i}.example", owner="a") for i in range(40)]
    fast = [_hook_job("fast.example", owner="b") for _ in range(10)]
    store, sender = _Store({j.id: j for j in slow + fast}), _SlowSender()
    store.due = [j.id for j in slow]
    dispatcher = WebhookDispatcher(store, _view, sender, [], [1.0], concurrency=8, poll_s=0.01)  # type: ignore[arg-type]
    running = asyncio.create_task(dispatcher.run())
    await eventually_async(lambda: sender.active == 6, 10, 0.002)
    await asyncio.sleep(0.05)  # a real wait: and no more start meanwhile
    assert sender.active == 6 and dispatcher.max_per_owner == 6  # 2 slots kept for other owners
    assert len(store.deferred) == 40 - 6 - dispatcher.owner_queue  # the rest went back on the schedule
    store.due = [j.id for j in fast]
    # owner b: all delivered while a's 6 still hang
    await eventually_async(lambda: len(store.recorded) == 10, 10, 0.002)
    assert {i for i, _ in store.recorded} == {j.id for j in fast} and sender.active == 6
    sender.release.set()
    await eventually_async(lambda: len(store.recorded) == 10 + 6 + dispatcher.owner_queue, 10, 0.002)
    dispatcher.stopping = True
    await asyncio.wait_for(running, 1.0)


async def test_deferred_deliveries_are_spread_by_the_hosts_pace_and_draining_gives_back() -> None:
    jobs = [_hook_job("slow.example") for _ in range(12)]
    store, sender = _Store({j.id: j for j in jobs}), _SlowSender()
    store.due = [j.id for j in jobs]
    dispatcher = WebhookDispatcher(store, _view, sender, [], [1.0], max_per_host=2, poll_s=0.01)  # type: ignore[arg-type]
    dispatcher._latency["slow.example"] = 4.0  # measured: 2 s per delivery and slot
    running = asyncio.create_task(dispatcher.run())
    await eventually_async(lambda: len(store.deferred) == 12 - 2 - dispatcher.host_queue, 10, 0.002)
    now = time.time()
    later = sorted(store.deferred.values())
    # behind the 4 waiting here, at 2 s a delivery: the first due in ~10 s, each next one 2 s later
    assert 9 < later[0] - now < 11 and all(1.9 < b - a < 2.1 for a, b in itertools.pairwise(later))
    assert later[-1] - now <= dispatcher.max_defer_s
    dispatcher.stopping = True
    dispatcher._wake.set()
    await asyncio.wait_for(running, 1.0)
    waiting = [j.id for j in jobs if j.id not in store.deferred]
    assert len(waiting) == 2  # only the two under way were not given back
    sender.release.set()
    await dispatcher.stop()


def test_every_job_key_shares_one_cluster_slot() -> None:
    from redis.crc import key_slot

    from app.services.jobs import store

    job_id = new_job_id()
    keys = [
        store.STREAM, store.STREAM_HIGH, store.DEAD, store.COUNTS, store.WEBHOOK_COUNTS, store.SCHEDULE,
        store.job_key(job_id), store.inputs_key(job_id), store.deliveries_key(job_id),
        store.idem_key("tenant", "key"), store.JOB_PREFIX + new_job_id(),
    ]  # fmt: skip
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_a_draining_dispatcher_claims_no_more_deliveries() -> None:
    """Shutdown (SIGTERM or the application's lifespan ending) stops the claims at once: a delivery
    claimed by a replica on its way out would wait for its lease (120 s) before another replica sends it."""

    class Schedule(_Store):
        claims = 0

        async def claim_due_webhooks(self, lease_s: float, limit: int) -> list[str]:
            self.claims += 1
            return []

    store = Schedule({})

    async def view(j: Job) -> dict[str, Any]:
        return {"id": j.id}

    dispatcher = WebhookDispatcher(store, view, _SlowSender(), [], [1.0], poll_s=0.01)  # type: ignore[arg-type]
    running = asyncio.create_task(dispatcher.run())
    await eventually_async(lambda: store.claims >= 2, 10, 0.002)
    settings = Settings(job_worker_in_process=True)
    runtime = JobsRuntime(
        settings.jobs, inference=None, redis_url=settings.jobs_redis_address,  # type: ignore[arg-type]
        redis_cluster=False, retry_after_s=2, triton_timeout_s=30.0,
    )  # fmt: skip
    runtime.dispatcher = dispatcher
    runtime.begin_drain()
    await asyncio.wait_for(running, 1.0)
    claims = store.claims
    await asyncio.sleep(0.05)  # a real wait: five polls' time, and no claim meanwhile
    assert store.claims == claims
    assert runtime.worker is not None and runtime.worker.stopping
    await runtime.stop()
