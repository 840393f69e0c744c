"""tests/eventually.py: the waits of the suite, on a fake clock (no real time passes) and with tiny timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.eventually import eventually, eventually_async


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


def test_returns_the_first_truthy_value_without_waiting_when_it_is_there() -> None:
    clock = FakeClock()
    assert eventually(lambda: {"status": "ok"}, clock=clock, sleep=clock.sleep) == {"status": "ok"}
    assert clock.sleeps == []


def test_tries_every_interval_until_the_state_is_there() -> None:
    clock = FakeClock()
    values: Iterator[object] = iter([0, None, [], "", 7])
    assert eventually(lambda: next(values), timeout=5, interval=0.5, clock=clock, sleep=clock.sleep) == 7
    assert clock.sleeps == [0.5] * 4


def test_an_assertion_error_is_retried_and_the_checks_value_returned() -> None:
    clock = FakeClock()
    calls = []

    def check() -> str:
        calls.append(clock.now)
        assert len(calls) >= 3, "not yet"
        return "done"

    assert eventually(check, timeout=5, interval=1, clock=clock, sleep=clock.sleep) == "done"
    assert calls == [1000.0, 1001.0, 1002.0]


def test_times_out_with_the_message_the_elapsed_time_and_the_last_value() -> None:
    clock = FakeClock()
    seen = iter(range(100))
    with pytest.raises(AssertionError) as failed:
        eventually(lambda: next(seen) < 0, timeout=2, interval=0.5, message="the job finished", clock=clock,
                   sleep=clock.sleep)  # fmt: skip
    text = str(failed.value)
    assert text.startswith("the job finished: not within 2.0 s"), text
    assert "last value: False" in text
    # tried at 0, 0.5, 1, 1.5 and once more at the deadline; never slept past it
    assert clock.sleeps == [0.5] * 4 and clock.now == 1002.0


def test_times_out_with_the_last_assertion_chained() -> None:
    clock = FakeClock()
    n = 0

    def check() -> bool:
        nonlocal n
        n += 1
        assert n < 0, f"attempt {n}: status queued"
        return True

    with pytest.raises(AssertionError) as failed:
        eventually(check, timeout=1, interval=0.3, clock=clock, sleep=clock.sleep)
    assert "not within 1.0 s; last failure: AssertionError: attempt 5: status queued" in str(failed.value)
    assert isinstance(failed.value.__cause__, AssertionError)
    assert clock.sleeps == pytest.approx([0.3, 0.3, 0.3, 0.1])  # the last sleep ends at the deadline


def test_the_message_may_be_read_only_on_failure() -> None:
    clock = FakeClock()
    read = []

    def describe() -> str:
        read.append(True)
        return "log tail: boom"

    assert eventually(lambda: True, message=describe, clock=clock, sleep=clock.sleep)
    assert read == []
    with pytest.raises(AssertionError, match=r"^log tail: boom: not within"):
        eventually(lambda: False, timeout=0.1, message=describe, clock=clock, sleep=clock.sleep)
    assert read == [True]


def test_other_exceptions_end_the_wait_at_once_unless_ignored() -> None:
    clock = FakeClock()

    def refused() -> bool:
        raise ConnectionRefusedError("not listening yet")

    with pytest.raises(ConnectionRefusedError):
        eventually(refused, timeout=5, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []
    with pytest.raises(pytest.fail.Exception):  # a process that exited: no use waiting on
        eventually(lambda: pytest.fail("tgw serve exited"), timeout=5, clock=clock, sleep=clock.sleep)
    attempts = iter([ConnectionRefusedError("no"), ConnectionRefusedError("no"), None])

    def starting() -> str:
        exc = next(attempts)
        if exc is not None:
            raise exc
        return "ready"

    assert (
        eventually(starting, timeout=5, interval=1, ignoring=(OSError,), clock=clock, sleep=clock.sleep)
        == "ready"
    )
    with pytest.raises(AssertionError, match="last failure: ConnectionRefusedError: not listening yet"):
        eventually(refused, timeout=1, ignoring=(OSError,), clock=clock, sleep=clock.sleep)


def test_a_check_is_tried_at_least_once_with_a_zero_timeout() -> None:
    clock = FakeClock()
    assert eventually(lambda: 1, timeout=0, clock=clock, sleep=clock.sleep) == 1
    with pytest.raises(AssertionError, match=r"not within 0\.0 s"):
        eventually(lambda: 0, timeout=0, clock=clock, sleep=clock.sleep)


def test_real_clock_tiny_timeouts() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="never: not within"):
        eventually(lambda: False, timeout=0.05, interval=0.01, message="never")
    assert 0.05 <= time.monotonic() - started < 2.0
    ready_at = time.monotonic() + 0.03
    assert eventually(lambda: time.monotonic() >= ready_at, timeout=2, interval=0.005)


async def test_async_twin_awaits_checks_and_lets_the_loop_run() -> None:
    state = {"n": 0}

    async def bump() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
            state["n"] += 1

    task = asyncio.ensure_future(bump())
    assert await eventually_async(lambda: state["n"] == 3, timeout=2, interval=0.001)
    await task

    async def probe() -> int:
        return state["n"]

    assert await eventually_async(probe, timeout=1) == 3  # an awaitable's value is what is checked


async def test_async_twin_times_out_on_a_fake_clock() -> None:
    clock = FakeClock()

    async def check() -> bool:
        raise AssertionError("still running")

    with pytest.raises(
        AssertionError, match=r"^drained: not within 3\.0 s; last failure: AssertionError: still running"
    ):
        await eventually_async(check, timeout=3, interval=1, message="drained", clock=clock,
                               sleep=clock.async_sleep)  # fmt: skip
    assert clock.sleeps == [1, 1, 1]
