"""The pure logic of traffic policies (app.services.traffic): weighted choice, sticky callers, comparisons,
conditions, decisions, validation."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from app.errors import InvalidInput
from app.request_context import Caller
from app.services.traffic import (
    Policy,
    StatsBatch,
    applied,
    compare,
    compare_output,
    decide,
    evidence_of,
    parse_conditions,
    pick,
    policy_from_spec,
    spread,
    stable_point,
)


def caller(key: str, tenant: str = "t") -> Caller:
    return Caller(key_id=key, tenant=tenant, tier="standard")


def test_pick_follows_weights_in_version_order() -> None:
    choices = [("1", 90.0), ("2", 10.0)]
    assert pick(choices, 0.0) == "1"
    assert pick(choices, 0.899) == "1"
    assert pick(choices, 0.9) == "2"
    assert pick(choices, 0.9999) == "2"


def test_weighted_route_over_many_requests() -> None:
    random.seed(7)
    policy = Policy("m", {"1": 90, "2": 10})
    got = Counter(r.version for _ in range(20000) if (r := policy.route(("1", "2"), None)) is not None)
    assert abs(got["2"] / 20000 - 0.10) < 0.01


def test_route_only_over_ready_versions_and_none_when_none_is_ready() -> None:
    policy = Policy("m", {"1": 50, "2": 50})
    assert {policy.route(("1",), None).version for _ in range(50)} == {"1"}  # type: ignore[union-attr]
    assert policy.route(("3",), None) is None


def test_zero_weight_is_never_chosen() -> None:
    policy = Policy("m", {"1": 100, "2": 0})
    assert {policy.route(("1", "2"), None).version for _ in range(200)} == {"1"}  # type: ignore[union-attr]


def test_sticky_callers_keep_their_version_and_ramps_move_only_the_moved_share() -> None:
    callers = [caller(f"key{i}") for i in range(2000)]
    p10 = Policy("m", {"1": 90, "2": 10}, sticky="key")
    first = {c.key_id: p10.route(("1", "2"), c).version for c in callers}  # type: ignore[union-attr]
    again = {c.key_id: p10.route(("1", "2"), c).version for c in callers}  # type: ignore[union-attr]
    assert first == again
    share = sum(v == "2" for v in first.values()) / len(first)
    assert 0.07 < share < 0.13
    p30 = Policy("m", {"1": 70, "2": 30}, sticky="key", revision=9)
    later = {c.key_id: p30.route(("1", "2"), c).version for c in callers}  # type: ignore[union-attr]
    assert all(later[k] == "2" for k, v in first.items() if v == "2")  # nobody on the canary goes back


def test_sticky_by_tenant_ties_a_tenant_s_keys_together() -> None:
    policy = Policy("m", {"1": 50, "2": 50}, sticky="tenant")
    versions = {policy.route(("1", "2"), caller(f"k{i}", "acme")).version for i in range(50)}  # type: ignore[union-attr]
    assert len(versions) == 1


def test_stable_point_is_in_unit_interval_and_per_model() -> None:
    assert 0 <= stable_point("m", "a") < 1
    assert stable_point("m", "a") == stable_point("m", "a")
    assert stable_point("m", "a") != stable_point("n", "a")


def test_shadow_sampling_and_never_the_served_version() -> None:
    random.seed(1)
    policy = Policy("m", {"1": 100}, shadow="2", shadow_sample=0.25)
    routed = [policy.route(("1", "2"), None) for _ in range(4000)]
    share = sum(r is not None and r.shadow == "2" for r in routed) / 4000
    assert abs(share - 0.25) < 0.03
    same = Policy("m", {"2": 100}, shadow="2", shadow_sample=1.0)
    assert same.route(("1", "2"), None).shadow is None  # type: ignore[union-attr]


def test_production_and_candidate() -> None:
    assert Policy("m", {"1": 90, "2": 10}).production == "1"
    assert Policy("m", {"1": 90, "2": 10}).candidate == "2"
    assert Policy("m", {"1": 50, "2": 50}).production == "1"
    assert Policy("m", {"1": 100}, shadow="2").candidate == "2"
    assert Policy("m", {"1": 100}).candidate is None


def test_spread_and_relative_difference() -> None:
    prod = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert spread(prod) == pytest.approx(float(np.std(prod)))
    assert spread(np.array([5.0, 5.0])) == 5.0  # constant: its mean |p|
    assert spread(np.zeros(3)) == 1.0
    d = compare_output(prod, prod + np.array([0.0, 0.0, 0.0, 0.4], dtype=np.float32))
    assert d is not None
    assert d.max_abs == pytest.approx(0.4, rel=1e-5)
    assert d.mean_abs == pytest.approx(0.1, rel=1e-5)
    assert d.mean_rel == pytest.approx(0.1 / float(np.std(prod)), rel=1e-5)
    assert d.exact is None


def test_integer_and_bytes_outputs_get_an_exact_match_rate() -> None:
    d = compare_output(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5]))
    assert d is not None and d.exact == 0.75
    b = compare_output(np.array([b"a", b"b"], dtype=object), np.array([b"a", b"c"], dtype=object))
    assert b is not None and b.exact == 0.5 and math.isnan(b.mean_rel)


def test_shapes_or_missing_outputs_are_a_mismatch() -> None:
    assert compare_output(np.zeros(3), np.zeros(4)) is None
    assert compare({"a": np.zeros(2)}, {"b": np.zeros(2)}) is None
    assert compare({"a": np.zeros(2)}, {"a": np.zeros(2), "b": np.zeros(1)}) is not None


@pytest.mark.parametrize(
    ("text", "holds"),
    [("n>=200", True), ("n>200", False), ("mean_rel<=0.01", True), ("err_delta<0.01,p99_ratio<=1.2", True),
     ("match==1", True), ("max_abs>1e-3", False)],
)  # fmt: skip
def test_conditions(text: str, holds: bool) -> None:
    evidence = {
        "n": 200.0,
        "mean_rel": 0.005,
        "err_delta": 0.0,
        "p99_ratio": 1.1,
        "match": 1.0,
        "max_abs": 1e-4,
    }
    assert all(c.holds(evidence) for c in parse_conditions(text)) is holds


def test_a_missing_metric_never_holds() -> None:
    (c,) = parse_conditions("mean_rel<=1")
    assert not c.holds({"mean_rel": math.nan})
    assert not c.holds({})


@pytest.mark.parametrize("text", ["n>=", "speed<=1", "n=>3", "n>=abc"])
def test_bad_conditions_name_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_conditions(text, "rollback_when")
    assert err.value.details["field"] == "rollback_when"


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"weights": {"1": 90, "3": 10}}, "weights.3"), ({"weights": {"1": -1, "2": 2}}, "weights.1"),
     ({"weights": {"1": 0, "2": 0}}, "weights"), ({"weights": {}}, "weights"), ({}, "weights"),
     ({"weights": {"1": 1}, "sticky": "ip"}, "sticky"), ({"weights": {"1": 1}, "shadow": "9"}, "shadow"),
     ({"weights": {"1": 1}, "shadow": "2", "shadow_sample": 1.5}, "shadow_sample"),
     ({"weights": {"1": 1}, "promote_when": "x>1"}, "promote_when"), ({"weights": {"1": 1}, "colour": 1}, "colour"),
     ({"weights": {"1": "ten"}}, "weights.1")],
)  # fmt: skip
def test_bad_policies_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        policy_from_spec("m", spec, ("1", "2"))
    assert err.value.details["field"] == field


def test_a_good_policy() -> None:
    p = policy_from_spec(
        "m", {"weights": {"1": 90, "2": 10}, "sticky": "key", "shadow": "2", "shadow_sample": 0.25,
              "promote_when": "n>=200,mean_rel<=0.01", "rollback_when": "n>=50,err_delta>0.05"}, ("1", "2"),
    )  # fmt: skip
    assert p.doc()["promote_when"] == "n>=200,mean_rel<=0.01"
    assert p.doc()["weights"] == {"1": 90, "2": 10}
    assert policy_from_spec("m", {"weights": {"1": 1}, "shadow": "2"}, ("1", "2")).shadow_sample == 1.0


def _stats() -> dict[str, float]:
    batch = StatsBatch()
    from app.request_context import Routed

    routed = Routed("m", "1", 3, "2")
    for _ in range(10):
        batch.add("m", 3, "n:1")
        batch.add("m", 3, "n:2")
        diffs = compare({"y": np.array([1.0, 2.0, 3.0])}, {"y": np.array([1.0, 2.0, 3.1])})
        assert diffs is not None
        batch.comparison(routed, diffs)
    batch.add("m", 3, "err:2", 2)
    return dict(batch.sums[("m", 3)])


def test_evidence_and_decisions() -> None:
    stats = _stats()
    ev = evidence_of(stats, "1", "2", [1.0] * 100, [1.1] * 100)
    assert ev["n"] == 10 and ev["compared"] == 10
    assert ev["err"] == pytest.approx(0.2) and ev["err_delta"] == pytest.approx(0.2)
    assert ev["p99_ratio"] == pytest.approx(1.1)
    assert ev["mean_rel"] == pytest.approx((0.1 / 3) / float(np.std([1.0, 2.0, 3.0])))
    policy = Policy("m", {"1": 100}, shadow="2", shadow_sample=1.0,
                    promote_when=parse_conditions("n>=10,mean_rel<=0.1"),
                    rollback_when=parse_conditions("n>=10,err_delta>0.1"))  # fmt: skip
    assert decide(policy, ev) == "rollback"  # checked first
    assert decide(policy, {**ev, "err_delta": 0.0}) == "promote"
    assert decide(policy, {**ev, "n": 5, "err_delta": 0.0}) is None


def test_applied_decisions() -> None:
    canary = Policy("m", {"1": 90, "2": 10})
    assert applied(canary, "promote").weights == {"1": 0.0, "2": 100.0}
    assert applied(canary, "rollback").weights == {"1": 90, "2": 0.0}
    shadowed = Policy("m", {"1": 100}, shadow="2", shadow_sample=0.5)
    promoted = applied(shadowed, "promote")
    assert promoted.weights == {"1": 0.0, "2": 100.0} and promoted.shadow is None
    rolled = applied(shadowed, "rollback")
    assert rolled.weights == {"1": 100} and rolled.shadow is None and rolled.candidate is None


def test_shadow_calls_are_bounded_compared_and_counted() -> None:
    """Past TGW_TRAFFIC_SHADOW_MAX_IN_FLIGHT a sampled request is not shadowed (dropped, counted); a shadow
    call is compared with production's answer, a failing one counted as the shadow version's error."""
    import asyncio

    from app.clients.protocols import TritonCall, TritonResult
    from app.request_context import Routed
    from app.services.traffic import TrafficPolicies

    production = TritonResult("1", {"y": np.array([1.0, 2.0, 3.0], dtype=np.float32)}, {"y": "FP32"})
    call = TritonCall(model="m", version="1", inputs={}, datatypes={}, outputs=None, parameters={},
                      request_id="r", deadline=0.0)  # fmt: skip

    async def scenario() -> dict[str, float]:
        traffic = TrafficPolicies(None, shadow_max_in_flight=2)
        release = asyncio.Event()
        sent: list[TritonCall] = []

        async def send(c: TritonCall) -> TritonResult:
            sent.append(c)
            await release.wait()
            if c.request_id == "boom.shadow":
                raise RuntimeError("shadow down")
            return TritonResult("2", {"y": np.array([1.0, 2.0, 3.3], dtype=np.float32)}, {"y": "FP32"})

        routed = Routed("m", "1", 5, "2")
        traffic.shadow(routed, call, production, send)
        traffic.shadow(routed, replace(call, request_id="boom"), production, send)
        traffic.shadow(routed, call, production, send)  # a third while two are under way: dropped
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.sleep(0.01)
        assert {c.version for c in sent} == {"2"} and all(c.max_batch_rows == 0 for c in sent)
        assert [c.request_id for c in sent] == ["r.shadow", "boom.shadow"]
        return dict(traffic._batch.sums[("m", 5)])

    stats = asyncio.run(scenario())
    assert stats["calls:1>2"] == 2 and stats["cmp:1>2"] == 1 and stats["drop:1>2"] == 1
    assert stats["err:2"] == 1 and stats["serr:1>2"] == 1 and stats["n:2"] == 2
    assert stats["abs:1>2:y"] == pytest.approx(0.1, rel=1e-4)
