"""Traffic policies: which version of a model answers the requests that do not name one (canary weights,
sticky callers), which version shadows them (the same inputs sent to it after the client's answer, the two
answers compared output by output), and when a candidate version is promoted or rolled back on evidence.

A policy per model lives in Redis (the keys' Redis: nothing evicts it), under one hash tag so a Redis Cluster
keeps it in one slot::

    {tgw:traffic}:rev                      a counter: every change increments it (replicas poll it)
    {tgw:traffic}:models                   the set of models with a policy
    {tgw:traffic}:policy:<model>           hash: rev (the policy's revision), doc (its JSON), by, at
    {tgw:traffic}:stats:<model>:<rev>      hash: the evidence gathered under that revision (counts, sums)
    {tgw:traffic}:lat:<model>:<rev>:<v>    list: the latest latency samples (ms) of version v
    {tgw:traffic}:decisions:<model>        list: the latest promotions and rollbacks (JSON, newest first)
    {tgw:traffic}:lease                    the replica evaluating promote/rollback conditions (SET NX PX)

Every replica polls the counter (``TGW_TRAFFIC_POLL_INTERVAL_S``) and reloads the policies when it moved, so
a change applies everywhere within a second; a request for a model without a policy costs one dict lookup.

The version is decided once per request, for every door, in ``InferenceService.resolve`` (``route``):
requests that name a version are never redirected (nor shadowed, nor counted). Weights are over the ready
versions; a sticky policy maps the caller (its key id or tenant) to a stable point in [0, 1) (a hash of the
model and the caller), so a caller keeps its version while the weights do not change, and moving weight to
a version moves only the callers whose point falls in the moved share.

Evidence: every request routed under a policy is counted per version (answers and errors, latency samples of
those Triton answered); every shadow call too, and its comparison with the production answer, per output
tensor: max |s - p|, mean |s - p|, the latter relative to the production output's spread (its standard
deviation; its mean |p| when that is 0; else 1), and for integer/bool/BYTES outputs the exact-match rate.
The evidence is kept per revision (a change of policy starts afresh).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import math
import os
import random
import re
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson

from app.clients.protocols import TritonCall, TritonResult
from app.errors import InvalidInput
from app.observability import metrics
from app.request_context import Caller, Routed

logger = logging.getLogger(__name__)

PREFIX = "{tgw:traffic}"
REV_KEY = f"{PREFIX}:rev"
MODELS_KEY = f"{PREFIX}:models"
LEASE_KEY = f"{PREFIX}:lease"
STATS_TTL_S = 7 * 86400
DECISIONS_KEPT = 50
COMPARE_OFF_LOOP_BYTES = 1 << 20
MAX_WEIGHT = 1e6

METRIC_NAMES = ("n", "compared", "err", "err_delta", "p99_ratio", "mean_rel", "mean_abs", "max_abs", "match")
_CONDITION = re.compile(
    r"^\s*([a-z_0-9]+)\s*(<=|>=|==|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf)\s*$"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    ">": lambda a, b: a > b, "==": lambda a, b: a == b,
}  # fmt: skip


def version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (-1, v)


# --- conditions -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, evidence: Mapping[str, float]) -> bool:
        got = evidence.get(self.metric, math.nan)
        return not math.isnan(got) and _OPS[self.op](got, self.value)

    def __str__(self) -> str:
        value = int(self.value) if self.value.is_integer() else self.value
        return f"{self.metric}{self.op}{value}"


def parse_conditions(text: str | None, field_name: str = "promote_when") -> tuple[Condition, ...]:
    """``"n>=200,mean_rel<=0.01,err_delta<=0.01,p99_ratio<=1.2"``: every condition must hold. Metrics:
    ``METRIC_NAMES``; operators ``<= >= < > ==``. Empty: no conditions."""
    if text is None or not text.strip():
        return ()
    out: list[Condition] = []
    for part in text.split(","):
        m = _CONDITION.match(part)
        if m is None:
            raise InvalidInput(
                f"{field_name}: {part.strip()!r} is not <metric><op><number> (e.g. n>=200,mean_rel<=0.01)",
                {"field": field_name},
            )
        metric, op, value = m.group(1), m.group(2), float(m.group(3))
        if metric not in METRIC_NAMES:
            raise InvalidInput(
                f"{field_name}: unknown metric {metric!r}; expected one of {', '.join(METRIC_NAMES)}",
                {"field": field_name},
            )
        out.append(Condition(metric, op, value))
    return tuple(out)


def conditions_text(conds: tuple[Condition, ...]) -> str | None:
    return ",".join(str(c) for c in conds) if conds else None


# --- the policy -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Policy:
    model: str
    weights: dict[str, float]
    sticky: str | None = None  # "key" or "tenant"
    shadow: str | None = None
    shadow_sample: float = 0.0
    promote_when: tuple[Condition, ...] = ()
    rollback_when: tuple[Condition, ...] = ()
    revision: int = 0
    updated_by: str = ""
    updated_at: float = 0.0
    _choices: tuple[tuple[str, float], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        choices = tuple(
            (v, w) for v, w in sorted(self.weights.items(), key=lambda i: version_key(i[0])) if w > 0
        )
        object.__setattr__(self, "_choices", choices)

    @property
    def production(self) -> str | None:
        """The version with the largest weight (ties: the lowest version)."""
        if not self._choices:
            return None
        return max(self._choices, key=lambda c: (c[1], -version_key(c[0])[0]))[0]

    @property
    def candidate(self) -> str | None:
        """What promotion and rollback are about: the shadow version if any, else the highest version with a
        positive weight other than production's."""
        if self.shadow:
            return self.shadow
        prod = self.production
        others = [v for v, _ in self._choices if v != prod]
        return others[-1] if others else None

    def route(self, ready: tuple[str, ...], caller: Caller | None) -> Routed | None:
        """The version for one request that did not name one (None: no weighted version is ready, the
        registry's default applies) and whether it is shadowed."""
        choices = [c for c in self._choices if c[0] in ready]
        if not choices:
            return None
        who = _caller_id(self.sticky, caller)
        point = stable_point(self.model, who) if who else random.random()
        version = pick(choices, point)
        shadow = self.shadow
        if shadow and shadow != version and shadow in ready and random.random() < self.shadow_sample:
            return Routed(self.model, version, self.revision, shadow)
        return Routed(self.model, version, self.revision, None)

    def doc(self) -> dict[str, Any]:
        return {
            "model": self.model, "weights": {v: _num(w) for v, w in self.weights.items()},
            "sticky": self.sticky, "shadow": self.shadow, "shadow_sample": self.shadow_sample,
            "promote_when": conditions_text(self.promote_when),
            "rollback_when": conditions_text(self.rollback_when),
            "revision": self.revision, "updated_by": self.updated_by, "updated_at": _iso(self.updated_at),
            "production": self.production, "candidate": self.candidate,
        }  # fmt: skip


def _num(w: float) -> float | int:
    return int(w) if float(w).is_integer() else w


def _iso(t: float) -> str | None:
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _caller_id(sticky: str | None, caller: Caller | None) -> str:
    if sticky is None or caller is None:
        return ""
    return caller.key_id if sticky == "key" else caller.tenant


def stable_point(model: str, who: str) -> float:
    """A caller's point in [0, 1) for a model: the same for every replica and every request."""
    digest = hashlib.blake2b(f"{model}\x00{who}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(choices: list[tuple[str, float]] | tuple[tuple[str, float], ...], point: float) -> str:
    """The version whose share of the weights (in version order) holds ``point`` (in [0, 1))."""
    total = sum(w for _, w in choices)
    x = point * total
    for version, weight in choices:
        if x < weight:
            return version
        x -= weight
    return choices[-1][0]


def policy_from_spec(
    model: str, spec: Mapping[str, Any], versions: tuple[str, ...] | None, *, base: Policy | None = None
) -> Policy:
    """A policy from its JSON fields (the admin API's body, the CLI's flags), validated: weights only over
    ``versions`` (None: not checked), non-negative, summing to more than 0; ``sticky`` key or tenant;
    ``shadow`` an existing version, ``shadow_sample`` in [0, 1]; conditions parsed. Fields absent from
    ``spec`` keep ``base``'s values. Errors name the field (422)."""
    known = {"weights", "sticky", "shadow", "shadow_sample", "promote_when", "rollback_when"}
    extra = sorted(set(spec) - known - {"model", "revision", "updated_by", "updated_at", "production",
                                        "candidate", "decisions", "evidence"})  # fmt: skip
    if extra:
        raise InvalidInput(
            f"{extra[0]}: unknown field; expected {', '.join(sorted(known))}", {"field": extra[0]}
        )
    raw = spec.get("weights", base.weights if base else None)
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidInput('weights: expected an object of version -> weight, e.g. {"1": 90, "2": 10}',
                           {"field": "weights"})  # fmt: skip
    weights: dict[str, float] = {}
    for v, w in raw.items():
        v = str(v)
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= MAX_WEIGHT:
            raise InvalidInput(
                f"weights.{v}: expected a number in [0, {MAX_WEIGHT:g}]", {"field": f"weights.{v}"}
            )
        if versions is not None and v not in versions:
            raise InvalidInput(
                f"weights.{v}: model {model!r} has no version {v!r} (ready: {', '.join(versions) or 'none'})",
                {"field": f"weights.{v}", "ready_versions": list(versions)},
            )
        weights[v] = float(w)
    if sum(weights.values()) <= 0:
        raise InvalidInput("weights: they must sum to more than 0", {"field": "weights"})
    sticky = spec.get("sticky", base.sticky if base else None)
    if sticky not in (None, "key", "tenant"):
        raise InvalidInput("sticky: expected key, tenant or null", {"field": "sticky"})
    shadow = spec.get("shadow", base.shadow if base else None)
    if shadow is not None:
        shadow = str(shadow)
        if versions is not None and shadow not in versions:
            raise InvalidInput(
                f"shadow: model {model!r} has no version {shadow!r} (ready: {', '.join(versions) or 'none'})",
                {"field": "shadow", "ready_versions": list(versions)},
            )
    sample = spec.get("shadow_sample", base.shadow_sample if base else (1.0 if shadow else 0.0))
    if isinstance(sample, bool) or not isinstance(sample, int | float) or not 0.0 <= sample <= 1.0:
        raise InvalidInput("shadow_sample: expected a number in [0, 1]", {"field": "shadow_sample"})
    if shadow is None:
        sample = 0.0
    promote = spec.get("promote_when", conditions_text(base.promote_when) if base else None)
    rollback = spec.get("rollback_when", conditions_text(base.rollback_when) if base else None)
    for name, value in (("promote_when", promote), ("rollback_when", rollback)):
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{name}: expected a string like n>=200,mean_rel<=0.01", {"field": name})
    return Policy(
        model, weights, sticky, shadow, float(sample), parse_conditions(promote, "promote_when"),
        parse_conditions(rollback, "rollback_when"),
    )  # fmt: skip


def policy_from_record(model: str, record: Mapping[bytes, bytes]) -> Policy:
    doc = orjson.loads(record[b"doc"])
    p = policy_from_spec(model, doc, None)
    return replace(
        p, revision=int(record.get(b"rev", b"0")), updated_by=record.get(b"by", b"").decode(),
        updated_at=float(record.get(b"at", b"0") or 0),
    )  # fmt: skip


def spec_of(p: Policy) -> dict[str, Any]:
    return {
        "weights": {v: _num(w) for v, w in p.weights.items()}, "sticky": p.sticky, "shadow": p.shadow,
        "shadow_sample": p.shadow_sample, "promote_when": conditions_text(p.promote_when),
        "rollback_when": conditions_text(p.rollback_when),
    }  # fmt: skip


# --- comparison -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutputDiff:
    max_abs: float
    mean_abs: float
    mean_rel: float  # mean_abs / the production output's spread
    exact: float | None  # the exact-match rate of an integer, bool or BYTES output; None for floats


def spread(prod: np.ndarray) -> float:
    """The production output's spread, the scale of a relative difference: its standard deviation; its mean
    absolute value when that is 0 (a constant output); 1 when that is 0 too."""
    if prod.size == 0:
        return 1.0
    s = float(np.std(prod))
    if s > 0 and math.isfinite(s):
        return s
    m = float(np.mean(np.abs(prod)))
    return m if m > 0 and math.isfinite(m) else 1.0


def compare_output(prod: np.ndarray, shadow: np.ndarray) -> OutputDiff | None:
    """None when the two cannot be compared (other shapes, numbers against bytes)."""
    if prod.shape != shadow.shape:
        return None
    if prod.dtype.kind in "OSU" or shadow.dtype.kind in "OSU":
        if prod.dtype.kind not in "OSU" or shadow.dtype.kind not in "OSU":
            return None
        rate = float(np.mean(prod == shadow)) if prod.size else 1.0
        return OutputDiff(math.nan, math.nan, math.nan, rate)
    p, s = prod.astype(np.float64, copy=False), shadow.astype(np.float64, copy=False)
    if p.size == 0:
        return OutputDiff(0.0, 0.0, 0.0, 1.0 if prod.dtype.kind in "biu" else None)
    diff = np.abs(s - p)
    max_abs, mean_abs = float(np.max(diff)), float(np.mean(diff))
    exact = float(np.mean(prod == shadow)) if prod.dtype.kind in "biu" else None
    return OutputDiff(max_abs, mean_abs, mean_abs / spread(p), exact)


def compare(prod: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> dict[str, OutputDiff] | None:
    """Per output tensor of the production answer; None when the shadow's answer lacks one or one cannot be
    compared (a mismatch)."""
    out: dict[str, OutputDiff] = {}
    for name, p in prod.items():
        s = shadow.get(name)
        if s is None:
            return None
        d = compare_output(np.asarray(p), np.asarray(s))
        if d is None:
            return None
        out[name] = d
    return out


# --- evidence ---------------------------------------------------------------------------------------------
def p99(samples: list[float]) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def evidence_of(
    stats: Mapping[str, float], prod: str | None, cand: str | None,
    prod_lat: list[float], cand_lat: list[float],
) -> dict[str, float]:  # fmt: skip
    """The metrics conditions test (``METRIC_NAMES``) for ``cand`` against ``prod``: ``n`` the candidate's
    calls (canary requests, or shadow calls), ``err`` its error rate, ``err_delta`` that minus production's,
    ``p99_ratio`` its p99 latency over production's, ``compared`` the shadow answers compared with
    production's, ``mean_rel``/``mean_abs`` their mean (the worst output's), ``max_abs`` the largest
    difference seen, ``match`` the lowest exact-match rate of an integer output (1 when there is none)."""
    nan = math.nan
    if prod is None or cand is None:
        return dict.fromkeys(METRIC_NAMES, nan)
    n_c, e_c = stats.get(f"n:{cand}", 0.0), stats.get(f"err:{cand}", 0.0)
    n_p, e_p = stats.get(f"n:{prod}", 0.0), stats.get(f"err:{prod}", 0.0)
    err_c = e_c / n_c if n_c else nan
    err_p = e_p / n_p if n_p else 0.0
    pair = f"{prod}>{cand}"
    compared = stats.get(f"cmp:{pair}", 0.0)
    outputs = {k[len(f"rel:{pair}:") :] for k in stats if k.startswith(f"rel:{pair}:")}
    rel = max((stats[f"rel:{pair}:{o}"] / compared for o in outputs), default=nan) if compared else nan
    mean_abs = max((stats[f"abs:{pair}:{o}"] / compared for o in outputs), default=nan) if compared else nan
    max_abs = max((stats.get(f"max:{pair}:{o}", nan) for o in outputs), default=nan) if compared else nan
    matches = [stats[f"match:{pair}:{o}"] / compared for o in outputs if f"match:{pair}:{o}" in stats]
    p_p, p_c = p99(prod_lat), p99(cand_lat)
    return {
        "n": n_c, "compared": compared, "err": err_c, "err_delta": err_c - err_p,
        "p99_ratio": p_c / p_p if p_p and not math.isnan(p_p) else nan, "mean_rel": rel, "mean_abs": mean_abs,
        "max_abs": max_abs, "match": min(matches) if matches else (1.0 if compared else nan),
    }  # fmt: skip


def decide(policy: Policy, evidence: Mapping[str, float]) -> str | None:
    """ "rollback" (checked first), "promote" or None."""
    if policy.candidate is None:
        return None
    if policy.rollback_when and all(c.holds(evidence) for c in policy.rollback_when):
        return "rollback"
    if policy.promote_when and all(c.holds(evidence) for c in policy.promote_when):
        return "promote"
    return None


def applied(policy: Policy, decision: str) -> Policy:
    """The policy after a decision: promote gives the candidate all the weight and clears the shadow;
    rollback gives it weight 0 (and clears it as a shadow)."""
    cand = policy.candidate
    assert cand is not None
    if decision == "promote":
        weights = {v: 0.0 for v in policy.weights} | {cand: 100.0}
        return replace(policy, weights=weights, shadow=None, shadow_sample=0.0)
    weights = dict(policy.weights)
    if cand in weights:
        weights[cand] = 0.0
    if sum(weights.values()) <= 0:  # nothing else had weight: the production version keeps it all
        return replace(policy, shadow=None, shadow_sample=0.0)
    return replace(policy, weights=weights, shadow=None if policy.shadow == cand else policy.shadow,
                   shadow_sample=0.0 if policy.shadow == cand else policy.shadow_sample)  # fmt: skip


# --- the store --------------------------------------------------------------------------------------------
_PUT = """
local cur = redis.call('HGET', KEYS[1], 'rev')
if ARGV[1] ~= '' and cur ~= ARGV[1] then return -1 end
local rev = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'rev', rev, 'doc', ARGV[2], 'by', ARGV[3], 'at', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
return rev
"""
_DELETE = """
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('SREM', KEYS[3], ARGV[1])
  return redis.call('INCR', KEYS[2])
end
return 0
"""
_HMAX = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if cur == nil or tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


def policy_key(model: str) -> str:
    return f"{PREFIX}:policy:{model}"


def stats_key(model: str, revision: int) -> str:
    return f"{PREFIX}:stats:{model}:{revision}"


def latency_key(model: str, revision: int, version: str) -> str:
    return f"{PREFIX}:lat:{model}:{revision}:{version}"


def decisions_key(model: str) -> str:
    return f"{PREFIX}:decisions:{model}"


class TrafficStore:
    """The policies in Redis (the client gives bytes)."""

    def __init__(self, redis: Any, latency_samples: int = 1000) -> None:
        self.redis = redis
        self.latency_samples = latency_samples

    async def revision(self) -> int:
        raw = await self.redis.get(REV_KEY)
        return int(raw) if raw else 0

    async def get(self, model: str) -> Policy | None:
        record = await self.redis.hgetall(policy_key(model))
        return policy_from_record(model, record) if record else None

    async def all(self) -> dict[str, Policy]:
        models = sorted(m.decode() for m in await self.redis.smembers(MODELS_KEY))
        if not models:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for m in models:
            pipe.hgetall(policy_key(m))
        out: dict[str, Policy] = {}
        for m, record in zip(models, await pipe.execute(), strict=True):
            if record:
                try:
                    out[m] = policy_from_record(m, record)
                except Exception:
                    logger.exception("traffic policy of %s in Redis cannot be read; ignored", m)
        return out

    async def put(self, policy: Policy, by: str, expect_revision: int | None = None) -> Policy | None:
        """Store ``policy`` under a new revision (None: ``expect_revision`` was not the current one)."""
        doc = orjson.dumps(spec_of(policy))
        now = time.time()
        expected = "" if expect_revision is None else str(expect_revision)
        rev = int(await self.redis.eval(
            _PUT, 3, policy_key(policy.model), REV_KEY, MODELS_KEY, expected, doc, by, repr(now), policy.model
        ))  # fmt: skip
        if rev < 0:
            return None
        return replace(policy, revision=rev, updated_by=by, updated_at=now)

    async def delete(self, model: str) -> bool:
        return bool(int(await self.redis.eval(_DELETE, 3, policy_key(model), REV_KEY, MODELS_KEY, model)))

    async def set(
        self, model: str, spec: Mapping[str, Any], versions: tuple[str, ...] | None, by: str,
        *, merge: bool = False,
    ) -> Policy:  # fmt: skip
        """Validate and store a policy (``merge``: fields absent from ``spec`` keep the current policy's);
        the change is audited in the log."""
        base = await self.get(model) if merge else None
        policy = await self.put(policy_from_spec(model, spec, versions, base=base), by)
        assert policy is not None
        logger.warning("traffic policy for %s set by %s: revision %d %s", model, by, policy.revision,
                       spec_of(policy))  # fmt: skip
        return policy

    async def remove(self, model: str, by: str) -> bool:
        removed = await self.delete(model)
        if removed:
            logger.warning("traffic policy for %s removed by %s", model, by)
        return removed

    async def decide_now(self, model: str, decision: str, by: str) -> Policy | None:
        """A promotion or rollback asked for (``tgw traffic promote|rollback``, the admin API): None when
        the model has no policy; InvalidInput when it has no candidate."""
        policy = await self.get(model)
        if policy is None:
            return None
        cand, prod = policy.candidate, policy.production
        if cand is None:
            raise InvalidInput(
                f"{decision}: the policy of {model!r} has no candidate version (no shadow, no second "
                "weighted version)", {"field": "decision"},
            )  # fmt: skip
        after = await self.put(applied(policy, decision), by, policy.revision)
        if after is None:
            raise InvalidInput(f"{decision}: the policy changed meanwhile; try again", {"field": "revision"})
        await self.record_decision(model, {
            "decision": decision, "candidate": cand, "production": prod, "at": _iso(time.time()),
            "from_revision": policy.revision, "to_revision": after.revision, "conditions": None,
            "evidence": None, "by": by,
        })  # fmt: skip
        metrics.traffic_decision(model, decision)
        logger.warning("traffic policy for %s: %s of version %s (production %s) by %s; weights now %s",
                       model, decision, cand, prod, by, spec_of(after)["weights"])  # fmt: skip
        return after

    async def record_decision(self, model: str, entry: dict[str, Any]) -> None:
        key = decisions_key(model)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, orjson.dumps(entry))
        pipe.ltrim(key, 0, DECISIONS_KEPT - 1)
        await pipe.execute()

    async def decisions(self, model: str) -> list[dict[str, Any]]:
        return [orjson.loads(d) for d in await self.redis.lrange(decisions_key(model), 0, DECISIONS_KEPT - 1)]

    async def stats(self, model: str, revision: int) -> dict[str, float]:
        raw = await self.redis.hgetall(stats_key(model, revision))
        return {k.decode(): float(v) for k, v in raw.items()}

    async def latencies(self, model: str, revision: int, version: str) -> list[float]:
        return [float(x) for x in await self.redis.lrange(latency_key(model, revision, version), 0, -1)]

    async def flush(self, batch: StatsBatch) -> None:
        if batch.empty():
            return
        pipe = self.redis.pipeline(transaction=False)
        for (model, rev), fields in batch.sums.items():
            key = stats_key(model, rev)
            for f, v in fields.items():
                pipe.hincrbyfloat(key, f, v)
            pipe.expire(key, STATS_TTL_S)
        for (model, rev), highest in batch.maxes.items():
            key = stats_key(model, rev)
            for f, v in highest.items():
                pipe.eval(_HMAX, 1, key, f, repr(v))
        for (model, rev, version), samples in batch.latencies.items():
            key = latency_key(model, rev, version)
            pipe.lpush(key, *(f"{s:.3f}" for s in samples))
            pipe.ltrim(key, 0, self.latency_samples - 1)
            pipe.expire(key, STATS_TTL_S)
        await pipe.execute()

    async def summary(self, model: str) -> dict[str, Any] | None:
        """The policy, its evidence under its revision, and the decision history: what
        ``GET /v1/admin/models/{m}/traffic`` and ``tgw traffic show`` give. The decisions are read first: a
        decision is recorded after the policy it wrote, so the policy read next is that one or a later one
        (never a decision shown beside the weights it replaced)."""
        decisions = await self.decisions(model)
        policy = await self.get(model)
        if policy is None:
            return None
        stats = await self.stats(model, policy.revision)
        seen = {k.split(":")[1] for k in stats if k.startswith(("n:", "err:"))} | set(policy.weights)
        versions = sorted(seen | ({policy.shadow} if policy.shadow else set()), key=version_key)
        lat = {v: await self.latencies(model, policy.revision, v) for v in versions}
        per_version = {
            v: {
                "requests": int(stats.get(f"n:{v}", 0)), "errors": int(stats.get(f"err:{v}", 0)),
                "p50_ms": _round(_quantile(lat[v], 0.5)), "p99_ms": _round(p99(lat[v])),
                "latency_samples": len(lat[v]),
            }
            for v in versions
        }  # fmt: skip
        shadows: list[dict[str, Any]] = []
        for key in sorted(k for k in stats if k.startswith("calls:")):
            pair = key.split(":", 1)[1]
            prod_v, shadow_v = pair.split(">", 1)
            compared = stats.get(f"cmp:{pair}", 0.0)
            outputs = sorted({k[len(f"rel:{pair}:") :] for k in stats if k.startswith(f"rel:{pair}:")})
            shadows.append({
                "production": prod_v, "shadow": shadow_v, "calls": int(stats[key]), "compared": int(compared),
                "errors": int(stats.get(f"serr:{pair}", 0)), "mismatched": int(stats.get(f"mism:{pair}", 0)),
                "dropped": int(stats.get(f"drop:{pair}", 0)),
                "outputs": {
                    o: {
                        "mean_rel": _round(stats[f"rel:{pair}:{o}"] / compared if compared else math.nan, 6),
                        "mean_abs": _round(stats[f"abs:{pair}:{o}"] / compared if compared else math.nan, 6),
                        "max_abs": _round(stats.get(f"max:{pair}:{o}", math.nan), 6),
                        **({"exact_match": _round(stats[f"match:{pair}:{o}"] / compared, 4)}
                           if f"match:{pair}:{o}" in stats and compared else {}),
                    }
                    for o in outputs
                },
            })  # fmt: skip
        prod, cand = policy.production, policy.candidate
        evidence = evidence_of(
            stats, prod, cand, lat.get(prod, []) if prod else [], lat.get(cand, []) if cand else []
        )
        return {
            **policy.doc(),
            "versions": per_version,
            "shadow_comparisons": shadows,
            "evidence": {k: _round(v, 6) for k, v in evidence.items()},
            "decisions": decisions,
        }


def _quantile(samples: list[float], q: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round(x: float, digits: int = 3) -> float | None:
    return None if math.isnan(x) else round(x, digits)


@dataclass
class StatsBatch:
    """What this replica gathered since its last flush, per (model, revision)."""

    sums: defaultdict[tuple[str, int], defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    maxes: defaultdict[tuple[str, int], dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    latencies: defaultdict[tuple[str, int, str], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def empty(self) -> bool:
        return not (self.sums or self.maxes or self.latencies)

    def add(self, model: str, rev: int, name: str, value: float = 1.0) -> None:
        self.sums[(model, rev)][name] += value

    def max(self, model: str, rev: int, name: str, value: float) -> None:
        if math.isnan(value):
            return
        fields = self.maxes[(model, rev)]
        if value > fields.get(name, -math.inf):
            fields[name] = value

    def latency(self, model: str, rev: int, version: str, ms: float) -> None:
        samples = self.latencies[(model, rev, version)]
        if len(samples) < 1000:
            samples.append(ms)

    def comparison(self, routed: Routed, diffs: dict[str, OutputDiff]) -> None:
        pair = f"{routed.version}>{routed.shadow}"
        m, rev = routed.model, routed.revision
        self.add(m, rev, f"cmp:{pair}")
        for name, d in diffs.items():
            if not math.isnan(d.mean_rel):
                self.add(m, rev, f"rel:{pair}:{name}", d.mean_rel)
                self.add(m, rev, f"abs:{pair}:{name}", d.mean_abs)
                self.max(m, rev, f"max:{pair}:{name}", d.max_abs)
            else:  # a BYTES output: only its exact-match rate
                self.add(m, rev, f"rel:{pair}:{name}", 0.0)
                self.add(m, rev, f"abs:{pair}:{name}", 0.0)
            if d.exact is not None:
                self.add(m, rev, f"match:{pair}:{name}", d.exact)


# --- the runtime ------------------------------------------------------------------------------------------
Send = Callable[[TritonCall], Awaitable[TritonResult]]


class TrafficPolicies:
    """This replica's copy of the policies (``policies``: model -> Policy, read on every request that names
    no version), kept fresh by one background task, which also flushes the evidence gathered here to Redis
    and, while this replica holds the lease, applies promote/rollback conditions. ``redis`` None: no
    policies (traffic disabled)."""

    def __init__(
        self, redis: Any | None, *, poll_s: float = 0.5, shadow_max_in_flight: int = 8, lease_s: float = 5.0,
        evaluate_s: float = 1.0, latency_samples: int = 1000, timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        self.policies: dict[str, Policy] = {}
        self.store = TrafficStore(redis, latency_samples) if redis is not None else None
        self.poll_s, self.lease_s, self.evaluate_s, self.timeout_s = poll_s, lease_s, evaluate_s, timeout_s
        self.shadow_max_in_flight = shadow_max_in_flight
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._revision = -1
        self._batch = StatsBatch()
        self._shadows: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._leader = False
        self._last_evaluation = 0.0

    # the hot path ------------------------------------------------------------------------------------
    def served(self, routed: Routed, ok: bool, seconds: float, triton: bool) -> None:
        """A request routed under a policy was answered (``ok``) or failed; ``triton``: Triton answered it
        (its latency is a sample; a cached answer's is not)."""
        b, m, rev, v = self._batch, routed.model, routed.revision, routed.version
        b.add(m, rev, f"n:{v}")
        if not ok:
            b.add(m, rev, f"err:{v}")
        elif triton:
            b.latency(m, rev, v, seconds * 1000)
        metrics.traffic_request(m, v, "ok" if ok else "error")

    def shadow(self, routed: Routed, call: TritonCall, production: TritonResult, send: Send) -> None:
        """Send ``call``'s inputs to ``routed.shadow`` in the background (after the client's answer), compare;
        dropped (and counted) when ``TGW_TRAFFIC_SHADOW_MAX_IN_FLIGHT`` shadow calls are under way."""
        assert routed.shadow is not None
        if len(self._shadows) >= self.shadow_max_in_flight:
            self._batch.add(routed.model, routed.revision, f"drop:{routed.version}>{routed.shadow}")
            metrics.shadow_call(routed.model, routed.version, routed.shadow, "dropped")
            return
        # its own context: nothing it does is written to the client's request (its timings, its log line)
        task = asyncio.get_running_loop().create_task(
            self._shadow(routed, call, production, send), context=contextvars.Context()
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, routed: Routed, call: TritonCall, production: TritonResult, send: Send) -> None:
        await asyncio.sleep(0)  # the client's answer goes first
        shadow = routed.shadow
        assert shadow is not None
        m, rev, pair = routed.model, routed.revision, f"{routed.version}>{shadow}"
        shadow_call = replace(
            call, version=shadow, request_id=f"{call.request_id}.shadow" if call.request_id else "",
            deadline=time.monotonic() + self.timeout_s, max_batch_rows=0,
        )  # fmt: skip
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):
                result = await send(shadow_call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            b = self._batch  # the one in force now (a flush replaces it), the call counted with its outcome
            b.add(m, rev, f"calls:{pair}")
            b.add(m, rev, f"n:{shadow}")
            b.add(m, rev, f"err:{shadow}")
            b.add(m, rev, f"serr:{pair}")
            metrics.shadow_call(m, routed.version, shadow, "error")
            logger.debug("shadow call to %s version %s failed: %s", m, shadow, exc)
            return
        b = self._batch
        b.add(m, rev, f"calls:{pair}")
        b.add(m, rev, f"n:{shadow}")
        b.latency(m, rev, shadow, (time.perf_counter() - start) * 1000)
        size = sum(a.nbytes for a in production.outputs.values())
        if size > COMPARE_OFF_LOOP_BYTES:  # large answers compared in a worker thread (numpy frees the GIL)
            diffs = await asyncio.to_thread(compare, production.outputs, result.outputs)
        else:
            diffs = compare(production.outputs, result.outputs)
        if diffs is None:
            b.add(m, rev, f"mism:{pair}")
            metrics.shadow_call(m, routed.version, shadow, "mismatch")
            return
        b.comparison(routed, diffs)
        metrics.shadow_call(m, routed.version, shadow, "compared")
        for d in diffs.values():
            metrics.shadow_difference(m, routed.version, shadow, d.mean_rel, d.exact)

    # the background task -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the policies once (bounded: Redis down leaves none in force until it answers), then keep
        them fresh in the background."""
        if self.store is None or self._task is not None:
            return
        try:
            async with asyncio.timeout(2.0):
                await self.refresh()
        except Exception as exc:
            logger.warning("traffic policies not read at start-up (%s: %s); retrying in the background",
                           type(exc).__name__, exc)  # fmt: skip
        self._task = asyncio.get_running_loop().create_task(self._run(), name="traffic-policies")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._shadows):
            task.cancel()
        await self._flush()
        if self._leader and self.store is not None:
            try:
                await self.store.redis.eval(
                    _RELEASE,
                    1, LEASE_KEY, self.replica,
                )  # fmt: skip
            except Exception:
                logger.debug("traffic policies: the evaluation lease was not released", exc_info=True)
        if self.store is not None:
            await self.store.redis.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
                await self._flush()
                if time.monotonic() - self._last_evaluation >= self.evaluate_s:
                    self._last_evaluation = time.monotonic()
                    await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("traffic policies: Redis step failed (%s: %s); keeping the policies in force",
                               type(exc).__name__, exc)  # fmt: skip
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> bool:
        """Reload the policies when the revision counter moved (True)."""
        assert self.store is not None
        rev = await self.store.revision()
        if rev == self._revision:
            return False
        fresh = await self.store.all()
        if fresh != self.policies or self._revision < 0:
            for model, p in fresh.items():
                old = self.policies.get(model)
                if old is None or old.revision != p.revision:
                    logger.info(
                        "traffic policy in force for %s: revision %d set by %s: %s", model, p.revision,
                        p.updated_by, spec_of(p),
                    )  # fmt: skip
            for model in set(self.policies) - set(fresh):
                logger.info("traffic policy for %s removed: the latest ready version serves it", model)
        self.policies = fresh
        self._revision = rev
        return True

    async def _flush(self) -> None:
        if self.store is None or self._batch.empty():
            return
        batch, self._batch = self._batch, StatsBatch()
        await self.store.flush(batch)

    async def _hold_lease(self) -> bool:
        assert self.store is not None
        held = bool(
            int(await self.store.redis.eval(_RENEW, 1, LEASE_KEY, self.replica, int(self.lease_s * 1000)))
        )
        if held != self._leader:
            logger.info("traffic policies: this replica %s the evaluation lease", "holds" if held else "lost")
        self._leader = held
        return held

    async def evaluate(self) -> list[tuple[str, str]]:
        """Apply promote/rollback conditions (only while holding the lease); returns the decisions made."""
        assert self.store is not None
        governed = [p for p in self.policies.values() if (p.promote_when or p.rollback_when) and p.candidate]
        if not governed or not await self._hold_lease():
            return []
        made: list[tuple[str, str]] = []
        for policy in governed:
            summary_stats = await self.store.stats(policy.model, policy.revision)
            prod, cand = policy.production, policy.candidate
            assert cand is not None
            prod_lat = await self.store.latencies(policy.model, policy.revision, prod) if prod else []
            cand_lat = await self.store.latencies(policy.model, policy.revision, cand)
            evidence = evidence_of(summary_stats, prod, cand, prod_lat, cand_lat)
            decision = decide(policy, evidence)
            if decision is None:
                continue
            after = await self.store.put(applied(policy, decision), f"auto:{decision}", policy.revision)
            if after is None:
                continue  # changed meanwhile: evaluated again under the new revision
            entry = {
                "decision": decision, "candidate": cand, "production": prod, "at": _iso(time.time()),
                "from_revision": policy.revision, "to_revision": after.revision,
                "conditions": conditions_text(
                    policy.promote_when if decision == "promote" else policy.rollback_when
                ),
                "evidence": {k: _round(v, 6) for k, v in evidence.items()}, "by": self.replica,
            }  # fmt: skip
            await self.store.record_decision(policy.model, entry)
            metrics.traffic_decision(policy.model, decision)
            logger.warning(
                "traffic policy for %s: %s of version %s (production %s) on evidence %s; weights now %s",
                policy.model, decision, cand, prod, entry["evidence"], spec_of(after)["weights"],
            )  # fmt: skip
            made.append((policy.model, decision))
        if made:
            await self.refresh()
        return made
