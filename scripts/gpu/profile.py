"""py-spy profiles under cache-miss load (scripts/gpu/run.sh runs this where a gateway target is missed).

Starts the stack as ``tgw bench`` does (Redis, Triton with the given configs, ``tgw serve`` with N workers),
and for each ``--concurrency`` level puts that many connections of unique inputs on the gateway for
``--seconds`` while py-spy records the busiest gateway worker and the Triton Python-backend stub
(``--format raw``: collapsed stacks). Writes ``<out>/profile-gateway-c<N>.txt`` and
``<out>/profile-stub-c<N>.txt`` and prints the top frames of each.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.bench.loadgen import Generator  # noqa: E402
from app.bench.payloads import TIMESERIES, make_targets  # noqa: E402
from app.bench.runner import BENCH_GATEWAY_ENV  # noqa: E402
from app.bench.stack import Stack  # noqa: E402
from app.bench.stats import merge  # noqa: E402


def top_frames(raw: Path, n: int = 25) -> str:
    """Self and inclusive sample shares per frame from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    if not total:
        return f"{raw.name}: no samples\n"
    lines = [f"{raw.name}: {total} samples", "  self:"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    lines.append("  inclusive:")
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(n)]
    return "\n".join(lines) + "\n"


def busiest(pids: list[int], seconds: float = 1.0) -> int:
    """The process that used the most CPU over ``seconds`` (under load: a busy uvicorn worker)."""
    import time

    import psutil

    def cpu(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    before = {pid: cpu(pid) for pid in pids}
    time.sleep(seconds)
    return max(pids, key=lambda pid: cpu(pid) - before[pid])


def profile_level(stack: Stack, gen: Generator, t: Any, c: int, a: argparse.Namespace, pyspy: str) -> None:
    import threading

    loaded: list[Any] = []
    load = threading.Thread(target=lambda: loaded.append(gen.run(t, c, 0.5, a.seconds + 2.5)))
    load.start()  # the load runs while the busiest worker is chosen and recorded
    pids = stack.server_pids()
    worker = busiest(stack.gateway_pids())
    stubs = [
        pid
        for pid in pids.get("triton", [])
        if "stub" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]
    procs = []
    for label, pid in ((f"gateway-c{c}", worker), (f"stub-c{c}", busiest(stubs, 0.2) if stubs else None)):
        if pid is None:
            continue
        out = a.out / f"profile-{label}.txt"
        cmd = [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(a.seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ]
        procs.append((label, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    load.join()
    r = merge(t.model.name, t.name, c, a.seconds + 2.5, loaded[0])
    print(
        f"profile load: gateway-miss c={c} workers={a.workers}: "
        f"{r.throughput_rps:,.0f} req/s p50 {r.p50_ms:.2f} ms, errors {r.errors}"
    )
    for label, out, proc in procs:
        text, _ = proc.communicate(timeout=60)
        print(
            f"py-spy ({label}, pid {proc.args[3]}) exit {proc.returncode}: "
            f"{text.decode(errors='replace')[-300:]}"
        )
        if out.exists():
            print(top_frames(out))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config-name", default="auto")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--generators", type=int, default=4)
    p.add_argument("--concurrency", default="64", help="levels, e.g. 1,64")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        print("profile: py-spy not found")
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="tgw-profile-"))
    stack = Stack(
        state,
        workers=a.workers,
        gateway_env=dict(BENCH_GATEWAY_ENV),
        model_config_name=a.config_name,
        load_models=[TIMESERIES.name],
    )
    gen = None
    try:
        stack.start()
        assert stack.triton is not None
        gen = Generator(a.generators)
        t = make_targets(
            TIMESERIES,
            ("127.0.0.1", stack.triton.http_port),
            ("127.0.0.1", stack.triton.grpc_port),
            ("127.0.0.1", stack.gateway_port),
            random.randrange(1, 1 << 23),
            ("gateway-miss",),
        )[0]
        for c in [int(x) for x in a.concurrency.split(",") if x]:
            profile_level(stack, gen, t, c, a, pyspy)
    finally:
        if gen is not None:
            gen.close()
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
