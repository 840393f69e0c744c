"""Many Triton endpoints: the address syntax of ``TGW_TRITON_URLS``, DNS expansion, and the pure routing
state (power-of-two-choices on outstanding requests, passive ejection with growing backoff, active
readiness probes, slow start, a retry budget). No I/O here except :func:`resolve`; the routed transport
(``app.clients.routed``) drives these classes, and tests/unit/test_endpoints.py checks them with a clock.

Address syntax, comma-separated, one item per Triton:

- ``host:8001``: the gRPC address (inference over gRPC too);
- ``grpc=host:8001;http=host:8000`` (or ``http=8000``, same host): inference over HTTP, admin over gRPC;
- ``dns:name:8001`` or ``dns:name:8001;http=8000``: every address ``name`` resolves to is one Triton (a
  Kubernetes headless Service); re-resolved every ``TGW_TRITON_RESOLVE_INTERVAL_S``.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True, order=True)
class EndpointAddress:
    """One Triton: its gRPC ``host:port`` and, when inference goes over HTTP, its HTTP ``host:port``."""

    grpc: str
    http: str | None = None

    @property
    def name(self) -> str:
        return self.grpc


@dataclass(frozen=True, slots=True)
class Target:
    """One item of ``TGW_TRITON_URLS``: a fixed address, or a DNS name standing for many."""

    address: EndpointAddress
    dns_host: str | None = None  # set: resolve this name; address then holds ports only
    grpc_port: int = 0
    http_port: int | None = None


def _host_port(text: str, what: str) -> tuple[str, int]:
    text = text.strip().removeprefix("grpc://").removeprefix("http://").rstrip("/")
    if text.startswith("["):  # [v6]:port
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port for {what}, got {text!r}")
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_triton_urls(text: str) -> list[Target]:
    """Parse ``TGW_TRITON_URLS`` (syntax in the module docstring); ``ValueError`` names the bad item."""
    targets: list[Target] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        dns = item.startswith("dns:")
        item = item.removeprefix("dns:").removeprefix("//")
        fields: dict[str, str] = {}
        for i, piece in enumerate(p.strip() for p in item.split(";")):
            key, eq, value = piece.partition("=")
            if not eq:
                if i != 0:
                    raise ValueError(f"expected key=value after ';' in {item!r}")
                key, value = "grpc", piece
            if key not in ("grpc", "http") or key in fields:
                raise ValueError(f"unknown or repeated key {key!r} in {item!r} (expected grpc= and http=)")
            fields[key] = value.strip()
        if "grpc" not in fields:
            raise ValueError(f"no gRPC address in {item!r}")
        host, port = _host_port(fields["grpc"], "Triton's gRPC endpoint")
        http_host, http_port = host, None
        if "http" in fields:
            if fields["http"].isdigit():
                http_port = int(fields["http"])
            else:
                http_host, http_port = _host_port(fields["http"], "Triton's HTTP endpoint")
        if dns:
            targets.append(Target(EndpointAddress(_join(host, port)), host, port, http_port))
        else:
            http = _join(http_host, http_port) if http_port is not None else None
            targets.append(Target(EndpointAddress(_join(host, port), http)))
    if not targets:
        raise ValueError("no Triton endpoint given")
    return targets


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(
    targets: Iterable[Target], lookup: Callable[[str], list[str]] | None = None
) -> list[EndpointAddress]:
    """The endpoints the targets stand for now (DNS names expanded, duplicates removed, sorted)."""
    lookup = lookup or _lookup
    out: set[EndpointAddress] = set()
    for target in targets:
        if target.dns_host is None:
            out.add(target.address)
            continue
        hosts = [target.dns_host] if _is_ip(target.dns_host) else lookup(target.dns_host)
        for host in hosts:
            http = _join(host, target.http_port) if target.http_port is not None else None
            out.add(EndpointAddress(_join(host, target.grpc_port), http))
    return sorted(out)


def _lookup(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class State(StrEnum):
    HEALTHY = "healthy"
    EJECTED = "ejected"  # out of rotation until ejected_until, then until a readiness probe succeeds
    SLOW_START = "slow_start"  # back, taking a growing share for slow_start_s


@dataclass
class EndpointHealth:
    name: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ejections: int = 0  # consecutive ejections without a healthy spell: the backoff exponent
    ejected_until: float = 0.0
    returned_at: float = float("-inf")
    state: State = State.HEALTHY
    requests: int = 0
    failures: int = 0
    retries: int = 0
    missed_probes: int = 0  # consecutive readiness probes not answered in time (a frozen Triton)

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "state": self.state.value, "outstanding": self.outstanding,
            "consecutive_failures": self.consecutive_failures, "ejections": self.ejections,
            "ejected_for_s": round(max(self.ejected_until - now, 0.0), 3) if self.state == "ejected" else 0,
            "requests": self.requests, "failures": self.failures, "answering": self.missed_probes == 0,
        }  # fmt: skip


@dataclass
class Balancer:
    """Which endpoint takes the next call, and which are out.

    - ``pick``: two random candidates, the one with fewer outstanding calls (weighted down during slow
      start) wins; ejected endpoints only when no candidate is left in rotation.
    - ``failure``: ``eject_after`` consecutive failures (or one ``connect`` failure: nothing listens)
      eject the endpoint for ``base_s * 2**k`` (capped at ``max_s``), never more than half the pool.
    - ``probe``: after the ejection time, a successful readiness probe brings it back in slow start.
    - ``answering``: the last readiness probe got an answer in time (or a call did since); an endpoint
      that is not is picked last, and when none serving a model is, the gateway fails fast (503).
    """

    eject_after: int = 3
    base_s: float = 1.0
    max_s: float = 30.0
    slow_start_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    endpoints: dict[str, EndpointHealth] = field(default_factory=dict)

    def set_names(self, names: Iterable[str]) -> None:
        wanted = set(names)
        for gone in set(self.endpoints) - wanted:
            del self.endpoints[gone]
        for name in sorted(wanted - set(self.endpoints)):
            self.endpoints[name] = EndpointHealth(name)

    def in_rotation(self, name: str) -> bool:
        return self.endpoints[name].state is not State.EJECTED

    def answering(self, name: str) -> bool:
        health = self.endpoints.get(name)
        return health is not None and health.missed_probes == 0

    def _weight(self, health: EndpointHealth, now: float) -> float:
        if health.state is State.SLOW_START:
            elapsed = now - health.returned_at
            if elapsed >= self.slow_start_s:
                health.state = State.HEALTHY
                return 1.0
            return max(0.1, elapsed / self.slow_start_s)
        return 1.0

    def pick(self, candidates: Sequence[str], exclude: Iterable[str] = ()) -> str | None:
        excluded = set(exclude)
        names = [n for n in candidates if n in self.endpoints and n not in excluded]
        rotation = [n for n in names if self.in_rotation(n)]
        live = [n for n in rotation if self.endpoints[n].missed_probes == 0] or rotation
        pool = live or names  # everyone out: try anyway rather than fail without trying
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        now = self.clock()
        a, b = self.rng.sample(pool, 2)
        ha, hb = self.endpoints[a], self.endpoints[b]
        score_a = (ha.outstanding + 1) / self._weight(ha, now)
        score_b = (hb.outstanding + 1) / self._weight(hb, now)
        return a if score_a <= score_b else b

    def start(self, name: str) -> None:
        health = self.endpoints.get(name)
        if health is not None:
            health.outstanding += 1
            health.requests += 1

    def finish(self, name: str) -> None:
        health = self.endpoints.get(name)
        if health is not None:
            health.outstanding = max(health.outstanding - 1, 0)

    def success(self, name: str) -> None:
        health = self.endpoints.get(name)
        if health is not None:
            health.consecutive_failures = 0
            health.missed_probes = 0  # it answered
            if health.state is not State.EJECTED:
                health.ejections = 0

    def failure(self, name: str, connect: bool = False) -> bool:
        """Record a failure; True when it ejected the endpoint."""
        health = self.endpoints.get(name)
        if health is None:
            return False
        health.failures += 1
        health.consecutive_failures += 1
        if health.state is State.EJECTED:
            return False
        if connect or health.consecutive_failures >= self.eject_after:
            return self._eject(health)
        return False

    def _eject(self, health: EndpointHealth) -> bool:
        ejected = sum(1 for h in self.endpoints.values() if h.state is State.EJECTED)
        if ejected + 1 > len(self.endpoints) // 2:
            return False  # never more than half the pool out
        now = self.clock()
        health.state = State.EJECTED
        health.ejected_until = now + min(self.base_s * 2**health.ejections, self.max_s)
        health.ejections += 1
        return True

    def due_for_probe(self, name: str) -> bool:
        """An ejected endpoint whose ejection time is over: a readiness probe may bring it back."""
        health = self.endpoints[name]
        return health.state is State.EJECTED and self.clock() >= health.ejected_until

    def probe(self, name: str, ready: bool, answered: bool = True) -> None:
        """The result of an active readiness probe (``answered``: within the probe timeout at all)."""
        health = self.endpoints.get(name)
        if health is None:
            return
        health.missed_probes = 0 if answered else health.missed_probes + 1
        if health.state is State.EJECTED:
            if ready and self.clock() >= health.ejected_until:
                health.state = State.SLOW_START
                health.returned_at = self.clock()
                health.consecutive_failures = 0
            return
        if ready:
            return
        self.failure(name, connect=True)  # not ready while in rotation: take it out (within the cap)

    def snapshot(self) -> dict[str, dict[str, object]]:
        now = self.clock()
        for health in self.endpoints.values():
            self._weight(health, now)  # settles slow start that has ended
        return {name: h.snapshot(now) for name, h in sorted(self.endpoints.items())}


@dataclass
class RetryBudget:
    """Retries allowed as a share of requests (token bucket): each request adds ``ratio`` of a token, a
    retry spends one; ``reserve`` tokens at start and at most, so a burst of failures on a quiet gateway
    can still retry, but a failing pool never doubles the load."""

    ratio: float = 0.2
    reserve: float = 10.0
    tokens: float = -1.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.reserve

    def request(self) -> None:
        self.tokens = min(self.tokens + self.ratio, max(self.reserve, 1.0))

    def try_spend(self) -> bool:
        if self.tokens >= 1.0 - 1e-9:  # float sums of ratio
            self.tokens -= 1.0
            return True
        return False
