"""Usage metering's pure logic (app.services.usage): outcomes, time buckets, budget arithmetic, the
accumulator, CSV. The Redis side is proven against the real Redis in tests/integration/test_usage.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from app.errors import InvalidInput
from app.observability.context import RequestInfo
from app.services.usage import (
    Budget,
    BudgetExhausted,
    UsageMeter,
    budget_state,
    hour_key,
    hour_of,
    hours_between,
    month_key,
    month_of,
    next_month_start,
    outcome_of,
    parse_budget,
    to_csv,
)

DEC_31_LATE = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def test_outcome_is_ok_or_the_http_status_for_every_door() -> None:
    assert outcome_of(200) == "ok" and outcome_of(202) == "ok" and outcome_of("OK") == "ok"
    assert outcome_of(429) == "429" and outcome_of("RESOURCE_EXHAUSTED") == "429"
    assert outcome_of("UNAVAILABLE") == "503" and outcome_of("DEADLINE_EXCEEDED") == "504"
    assert outcome_of("SOMETHING_NEW") == "500"


def test_buckets_are_utc_hours_and_months_with_the_tenant_as_hash_tag() -> None:
    assert hour_of(DEC_31_LATE) == "2026123123" and month_of(DEC_31_LATE) == "202612"
    assert next_month_start(DEC_31_LATE) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month_start(datetime(2026, 2, 3, tzinfo=UTC).timestamp()) == datetime(2026, 3, 1, tzinfo=UTC)
    assert hour_key("acme", "2026123123") == "tgw:usage:{acme}:h:2026123123"
    assert month_key("acme", "202612") == "tgw:usage:{acme}:m:202612"
    start = datetime(2026, 12, 31, 22, 30, tzinfo=UTC)
    assert hours_between(start, datetime(2027, 1, 1, 0, 5, tzinfo=UTC)) == [
        "2026123122",
        "2026123123",
        "2027010100",
    ]
    assert hours_between(start, start.replace(hour=21)) == []


def test_parse_budget() -> None:
    budget = parse_budget("requests=1000000,rows=5000000,compute_s=3600,soft=0.9")
    assert budget == Budget(1_000_000, 5_000_000, 3600, 0.9)
    assert parse_budget("compute_s=60") == Budget(0, 0, 60, 0.8)
    assert parse_budget("none") is None and parse_budget("requests=0") is None
    for bad in ("requests", "tokens=5", "requests=-1", "rows=x", "requests=5,soft=1.5"):
        with pytest.raises(InvalidInput):
            parse_budget(bad)


def test_budget_state_warns_past_soft_and_refuses_at_the_cap() -> None:
    budget = Budget(requests=10, compute_s=100, soft=0.8)
    assert budget_state("key", "k1", budget, {"requests": 7, "compute_s": 10}, DEC_31_LATE) is None
    warning = budget_state("key", "k1", budget, {"requests": 8, "compute_s": 10}, DEC_31_LATE)
    assert warning == "key=k1; metric=requests; used=8; limit=10"
    with pytest.raises(BudgetExhausted) as caught:
        budget_state("tenant", "acme", budget, {"requests": 3, "compute_s": 100.5}, DEC_31_LATE)
    exc = caught.value
    assert exc.status_code == 429 and exc.code == "budget_exhausted"
    assert exc.details == {
        "scope": "tenant", "name": "acme", "metric": "compute_s", "limit": 100, "used": 100.5,
        "resets_at": "2027-01-01T00:00:00Z",
    }  # fmt: skip
    assert exc.headers == {"Retry-After": "1"}


def _info(**fields: object) -> RequestInfo:
    info = RequestInfo(model="m", version="1", door="v1", tenant="acme", key_id="k1")
    for name, value in fields.items():
        setattr(info, name, value)
    return info


def test_the_accumulator_sums_per_tenant_key_model_door_and_outcome() -> None:
    meter = UsageMeter(redis=None)
    meter.record(_info(rows=2, bytes_in=16, bytes_out=16, cache="MISS", compute_s=0.5), 200)
    meter.record(_info(rows=2, bytes_in=16, bytes_out=16, cache="HIT", saved_s=0.5), 200)
    meter.record(_info(rows=1, cache="MISS", follower=True, saved_s=0.5), "OK")
    meter.record(_info(rows=1, cache="MISS"), 502)
    ok = meter.pending[("acme", "k1", "m", "1", "v1", "ok")]
    assert ok == [3, 5, 32, 32, 1, 1, 1, 0, 0.5, 1.0]
    assert meter.pending[("acme", "k1", "m", "1", "v1", "502")][:2] == [1, 1]
    anonymous = _info(tenant="", key_id="")
    meter.record(anonymous, 200)
    assert ("-", "-", "m", "1", "v1", "ok") in meter.pending


def test_the_local_count_reaches_a_cap_before_any_flush() -> None:
    async def run() -> None:
        meter = UsageMeter(redis=None)
        meter.watched["acme"] = 0.0  # as if checked before (no Redis read in this test)
        budget = Budget(requests=2, soft=0.5)
        assert await meter.check("acme", "k1", budget) is None
        meter.record(_info(), 200)
        assert await meter.check("acme", "k1", budget) == "key=k1; metric=requests; used=1; limit=2"
        meter.record(_info(), 200)
        assert meter.capped  # the flush task is woken: other replicas see it within one interval
        with pytest.raises(BudgetExhausted):
            await meter.check("acme", "k1", budget)
        assert await meter.check("acme", "k2", None) is None  # another key of the tenant: no budget

    asyncio.run(run())


def test_csv() -> None:
    rows = [{"tenant": "acme", "day": "2026-12-06", "requests": 3, "compute_s": 0.25}]
    assert to_csv(rows) == "tenant,day,requests,compute_s\nacme,2026-12-06,3,0.25\n"
    assert to_csv([]).startswith("requests,rows,")
