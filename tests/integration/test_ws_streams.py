"""Streams on the multiplexed WebSocket ``/v1/ws`` (issue 22 item 3), on the real Triton: an infer frame
for a decoupled model is answered with one ``stream`` frame per response (``seq`` from 1, ``final`` on the
last, Triton's empty final response included), replayed from the cache once complete; a stream shares its
socket fairly (a unary result and a short stream arrive while a 10 000-step stream runs); a cancel frame
or the socket closing cancels the request in Triton (the model's log says after how many steps, and the
model's one instance answers the next request at once); a client that stops reading costs a bounded
buffer, then the request is cancelled in Triton (``stream_overflow``); a stream is one request in flight
for its whole life."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from app.launcher import EmbeddedTriton
from tests.integration.cancel_log import cancelled_after, cancelled_lines
from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration

LONG = 10_000  # forecast_stream's longest; each test's long stream has a horizon of its own near it, so


def series() -> list[float]:
    """30 points of a period-8 wave, shifted at random: a request no earlier test made (a cache MISS)."""
    shift = random.uniform(-5, 5)
    return [round(50 + 3 * ((t % 8) - 4) / 4 + 0.1 * t + shift, 4) for t in range(30)]


def forecast(ref: Any, horizon: int, points: list[float] | None = None) -> str:
    return json.dumps({"op": "infer", "ref": ref, "model": "forecast_stream",
                       "inputs": {"series": points or series(), "horizon": [horizon]}})  # fmt: skip


def ws_url(gateway_url: str) -> str:
    return gateway_url.replace("http", "ws", 1) + "/v1/ws"


def frames(ws: ClientConnection, timeout: float = 30) -> Iterator[dict[str, Any]]:
    """Every frame but heartbeats, as it comes."""
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        if frame["type"] != "heartbeat":
            yield frame


def until_end(ws: ClientConnection, ref: Any) -> list[dict[str, Any]]:
    """The frames of ``ref`` up to its last (a final stream frame, an error, a cancelled frame)."""
    got = []
    for frame in frames(ws):
        if frame.get("ref") != ref:
            continue
        got.append(frame)
        if frame["type"] != "stream" or frame["final"]:
            return got
    raise AssertionError("unreachable")


def first_of_next(ws: ClientConnection, ref: str) -> tuple[float, dict[str, Any]]:
    """Seconds from sending a 2-step request of a new series to its first frame, and that frame; then the
    request's other frames are read."""
    started = time.perf_counter()
    ws.send(forecast(ref, 2))
    first = next(f for f in frames(ws) if f.get("ref") == ref)
    took = time.perf_counter() - started
    rest = until_end(ws, ref)
    assert [f["seq"] for f in [first, *rest]] == [1, 2, 3] and rest[-1]["final"], rest
    return took, first


def test_one_frame_per_response_then_replayed_from_the_cache(gateway_url: str) -> None:
    points = series()
    with connect(ws_url(gateway_url), open_timeout=10) as ws:
        ws.send(forecast("f", 12, points))
        first = until_end(ws, "f")
        again: list[dict[str, Any]] = []
        for attempt in range(20):  # the completed stream is stored just after its last frame was sent
            ws.send(forecast(f"g{attempt}", 12, points))
            again = until_end(ws, f"g{attempt}")
            if again[0]["cache"] == "HIT":
                break
            time.sleep(0.1)
        ws.send(json.dumps({"op": "infer", "ref": 7, "model": "repeat_decoupled", "inputs": {"COUNT": [3]}}))
        repeat = until_end(ws, 7)
    print("\n" + "\n".join(json.dumps(f) for f in (first[0], first[-1], again[0], repeat[0])))
    # one frame per Triton response: 12 steps, then Triton's final response alone (no outputs)
    assert [f["seq"] for f in first] == list(range(1, 14))
    assert [f["final"] for f in first] == [False] * 12 + [True]
    assert [f["result"]["outputs"]["step"] for f in first[:-1]] == [[s] for s in range(1, 13)]
    assert first[-1]["result"]["outputs"] == {}
    assert {f["cache"] for f in first} == {"MISS"} and {f["request_id"] for f in first} == {"f"}
    assert first[0]["result"]["model"] == "forecast_stream" and first[0]["type"] == "stream"
    # the completed stream was stored: the same request replays it, response for response
    assert {f["cache"] for f in again} == {"HIT"}
    assert [f["result"] for f in again] == [f["result"] for f in first]
    assert [(f["seq"], f["final"]) for f in again] == [(f["seq"], f["final"]) for f in first]
    # another decoupled model; an integer ref is echoed as sent
    assert [f["result"]["outputs"] for f in repeat] == [{"OUT": [0]}, {"OUT": [1]}, {"OUT": [2]}, {}]
    assert [f["ref"] for f in repeat] == [7] * 4 and repeat[-1]["final"]


def test_a_stream_does_not_hold_up_the_sockets_other_frames(gateway_url: str, triton: EmbeddedTriton) -> None:
    """While a 10 000-step stream runs, a unary result and a short stream of another decoupled model on the
    same socket arrive at once, between the long stream's frames; then the long stream is cancelled."""
    horizon = 9_997
    before = len(cancelled_lines(triton, horizon))
    unary = {
        "op": "infer",
        "ref": "u",
        "model": "transformer_timeseries",
        "inputs": {"series": [[[random.uniform(-1, 1)] for _ in range(20)]]},
    }  # a MISS: Triton answers
    short = {"op": "infer", "ref": "s", "model": "repeat_decoupled", "inputs": {"COUNT": [5]}}
    with connect(ws_url(gateway_url), open_timeout=10) as ws:
        ws.send(forecast("long", horizon))
        seen: dict[str, float] = {}
        long_seq = 0
        long_before: dict[str, int] = {}
        sent = 0.0
        for frame in frames(ws):
            ref = frame.get("ref")
            if ref == "long":
                assert frame["type"] == "stream" and frame["seq"] == long_seq + 1, frame
                long_seq = frame["seq"]
                if long_seq == 20:  # the long stream is well under way
                    sent = time.perf_counter()
                    ws.send(json.dumps(unary))
                    ws.send(json.dumps(short))
            elif ref == "u":
                assert frame["type"] == "result" and frame["cache"] == "MISS", frame
                seen["u"] = time.perf_counter() - sent
                long_before["u"] = long_seq
            elif ref == "s" and frame["final"]:
                seen["s"] = time.perf_counter() - sent
                long_before["s"] = long_seq
            if len(seen) == 2:
                break
        ws.send(json.dumps({"op": "cancel", "ref": "long"}))
        end = until_end(ws, "long")
    print(f"\nunary result {seen['u'] * 1000:.0f} ms, short stream's last frame {seen['s'] * 1000:.0f} ms "
          f"after they were sent; long stream at step {long_before['u']} / {long_before['s']} then; "
          f"cancelled after {end[-1]['responses']} frames")  # fmt: skip
    assert seen["u"] < 2.0 and seen["s"] < 2.0, seen
    assert end[-1]["type"] == "cancelled" and end[-1]["responses"] < horizon
    assert 3 <= cancelled_after(triton, before, horizon) < horizon


def test_a_cancel_frame_cancels_the_stream_in_triton(gateway_url: str, triton: EmbeddedTriton) -> None:
    horizon = 10_000
    before = len(cancelled_lines(triton, horizon))
    with connect(ws_url(gateway_url), open_timeout=10) as ws:
        ws.send(forecast("long", horizon))
        got = [next(f for f in frames(ws) if f.get("ref") == "long") for _ in range(3)]
        assert [f["seq"] for f in got] == [1, 2, 3]
        ws.send(json.dumps({"op": "cancel", "ref": "long"}))
        rest = until_end(ws, "long")
        end = rest[-1]
        print(f"\n{json.dumps(end)}")
        # frames already on their way come first, in order; then the cancelled frame
        assert [f["seq"] for f in got + rest[:-1]] == list(range(1, len(got + rest)))
        assert end == {"type": "cancelled", "ref": "long", "request_id": "long", "responses": len(rest) + 2}
        took, first = first_of_next(ws, "next")
        ws.send(json.dumps({"op": "cancel", "ref": "long"}))  # nothing left to cancel
        late = next(frames(ws))
    print(f"first response of the next request {took * 1000:.1f} ms after the cancel ({first['cache']})")
    assert first["cache"] != "HIT" and took < 1.0
    assert late["type"] == "error" and late["error"]["code"] == "not_found", late
    assert late["error"]["details"] == {"field": "ref"} and late["ref"] == "long"
    assert 3 <= cancelled_after(triton, before, horizon) < horizon


def test_closing_the_socket_cancels_its_streams(gateway_url: str, triton: EmbeddedTriton) -> None:
    horizon = 9_999
    before = len(cancelled_lines(triton, horizon))
    with connect(ws_url(gateway_url), open_timeout=10) as ws:
        ws.send(forecast("long", horizon))
        got = [next(f for f in frames(ws) if f.get("ref") == "long") for _ in range(3)]
        assert [f["seq"] for f in got] == [1, 2, 3]
    with connect(ws_url(gateway_url), open_timeout=10) as ws:
        took, first = first_of_next(ws, "next")
    print(
        f"\nfirst response of the next request {took * 1000:.1f} ms after the socket closed ({first['cache']})"
    )
    assert first["cache"] != "HIT" and took < 1.0
    assert 3 <= cancelled_after(triton, before, horizon) < horizon


def test_bad_cancel_and_stream_frames_name_the_field(gateway_url: str) -> None:
    with connect(ws_url(gateway_url), open_timeout=10) as ws:
        ws.send(json.dumps({"op": "cancel"}))
        no_ref = next(frames(ws))
        ws.send(json.dumps({"op": "cancel", "ref": "nothing"}))
        unknown = next(frames(ws))
        ws.send(forecast("x", 9_996))
        assert next(frames(ws))["seq"] == 1
        ws.send(forecast("x", 3))  # the same ref while its stream is in flight
        twice = next(f for f in frames(ws) if f["type"] == "error")
        ws.send(json.dumps({"op": "cancel", "ref": "x"}))
        assert until_end(ws, "x")[-1]["type"] == "cancelled"
    assert no_ref["type"] == "error" and no_ref["error"]["details"] == {"field": "ref"}, no_ref
    assert unknown["error"]["code"] == "not_found" and unknown["error"]["details"] == {"field": "ref"}
    assert twice["ref"] == "x" and twice["error"]["code"] == "invalid_input", twice
    assert twice["error"]["details"] == {"field": "ref"}


def test_a_client_that_stops_reading_holds_a_bounded_buffer(
    start_gateway: GatewayFactory, triton: EmbeddedTriton
) -> None:
    """A client that stops reading: the socket's outbox holds at most its share of stream frames (4 of 8),
    the stream's buffer 16 responses; past that (and past what the kernel's socket buffers hold: ~1 KiB
    frames here, a long ``ref`` echoed in each, so that 10 000 of them are more than those) the request is
    cancelled in Triton and, once the client reads again, the frames it missed come, then a
    ``stream_overflow`` error. The stream was one request in flight all along (a second infer frame
    meanwhile: ``too_many_in_flight``); the socket stays open and serves the next request."""
    horizon = 9_998
    before = len(cancelled_lines(triton, horizon))
    slow = "slow-" + "x" * 1000
    with start_gateway(ws_send_queue=8, stream_buffer_responses=16, ws_max_in_flight=1) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        raw.connect((host, int(port)))
        with connect(ws_url(url), sock=raw, open_timeout=10, max_queue=1) as ws:
            ws.send(forecast(slow, horizon))
            ws.send(json.dumps({"op": "infer", "ref": "second", "model": "repeat_decoupled",
                                "inputs": {"COUNT": [1]}}))  # fmt: skip
            done = cancelled_after(triton, before, horizon)  # not reading meanwhile
            got = []
            for frame in frames(ws, timeout=10):
                got.append(frame)
                if frame.get("ref") == slow and frame["type"] != "stream":
                    break
            ws.send(json.dumps({"op": "infer", "ref": "after", "model": "repeat_decoupled",
                                "inputs": {"COUNT": [1]}}))  # fmt: skip
            after = until_end(ws, "after")
    stream = [f for f in got if f.get("ref") == slow]
    [second] = [f for f in got if f.get("ref") == "second"]
    print(f"\nstopped reading: Triton cancelled after {done} steps; {len(stream) - 1} frames delivered, then "
          f"{json.dumps({**stream[-1], 'ref': 'slow-xxx…'})}")  # fmt: skip
    assert done < horizon
    assert second["type"] == "error" and second["error"]["code"] == "too_many_in_flight", second
    assert [f["seq"] for f in stream[:-1]] == list(range(1, len(stream)))
    assert stream[-1]["type"] == "error" and stream[-1]["error"]["code"] == "stream_overflow", stream[-1]
    assert [f["type"] for f in after] == ["stream", "stream"] and after[-1]["final"]
