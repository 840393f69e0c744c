"""HTTP streaming over server-sent events (issue 22 items 2, 6, 7, 8), against the real Triton and Redis:

* ``/v2/models/{m}/generate_stream`` and ``/generate`` answer what the embedded Triton's own generate
  extension answers, event for event (parsed JSON, values exactly equal), errors included;
* ``/v1/models/{m}/stream``: /v1's answer per event, plus ``final`` and ``seq``; errors as ``error`` events;
* a client that goes away cancels the request in Triton (the model logs where it stopped, the next
  request is answered at once), through either door;
* a completed stream is replayed from the cache (``X-Cache: HIT``, the same events), a cancelled one never
  stored;
* a stream holds one in-flight slot of its key for its whole life;
* a client that stops reading leaves the gateway's memory bounded: the stream overflows and is cancelled
  in Triton.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from httpx_sse import EventSource

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.cancel_log import cancelled_after, cancelled_lines
from tests.integration.conftest import GatewayFactory
from tests.integration.servers import running_tritons
from tests.integration.test_auth import ADMIN, PEPPER, bearer, make_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODEL = "forecast_stream"
GENERATE_STREAM = f"/v2/models/{MODEL}/generate_stream"
GENERATE = f"/v2/models/{MODEL}/generate"
V1_STREAM = f"/v1/models/{MODEL}/stream"


def series(seed: float) -> list[float]:
    """A period-8 wave with a trend, 30 points; ``seed`` shifts it (another cache key per test)."""
    return [50 + 3 * math.sin(2 * math.pi * i / 8) + 0.1 * i + seed for i in range(30)]


def generate_body(points: list[float], horizon: int) -> dict[str, Any]:
    return {"series": points, "horizon": horizon}


def v1_body(points: list[float], horizon: int) -> dict[str, Any]:
    return {"inputs": {"series": points, "horizon": [horizon]}}


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, Any]] = field(default_factory=list)  # (event name, parsed data)
    body: Any = None  # a JSON answer (not an event stream)

    @property
    def data(self) -> list[Any]:
        return [d for _, d in self.events]


def post_sse(client: httpx.Client, url: str, body: Any, headers: dict[str, str] | None = None) -> Answer:
    """POST, read the whole answer: its events when it is an event stream, else its JSON."""
    with client.stream("POST", url, json=body, headers=headers or {}) as r:
        answer = Answer(r.status_code, r.headers)
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            answer.events = [(e.event, json.loads(e.data)) for e in EventSource(r).iter_sse()]
        else:
            answer.body = json.loads(r.read())
    return answer


@pytest.fixture
def triton_client(triton: EmbeddedTriton) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=triton.http_url, timeout=60) as c:
        yield c


NO_CACHE = {"Cache-Control": "no-cache"}  # read from Triton (the answer is still stored)


# --- 1: Triton's generate extension, event for event -------------------------------------------------
@pytest.mark.parametrize("horizon", [1, 3, 10])
def test_generate_stream_is_tritons_event_for_event_and_replayed_from_the_cache(
    client: httpx.Client, triton_client: httpx.Client, horizon: int
) -> None:
    body = generate_body(series(0.001 * horizon), horizon)
    theirs = post_sse(triton_client, GENERATE_STREAM, body)
    ours = post_sse(client, GENERATE_STREAM, body, NO_CACHE)
    print(f"\nTriton: {theirs.status} {theirs.headers['content-type']} {theirs.data[:2]}")
    print(f"gateway: {ours.status} {ours.headers['content-type']} X-Cache {ours.headers['x-cache']} "
          f"{ours.data[:2]}")  # fmt: skip
    assert theirs.status == ours.status == 200
    assert (
        theirs.headers["content-type"] == ours.headers["content-type"] == "text/event-stream; charset=utf-8"
    )
    assert len(theirs.data) == horizon  # Triton's empty final response is no event
    assert ours.events == theirs.events  # event names (none) and the parsed JSON, values exactly equal
    assert ours.headers["x-cache"] != "HIT"
    again = post_sse(client, GENERATE_STREAM, body)  # the completed stream was stored
    assert again.headers["x-cache"] == "HIT" and again.events == theirs.events


@pytest.mark.parametrize(
    ("points", "horizon", "message"),
    [
        (series(0.5), 0, "horizon must be between 1 and 10000, got 0"),
        (series(0.5)[:19], 3, "series needs at least 20 points, got 19"),
    ],
    ids=["horizon-0", "19-points"],
)
def test_a_models_error_is_tritons(
    client: httpx.Client, triton_client: httpx.Client, points: list[float], horizon: int, message: str
) -> None:
    """The model's error before any response: Triton's status (400), an event stream holding one error
    event for generate_stream, a JSON error for generate; the same message (the gateway adds ``code`` and
    ``details`` beside it, as on every /v2 error)."""
    body = generate_body(points, horizon)
    for path in (GENERATE_STREAM, GENERATE):
        theirs = post_sse(triton_client, path, body)
        ours = post_sse(client, path, body, NO_CACHE)
        print(f"\n{path}: Triton {theirs.status} {theirs.data or theirs.body}; gateway {ours.status} "
              f"{ours.data or ours.body}")  # fmt: skip
        assert theirs.status == ours.status == 400
        assert theirs.headers["content-type"] == ours.headers["content-type"]
        if path == GENERATE_STREAM:
            assert theirs.data == [{"error": message}]
            assert len(ours.data) == 1 and ours.data[0]["error"] == message
        else:
            assert theirs.body == {"error": message} and ours.body["error"] == message


def test_generate_is_tritons(client: httpx.Client, triton_client: httpx.Client) -> None:
    """/generate: one response is the JSON answer; a decoupled model's several responses are Triton's
    error (status 200, as Triton answers it); a model that answers once, with an ``id``, on both routes."""
    one = generate_body(series(0.7), 1)
    theirs, ours = post_sse(triton_client, GENERATE, one), post_sse(client, GENERATE, one, NO_CACHE)
    print(f"\n/generate horizon 1: Triton {theirs.status} {theirs.body}; gateway {ours.status} {ours.body}")
    assert theirs.status == ours.status == 200 and ours.body == theirs.body
    assert set(ours.body) == {"model_name", "model_version", "step", "value"}
    three = generate_body(series(0.7), 3)
    theirs, ours = post_sse(triton_client, GENERATE, three), post_sse(client, GENERATE, three, NO_CACHE)
    print(f"/generate horizon 3: Triton {theirs.status} {theirs.body}; gateway {ours.status} {ours.body}")
    assert theirs.status == ours.status == 200 and ours.body["error"] == theirs.body["error"]
    unary = {"INPUT0": [1.5, 2.5, 3.5], "id": "req-7"}
    for path in ("/v2/models/identity_fp32/generate", "/v2/models/identity_fp32/generate_stream"):
        theirs, ours = post_sse(triton_client, path, unary), post_sse(client, path, unary)
        print(f"{path}: Triton {theirs.body or theirs.data}; gateway {ours.body or ours.data}")
        assert theirs.status == ours.status == 200
        assert ours.body == theirs.body and ours.events == theirs.events
    for path in ("/v2/models/nope/generate_stream", "/v2/models/nope/generate"):
        theirs, ours = post_sse(triton_client, path, one), post_sse(client, path, one)
        assert theirs.status == ours.status == 404 and "nope" in ours.body["error"]
    missing = {"series": series(0.7)}
    theirs, ours = (
        post_sse(triton_client, GENERATE_STREAM, missing),
        post_sse(client, GENERATE_STREAM, missing),
    )
    assert theirs.status == ours.status == 400 and "horizon" in ours.body["error"]
    assert ours.body["details"]["field"] == "horizon"


# --- 2: /v1 stream ---------------------------------------------------------------------------------
def test_v1_stream_events(client: httpx.Client, triton_client: httpx.Client) -> None:
    points = series(0.9)
    ours = post_sse(client, V1_STREAM, v1_body(points, 5), NO_CACHE)
    theirs = post_sse(triton_client, GENERATE_STREAM, generate_body(points, 5))
    print(f"\n/v1 stream: {ours.status} X-Cache {ours.headers['x-cache']} first {ours.data[0]} "
          f"last {ours.data[-1]}")  # fmt: skip
    assert ours.status == 200 and ours.headers["x-cache"] != "HIT"
    assert [name for name, _ in ours.events] == ["message"] * 6
    assert [d["seq"] for d in ours.data] == list(range(1, 7))
    assert [d["final"] for d in ours.data] == [False] * 5 + [True]
    assert ours.data[-1]["outputs"] == {}  # Triton's empty final response: the client learns the end
    for event, triton_event in zip(ours.data, theirs.data, strict=False):
        assert event["model"] == MODEL and event["model_version"] == "1"
        assert event["outputs"]["step"] == [triton_event["step"]]
        assert np.float32(event["outputs"]["value"][0]) == np.float32(triton_event["value"])
    again = post_sse(client, V1_STREAM, v1_body(points, 5))
    assert again.headers["x-cache"] == "HIT" and again.events == ours.events

    error = post_sse(client, V1_STREAM, v1_body(points, 0), NO_CACHE)
    print(f"/v1 stream horizon 0: {error.status} {error.events}")
    assert error.status == 502 and error.headers["content-type"].startswith("text/event-stream")
    ((name, data),) = error.events
    assert name == "error" and set(data["error"]) == {"code", "message", "details"}
    assert "horizon must be between 1 and 10000, got 0" in data["error"]["message"]

    invalid = post_sse(client, V1_STREAM, {"inputs": {"series": points}})
    assert invalid.status == 422 and invalid.body["error"]["details"]["field"] == "inputs.horizon"


# --- 3: cancellation reaches Triton; a cancelled stream is never stored ---------------------------
def read_events(response: httpx.Response, count: int) -> list[Any]:
    out: list[Any] = []
    for event in EventSource(response).iter_sse():
        out.append(json.loads(event.data))
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("door", ["generate_stream", "v1_stream"])
def test_a_client_that_goes_away_cancels_the_request_in_triton(
    client: httpx.Client, triton: EmbeddedTriton, door: str
) -> None:
    """A client reads 3 events of a 10,000-step stream (~4 s of the model's one instance) and closes the
    connection; the gateway cancels the request in Triton (Triton's own HTTP front end does not: it runs
    the model to its end). The identical request next is a cache MISS (the cancelled stream was not
    stored) and its first event comes at once: the instance is free. The model logs where it stopped."""
    path, body = (
        (GENERATE_STREAM, generate_body(series(1.1), 10_000)) if door == "generate_stream"
        else (V1_STREAM, v1_body(series(1.2), 10_000))
    )  # fmt: skip
    logged_before = len(cancelled_lines(triton))
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
        assert len(read_events(r, 3)) == 3
    started = time.perf_counter()
    with client.stream("POST", path, json=body) as r:
        first = read_events(r, 1)
        latency = time.perf_counter() - started
        cache = r.headers["x-cache"]
    print(f"\n{door}: first event of the next request {latency * 1000:.1f} ms after the cancelled stream, "
          f"X-Cache {cache}")  # fmt: skip
    assert cache == "MISS"  # never stored: the identical request went to Triton again
    assert first and latency < 1.0

    assert 3 <= cancelled_after(triton, logged_before, first=True) < 10_000  # the first stream's line
    assert triton.ready()


# --- 4: a stream holds its key's in-flight slot until it ends ---------------------------------------
def test_a_stream_holds_one_in_flight_slot_for_its_whole_life(start_gateway: GatewayFactory) -> None:
    settings = {"auth": "required", "key_pepper": PEPPER, "admin_token": ADMIN, "auth_key_cache_s": 1.0}
    with start_gateway(**settings) as url, httpx.Client(base_url=url, timeout=30) as c:
        key = make_key(url, rps=100, burst=100, concurrency=1)
        auth = bearer(key)
        unary = {"inputs": {"INPUT0": [[1.0, 2.0]]}}
        with c.stream("POST", V1_STREAM, json=v1_body(series(1.3), 10_000), headers=auth) as r:
            # one iterator for the whole test: a closed one closes the response (the client went away)
            events = EventSource(r).iter_sse()
            assert r.status_code == 200 and next(events) and next(events)
            print(f"\nthe stream: X-Cache {r.headers['x-cache']}")
            refused = c.post("/v1/models/identity_fp32/infer", json=unary, headers=auth)
            print(f"\nwhile the stream is open: {refused.status_code} {refused.json()}")
            assert refused.status_code == 429 and "concurrency" in refused.text
            assert json.loads(next(events).data)["seq"] == 3  # the stream was open all along
        # the stream ended (its client closed it): the slot comes back
        answer = eventually(
            lambda: _ok(c.post("/v1/models/identity_fp32/infer", json=unary, headers=auth)), 10, 0.1,
            "the slot back once the stream ended",
        )  # fmt: skip
        assert answer.status_code == 200


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


# --- 5: a client that stops reading: bounded memory, the request cancelled in Triton --------------
@pytest.fixture(scope="module")
def bulk_gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis
) -> Iterator[tuple[str, EmbeddedTriton]]:
    """A Triton serving ``bulk_stream`` (64 KB responses: forecast_stream's 10,000 small ones, ~1 MB of
    events, fit in the kernel's socket buffers on loopback, whose send side grows to ~4 MB) and a gateway
    in front of it."""
    with (
        running_tritons(tmp_path_factory, ["bulk_stream"]) as (server,),
        running_gateway(
            triton_url=server.grpc_url, triton_http_url=server.http_url, redis_url=redis_server.url
        ) as url,
    ):
        yield url, server


def test_a_client_that_stops_reading_leaves_memory_bounded(bulk_gateway: tuple[str, EmbeddedTriton]) -> None:
    url, server = bulk_gateway
    port = int(url.rsplit(":", 1)[1])
    process = psutil.Process()  # the test gateway serves in this process
    count = 2000  # 2,000 x 64 KB: 128 MB of tensors, ~640 MB of JSON events if nothing bounded them
    body = json.dumps({"COUNT": count}).encode()
    log = server.process.log_path
    before = process.memory_info().rss
    peak = before
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the client reads nothing
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(
            b"POST /v2/models/bulk_stream/generate_stream HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

        def cancelled() -> str:
            nonlocal peak
            peak = max(peak, process.memory_info().rss)
            lines = [s for s in log.read_text(errors="replace").splitlines() if "bulk_stream: cancelled" in s]
            assert lines
            return lines[-1]

        line = eventually(cancelled, 60, 0.2, "Triton cancelling the stream nobody reads")
        for _ in range(10):  # the connection stays open, unread: nothing grows any more
            time.sleep(0.2)
            peak = max(peak, process.memory_info().rss)
    finally:
        sock.close()
    done = int(line.split("cancelled after ")[1].split(" of ")[0])
    growth = peak - before
    print(
        f"\n{line}\nRSS before {before / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB (growth {growth / 1e6:.1f} MB)"
    )

    def overflowed() -> float:
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        value = next((float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith('tgw_streams_total{door="v2",end="overflow"}')), 0.0)  # fmt: skip
        assert value >= 1
        return value

    eventually(overflowed, 10, 0.1, "the stream recorded as overflowed")
    assert done < count // 2, line  # the buffer's bound (8 MB: 128 responses) plus the sockets' buffers
    assert growth < 100 * 1024 * 1024, growth / 1e6
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
