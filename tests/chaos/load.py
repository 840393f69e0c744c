"""Load for the chaos suite: a few client tasks sending cache-missing /v1 requests to one or more
gateways, each outcome recorded (status, latency), so a phase can say how many were sent and failed."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

MODEL = "identity_fp32"


@dataclass
class Outcome:
    started: float
    seconds: float
    status: int  # 0: no HTTP answer (connection refused/reset)
    gateway: str
    error: str = ""


@dataclass
class Load:
    """``with Load(urls, concurrency) as load: ...``: sends until the block ends, in its own thread."""

    urls: list[str]
    concurrency: int = 4
    timeout_s: float = 10.0
    pause_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=self.timeout_s + 10)

    async def _run(self) -> None:
        counter = itertools.count()  # spreads requests over the gateways, round-robin
        unique = itertools.count()  # makes every body different (cache misses)
        limits = httpx.Limits(
            max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency
        )
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:

            async def worker(i: int) -> None:
                rng = random.Random(i)
                while not self._stop.is_set():
                    url = self.urls[next(counter) % len(self.urls)]
                    body = {"inputs": {"INPUT0": [[rng.random(), rng.random(), float(next(unique))]]}}
                    start = time.monotonic()
                    try:
                        r = await client.post(f"{url}/v1/models/{MODEL}/infer", json=body)
                        outcome = Outcome(start, time.monotonic() - start, r.status_code, url,
                                          "" if r.status_code == 200 else r.text[:200])  # fmt: skip
                    except httpx.HTTPError as exc:
                        outcome = Outcome(start, time.monotonic() - start, 0, url, repr(exc)[:200])
                    self.outcomes.append(outcome)
                    if self.pause_s:
                        await asyncio.sleep(self.pause_s)

            await asyncio.gather(*(worker(i) for i in range(self.concurrency)))

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def summary(self) -> dict[str, object]:
        lat = sorted(o.seconds for o in self.outcomes) or [0.0]
        return {
            "sent": self.sent,
            "failed": len(self.failed),
            "statuses": dict(Counter(o.status for o in self.outcomes)),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1),
            "max_ms": round(lat[-1] * 1000, 1),
        }
