"""Issue 19 item 11, the pure routing state: an endpoint whose readiness probe timed out is "not
answering" (picked last) until a probe or a call gets an answer."""

from __future__ import annotations

import random

from app.clients.endpoints import Balancer


def test_a_missed_probe_marks_not_answering_until_an_answer() -> None:
    balancer = Balancer(rng=random.Random(2))
    balancer.set_names(["a", "b"])
    balancer.probe("a", ready=False, answered=False)
    assert not balancer.answering("a") and balancer.answering("b")
    assert {balancer.pick(["a", "b"]) for _ in range(50)} == {"b"}  # the frozen one is picked last
    balancer.probe("a", ready=False, answered=False)
    assert balancer.endpoints["a"].missed_probes == 2
    balancer.probe("b", ready=False, answered=False)
    assert not balancer.answering("b")
    assert balancer.pick(["a", "b"]) in ("a", "b")  # pick itself still picks; the router fails fast
    balancer.success("b")  # a call got an answer
    assert balancer.answering("b")
    balancer.probe("a", ready=True)  # answered (not ready would count too)
    assert balancer.answering("a") and balancer.snapshot()["a"]["answering"] is True


def test_a_not_ready_answer_is_still_an_answer() -> None:
    balancer = Balancer()
    balancer.set_names(["a", "b"])
    balancer.probe("a", ready=False)
    assert balancer.answering("a")
