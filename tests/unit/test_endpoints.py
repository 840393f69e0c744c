"""Pure routing logic of many Tritons: address syntax, DNS expansion, P2C, ejection, probes, slow start,
the retry budget, and the routed client's retry rule (with fake endpoints: no network)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np
import pytest

from app.clients.endpoints import (
    Balancer,
    EndpointAddress,
    RetryBudget,
    State,
    parse_triton_urls,
    resolve,
)
from app.clients.protocols import CallOptions, TritonCall, TritonResult
from app.clients.routed import Endpoint, RoutedTriton, RoutingOptions
from app.clients.triton_http import UpstreamBroken
from app.errors import ModelNotFound, UpstreamTimeout, UpstreamUnavailable
from app.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_parse_triton_urls_forms() -> None:
    targets = parse_triton_urls(
        "a:8001, grpc=b:8001;http=b:8000 ,grpc=c:9001;http=9000,dns:triton-headless:8001;http=8000,[::1]:8001"
    )
    assert [t.address for t in targets[:3]] == [
        EndpointAddress("a:8001"), EndpointAddress("b:8001", "b:8000"), EndpointAddress("c:9001", "c:9000"),
    ]  # fmt: skip
    dns = targets[3]
    assert (dns.dns_host, dns.grpc_port, dns.http_port) == ("triton-headless", 8001, 8000)
    assert targets[4].address == EndpointAddress("[::1]:8001")


@pytest.mark.parametrize("bad", ["", "a", "a:x", "grpc=a:1;http=b", "grpc=a:1;foo=2", "http=a:1", "a:1;b:2"])
def test_parse_triton_urls_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_triton_urls(bad)


def test_settings_name_the_bad_variable() -> None:
    with pytest.raises(ValueError, match="triton_urls"):
        Settings(triton_urls="grpc=a")
    settings = Settings(triton_urls="dns:svc:8001;http=8000")
    assert settings.triton_grpc_address == "svc:8001"


def test_embedded_tritons_take_consecutive_ports_and_must_not_collide() -> None:
    settings = Settings(embedded_tritons=2)
    assert settings.embedded.embedded_triton_ports(1) == (8003, 8004, 8005)
    with pytest.raises(ValueError, match="distinct ports"):
        Settings(embedded_tritons=2, port=8004)


def test_dns_names_expand_to_every_address_and_follow_changes() -> None:
    answers = {"svc": ["10.0.0.2", "10.0.0.1"]}
    targets = parse_triton_urls("dns:svc:8001;http=8000,fixed:8001")
    got = resolve(targets, lambda host: answers[host])
    assert got == [
        EndpointAddress("10.0.0.1:8001", "10.0.0.1:8000"),
        EndpointAddress("10.0.0.2:8001", "10.0.0.2:8000"),
        EndpointAddress("fixed:8001"),
    ]
    answers["svc"] = ["10.0.0.3"]
    assert [a.grpc for a in resolve(targets, lambda host: answers[host])] == ["10.0.0.3:8001", "fixed:8001"]


def test_p2c_prefers_the_endpoint_with_fewer_outstanding_calls() -> None:
    balancer = Balancer(rng=random.Random(1))
    balancer.set_names(["a", "b"])
    for _ in range(5):
        balancer.start("a")
    picks = [balancer.pick(["a", "b"]) for _ in range(50)]
    assert picks.count("b") == 50
    # with three endpoints, the busiest is never chosen (it loses every pair it is in)
    balancer.set_names(["a", "b", "c"])
    picks = [balancer.pick(["a", "b", "c"]) for _ in range(200)]
    assert "a" not in picks and {"b", "c"} <= set(picks)


def test_ejection_backoff_grows_and_never_more_than_half() -> None:
    clock = Clock()
    balancer = Balancer(eject_after=3, base_s=1.0, max_s=4.0, slow_start_s=2.0, clock=clock)
    balancer.set_names(["a", "b", "c", "d"])
    assert not balancer.failure("a") and not balancer.failure("a")
    assert balancer.failure("a")  # third in a row
    assert balancer.endpoints["a"].state is State.EJECTED
    assert balancer.failure("b", connect=True)  # refused: at once
    assert not balancer.failure("c", connect=True)  # a third would be more than half of four
    assert balancer.endpoints["c"].state is State.HEALTHY
    assert all(balancer.pick(["a", "b", "c", "d"]) in ("c", "d") for _ in range(20))
    # not back before its time, even if ready
    clock.now += 0.5
    balancer.probe("a", ready=True)
    assert balancer.endpoints["a"].state is State.EJECTED and not balancer.due_for_probe("a")
    clock.now += 0.6
    assert balancer.due_for_probe("a")
    balancer.probe("a", ready=False)
    assert balancer.endpoints["a"].state is State.EJECTED
    balancer.probe("a", ready=True)
    assert balancer.endpoints["a"].state is State.SLOW_START
    # ejected again without a healthy spell: twice as long, then capped
    balancer.failure("a", connect=True)
    assert balancer.endpoints["a"].ejected_until - clock.now == pytest.approx(2.0)
    for _ in range(3):
        clock.now = balancer.endpoints["a"].ejected_until
        balancer.probe("a", ready=True)
        balancer.failure("a", connect=True)
    assert balancer.endpoints["a"].ejected_until - clock.now == pytest.approx(4.0)
    # a success after return resets the exponent
    clock.now = balancer.endpoints["a"].ejected_until
    balancer.probe("a", ready=True)
    balancer.success("a")
    balancer.failure("a", connect=True)
    assert balancer.endpoints["a"].ejected_until - clock.now == pytest.approx(1.0)


def test_a_single_endpoint_is_never_ejected() -> None:
    balancer = Balancer()
    balancer.set_names(["only"])
    assert not balancer.failure("only", connect=True)
    assert balancer.pick(["only"]) == "only"


def test_everyone_ejected_still_picks_rather_than_fail() -> None:
    balancer = Balancer()
    balancer.set_names(["a", "b"])
    balancer.failure("a", connect=True)
    assert balancer.pick(["a"]) == "a"  # the only one serving this model: try it anyway
    assert balancer.pick(["a", "b"], exclude=["b"]) == "a"
    assert balancer.pick(["a"], exclude=["a"]) is None


def test_slow_start_ramps_the_share() -> None:
    clock = Clock()
    balancer = Balancer(slow_start_s=4.0, clock=clock, rng=random.Random(3))
    balancer.set_names(["a", "b"])
    balancer.failure("a", connect=True)
    clock.now = balancer.endpoints["a"].ejected_until
    balancer.probe("a", ready=True)
    clock.now += 0.4  # weight 0.1: (0+1)/0.1 = 10 > b's (k+1) while b has fewer than 9 outstanding
    for _ in range(5):
        balancer.start("b")
    assert balancer.pick(["a", "b"]) == "b"
    clock.now += 4.0
    assert balancer.pick(["a", "b"]) == "a"
    assert balancer.snapshot()["a"]["state"] == "healthy"


def test_retry_budget_is_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, reserve=2.0)
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    for _ in range(10):
        budget.request()
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()


# --- the routed client, over fake endpoints -----------------------------------------------------


class FakeTriton:
    def __init__(self, name: str, index: list[dict[str, Any]]) -> None:
        self.name = name
        self.index = index
        self.calls: list[float] = []
        self.fail: list[Exception] = []
        self.ready = True

    async def infer(self, call: TritonCall) -> TritonResult:
        self.calls.append(call.options.timeout_us / 1e6)
        if self.fail:
            raise self.fail.pop(0)
        return TritonResult("1", {"who": np.array([self.name])}, {"who": "BYTES"})

    async def server_ready(self) -> bool:
        return self.ready

    async def server_live(self) -> bool:
        return self.ready

    async def live(self) -> bool:
        return self.ready

    async def repository_index(self) -> list[dict[str, Any]]:
        return self.index

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        return {"name": model, "from": self.name}

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        pass


READY = [{"name": "m", "version": "1", "state": "READY"}]


async def _routed(fakes: dict[str, FakeTriton], **options: Any) -> RoutedTriton:
    targets = parse_triton_urls(",".join(fakes))
    routed = RoutedTriton(
        targets, RoutingOptions(probe_interval_s=3600, **options),
        factory=lambda a: Endpoint(a, fakes[a.grpc], fakes[a.grpc]),  # type: ignore[arg-type]
    )  # fmt: skip
    await routed.start()
    return routed


async def _who(routed: RoutedTriton, model: str = "m", sequence_id: int = 0) -> str:
    call = TritonCall(
        model, "1", {}, {}, deadline=time.monotonic() + 5.0, options=CallOptions(sequence_id=sequence_id)
    )
    result = await routed.infer(call)
    return str(result.outputs["who"][0])


async def test_routes_only_to_endpoints_serving_the_model() -> None:
    fakes = {"a:1": FakeTriton("a", READY), "b:1": FakeTriton("b", [{"name": "other", "version": "1",
                                                                       "state": "READY"}])}  # fmt: skip
    routed = await _routed(fakes)
    assert {await _who(routed) for _ in range(20)} == {"a"}
    assert {await _who(routed, "other") for _ in range(20)} == {"b"}
    merged = await routed.repository_index()
    assert [(e["name"], e["state"]) for e in merged] == [("m", "READY"), ("other", "READY")]
    assert (await routed.model_metadata("other"))["from"] == "b"
    await routed.close()


async def test_failure_before_triton_accepted_is_retried_once_elsewhere() -> None:
    fakes = {"a:1": FakeTriton("a", READY), "b:1": FakeTriton("b", READY)}
    routed = await _routed(fakes)
    refused = UpstreamUnavailable("Triton is unavailable: cannot connect to a (refused)")
    fakes["a:1"].fail = [refused] * 50
    fakes["b:1"].fail = []
    # P2C picks a at random (equal load): ask until a has been tried once (P(never in 64) = 2**-64), and
    # every answer comes from b: a's refusal was retried there, not returned
    answers = []
    while not fakes["a:1"].calls and len(answers) < 64:
        answers.append(await _who(routed))
    answers += [await _who(routed) for _ in range(10)]
    assert fakes["a:1"].calls and set(answers) == {"b"}
    assert routed.balancer.endpoints["a:1"].state is State.EJECTED  # one refusal: out at once
    assert len(fakes["a:1"].calls) == 1  # ejected: not picked again
    assert routed.retries >= 1
    # each attempt carries what is left of the deadline as Triton's own timeout
    assert all(0 < t <= 5.0 for t in fakes["b:1"].calls)
    await routed.close()


async def test_timeouts_and_answers_are_not_retried() -> None:
    fakes = {"a:1": FakeTriton("a", READY), "b:1": FakeTriton("b", READY)}
    routed = await _routed(fakes)
    for fake in fakes.values():
        fake.fail = [UpstreamTimeout("slow")]
    with pytest.raises(UpstreamTimeout):
        await _who(routed)
    assert sum(len(f.calls) for f in fakes.values()) == 1
    for fake in fakes.values():
        fake.fail, fake.calls = [ModelNotFound("gone")], []
    with pytest.raises(ModelNotFound):
        await _who(routed)
    assert sum(len(f.calls) for f in fakes.values()) == 1
    for fake in fakes.values():
        fake.fail, fake.calls = [UpstreamBroken("broke during the answer")], []
    with pytest.raises(UpstreamBroken):
        await _who(routed)
    assert sum(len(f.calls) for f in fakes.values()) == 1
    await routed.close()


async def test_retry_budget_stops_a_retry_storm() -> None:
    fakes = {"a:1": FakeTriton("a", READY), "b:1": FakeTriton("b", READY)}
    routed = await _routed(fakes, retry_ratio=0.2, eject_after=10_000)
    routed.budget = RetryBudget(ratio=0.2, reserve=2.0)
    for fake in fakes.values():
        fake.fail = [UpstreamUnavailable("UNAVAILABLE")] * 1000
    failed = 0
    for _ in range(50):
        with pytest.raises(UpstreamUnavailable):
            await _who(routed)
        failed += 1
    assert routed.retries <= 2 + 0.2 * 50 + 1
    assert sum(len(f.calls) for f in fakes.values()) == 50 + routed.retries
    await routed.close()


async def test_sequences_stick_and_never_move() -> None:
    fakes = {"a:1": FakeTriton("a", READY), "b:1": FakeTriton("b", READY), "c:1": FakeTriton("c", READY)}
    routed = await _routed(fakes)
    first = await _who(routed, sequence_id=42)
    assert {await _who(routed, sequence_id=42) for _ in range(20)} == {first}
    fakes[f"{first}:1"].fail = [UpstreamUnavailable("cannot connect")]
    with pytest.raises(UpstreamUnavailable):
        await _who(routed, sequence_id=42)
    assert sum(len(f.calls) for n, f in fakes.items() if f.name != first) == 0
    await routed.close()


async def test_probes_eject_and_bring_back() -> None:
    fakes = {"a:1": FakeTriton("a", READY), "b:1": FakeTriton("b", READY)}
    routed = await _routed(fakes, eject_base_s=0.01, slow_start_s=0.0)
    fakes["a:1"].ready = False
    await routed.probe_once()
    states = routed.endpoint_states()
    assert states["a:1"]["state"] == "ejected" and states["b:1"]["state"] == "healthy"
    assert states["b:1"]["models"] == ["m"]
    assert {await _who(routed) for _ in range(10)} == {"b"}
    fakes["a:1"].ready = True
    await asyncio.sleep(0.02)  # a real wait: past the 0.01 s ejection
    await routed.probe_once()
    assert routed.endpoint_states()["a:1"]["state"] in ("slow_start", "healthy")
    assert "a" in {await _who(routed) for _ in range(40)}
    await routed.close()


async def test_dns_changes_add_and_remove_endpoints() -> None:
    answers = {"svc": ["10.0.0.1", "10.0.0.2"]}
    fakes: dict[str, FakeTriton] = {}

    def factory(address: EndpointAddress) -> Endpoint:
        fake = fakes.setdefault(address.grpc, FakeTriton(address.grpc.split(":")[0], READY))
        return Endpoint(address, fake, fake)  # type: ignore[arg-type]

    routed = RoutedTriton(parse_triton_urls("dns:svc:8001;http=8000"),
                          RoutingOptions(probe_interval_s=3600, resolve_interval_s=0.0),
                          factory=factory, lookup=lambda host: answers[host])  # fmt: skip
    await routed.start()
    assert sorted(routed.endpoints) == ["10.0.0.1:8001", "10.0.0.2:8001"]
    assert routed.endpoints["10.0.0.1:8001"].address.http == "10.0.0.1:8000"
    answers["svc"] = ["10.0.0.2", "10.0.0.3"]
    await routed.probe_once()
    assert sorted(routed.endpoints) == ["10.0.0.2:8001", "10.0.0.3:8001"]
    assert sorted(routed.balancer.endpoints) == sorted(routed.endpoints)
    assert {await _who(routed) for _ in range(30)} <= {"10.0.0.2", "10.0.0.3"}
    await routed.close()


async def test_a_shorter_client_timeout_is_kept() -> None:
    fakes = {"a:1": FakeTriton("a", READY)}
    routed = await _routed(fakes)
    call = TritonCall(
        "m", "1", {}, {}, deadline=time.monotonic() + 5.0, options=CallOptions(timeout_us=200_000)
    )
    await routed.infer(call)
    await routed.infer(
        TritonCall(
            "m", "1", {}, {}, deadline=time.monotonic() + 5.0, options=CallOptions(timeout_us=60_000_000)
        )
    )
    assert fakes["a:1"].calls[0] == 0.2 and 4.0 < fakes["a:1"].calls[1] <= 5.0
    await routed.close()
