"""``tgw bench``: start the stack, load every target at every concurrency, write the reports."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bench import report
from app.bench.loadgen import Generator
from app.bench.payloads import (
    EXTRA_TARGETS,
    KEY_TARGETS,
    MODELS,
    TARGET_HELP,
    TARGET_NAMES,
    ModelSpec,
    TargetSpec,
    http_request_factory,
    key_targets,
    make_targets,
)
from app.bench.stack import Stack, cpu_seconds, machine_info, rss_bytes, triton_version
from app.bench.stats import LevelResult, merge, ratio, triton_counts
from app.bench.streams import STREAM_TARGET_HELP, STREAM_TARGETS, StreamLevel, StreamTarget
from app.launcher import LaunchError

logger = logging.getLogger("app.bench")

DEFAULT_LEVELS = (1, 8, 32, 64, 128)
QUICK_LEVELS = (1, 16)
AUTH_LEVELS = (1, 64)


@dataclass
class Options:
    out: Path
    models: list[str]
    targets: list[str]
    levels: list[int]
    duration_s: float
    warmup_s: float
    generators: int
    workers: int
    soak_requests: int
    soak_max_s: float
    wrk: bool
    quick: bool
    model_config_name: str = "auto"
    load_models: list[str] = field(default_factory=list)
    gateway_env: dict[str, str] = field(default_factory=dict)
    auth_levels: list[int] = field(default_factory=list)  # the auth phase's levels; empty: no auth phase
    stream_levels: list[int] = field(default_factory=list)  # the streaming phase's; empty: none
    stream_targets: list[str] = field(default_factory=list)
    stream_horizon: int = 20
    stream_rounds: int = 1  # the streaming plan run this many times in turn, each level's samples pooled
    strace: bool = False  # a short extra pass per gateway level under strace -c: system calls per request


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few seconds: 2 levels, 3 targets, tiny model (CI)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="report directory")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (missing ones are skipped)")
    p.add_argument("--targets", default=",".join(TARGET_NAMES),
                   help=", ".join(TARGET_NAMES) + "; also " + ", ".join(EXTRA_TARGETS))  # fmt: skip
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_LEVELS)), help="levels, e.g. 1,8,64")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    p.add_argument("--generators", type=int, default=2, help="load-generator processes")
    p.add_argument("--workers", type=int, default=int(os.environ.get("TGW_WORKERS", "2")),
                   help="gateway worker processes (TGW_WORKERS)")  # fmt: skip
    p.add_argument("--soak-requests", type=int, default=1_000_000,
                   help="cache-miss requests for the memory soak (0: skip)")  # fmt: skip
    p.add_argument("--soak-max-s", type=float, default=180.0,
                   help="soak time limit, even if short of --soak-requests")  # fmt: skip
    p.add_argument("--no-wrk", action="store_true", help="skip the cross-check against wrk")
    p.add_argument("--strace", action="store_true",
                   help="after each gateway level, a 2 s pass with `strace -c -f` attached to the gateway's "
                   "processes: system calls per request (strace slows that pass; its latencies are not kept)",
                   )  # fmt: skip
    p.add_argument("--auth-concurrency", default=",".join(map(str, AUTH_LEVELS)),
                   help="levels of the auth phase (gateway restarted with TGW_AUTH=required: "
                   "gateway-miss-key, gateway-hit-key on the tiny model); empty: skip it")  # fmt: skip
    p.add_argument("--stream-concurrency", default="1,64",
                   help="levels of the streaming phase (forecast_stream: time to first response and "
                   "gap between responses, gateway vs Triton direct, miss and replay); empty: skip it",
                   )  # fmt: skip
    p.add_argument("--stream-targets", default=",".join(STREAM_TARGETS), help=", ".join(STREAM_TARGETS))
    p.add_argument("--stream-horizon", type=int, default=20, help="responses per measured stream")
    p.add_argument("--stream-rounds", type=int, default=1,
                   help="run the streaming plan this many times in turn and pool each level's samples: "
                   "Triton direct and the gateway measured in alternation, so a drift of the machine's "
                   "speed falls on both (default: 1)")  # fmt: skip
    p.add_argument("--model-config-name", default=os.environ.get("TGW_TRITON_MODEL_CONFIG_NAME", "auto"),
                   help="Triton model configs to load: auto (gpu where a GPU is visible, else cpu), cpu, "
                        "gpu, gpu_eager, gpu_nobatch, gpu_eager_nobatch")  # fmt: skip
    p.add_argument("--load-models", default="",
                   help="comma-separated: Triton serves only these (copied to a repository)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="TGW_X=V",
                   help="gateway setting for this run (repeatable)")  # fmt: skip


# The gateway as the benchmark runs it (each can be overridden with --set): the in-process L1 on.
BENCH_GATEWAY_ENV = {"TGW_L1_CACHE_ENTRIES": "4096"}


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def options_from(args: argparse.Namespace) -> Options:
    env = {**BENCH_GATEWAY_ENV, **dict(item.split("=", 1) for item in args.set)}
    if args.quick:
        return Options(
            out=args.out, models=["identity_fp32"], targets=["triton-http", "gateway-miss", "gateway-hit"],
            levels=list(QUICK_LEVELS), duration_s=1.0, warmup_s=0.3, generators=min(args.generators, 2),
            workers=1, soak_requests=0, soak_max_s=0, wrk=False, quick=True, gateway_env=env,
            model_config_name=args.model_config_name, load_models=_csv(args.load_models),
        )  # fmt: skip
    return Options(
        out=args.out,
        models=[m for m in args.models.split(",") if m],
        targets=[t for t in args.targets.split(",") if t],
        levels=[int(c) for c in args.concurrency.split(",") if c],
        duration_s=args.duration,
        warmup_s=args.warmup,
        generators=args.generators,
        workers=args.workers,
        soak_requests=args.soak_requests,
        soak_max_s=args.soak_max_s,
        wrk=not args.no_wrk,
        quick=False,
        model_config_name=args.model_config_name,
        load_models=_csv(args.load_models),
        gateway_env=env,
        auth_levels=[int(c) for c in args.auth_concurrency.split(",") if c],
        stream_levels=[int(c) for c in args.stream_concurrency.split(",") if c],
        stream_targets=_csv(args.stream_targets),
        stream_horizon=args.stream_horizon,
        stream_rounds=max(1, args.stream_rounds),
        strace=args.strace,
    )


def say(msg: str) -> None:
    print(msg, flush=True)


def _level(gen: Generator, stack: Stack, t: TargetSpec, c: int, o: Options) -> LevelResult:
    pids = stack.server_pids()
    before = {k: cpu_seconds(v) for k, v in pids.items()}
    stats0 = triton_counts(stack.model_stats(t.model.name))
    t0 = time.monotonic()
    shards = gen.run(t, c, o.warmup_s, o.duration_s)
    wall = time.monotonic() - t0
    stats1 = triton_counts(stack.model_stats(t.model.name))
    result = merge(t.model.name, t.name, c, o.duration_s, shards)
    result.triton_inferences, result.triton_executions, result.triton_requests = (
        b - a for a, b in zip(stats0, stats1, strict=True)
    )
    result.server_cpu_cores = {k: round((cpu_seconds(v) - before[k]) / wall, 2) for k, v in pids.items()}
    if o.strace and t.name.startswith("gateway"):
        result.syscalls = syscalls_per_request(gen, pids["gateway"], t, c)
    return result


def syscalls_per_request(gen: Generator, pids: list[int], t: TargetSpec, c: int) -> dict[str, float]:
    """System calls per request of the processes ``pids`` (every thread) over a 2 s pass of ``t`` at ``c``,
    counted by ``strace -c -f`` (empty when strace is missing or may not attach)."""
    exe = shutil.which("strace")
    if exe is None or not pids:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        cmd = [exe, "-c", "-f", "-q", "-o", out.name]
        for pid in pids:
            cmd += ["-p", str(pid)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # attached to every thread before the pass begins
            shards = gen.run(t, c, 0.2, 2.0)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        requests = merge(t.model.name, t.name, c, 2.0, shards).requests
        calls = parse_strace_counts(Path(out.name).read_text())
    if not requests or not calls:
        return {}
    total = sum(calls.values())
    no_futex = total - calls.get("futex", 0)
    return {"total": round(total / requests, 1), "no_futex": round(no_futex / requests, 1)}


def parse_strace_counts(text: str) -> dict[str, int]:
    """``strace -c``'s table -> {syscall: calls} (the ``total`` line left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].replace(".", "", 1).isdigit() or parts[-1] == "total":
            continue
        try:
            calls[parts[-1]] = int(parts[3])
        except ValueError:
            continue
    return calls


def auth_phase(gen: Generator, stack: Stack, model: ModelSpec, salt: int, o: Options) -> list[LevelResult]:
    """The gateway restarted with ``TGW_AUTH=required`` and one key (limits far above the load), then
    gateway-miss and gateway-hit again with the key: what authentication and limiting cost per request,
    next to the same targets without keys in the same run."""
    import secrets
    import urllib.request

    admin = secrets.token_hex(32)
    env = {**o.gateway_env, "TGW_AUTH": "required", "TGW_KEY_PEPPER": secrets.token_hex(32),
           "TGW_ADMIN_TOKEN": admin}  # fmt: skip
    say("auth phase: the gateway restarted with TGW_AUTH=required and one API key …")
    stack.restart_gateway(env=env)
    spec = {"name": "bench", "rps": 1_000_000, "burst": 1_000_000, "concurrency": 0}
    request = urllib.request.Request(
        f"{stack.gateway_url}/v1/admin/keys", data=json.dumps(spec).encode(), method="POST",
        headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as resp:
        api_key = json.loads(resp.read())["key"]
    out = []
    plan = [(t, c) for t in key_targets(model, ("127.0.0.1", stack.gateway_port), salt, api_key)
            for c in o.auth_levels]  # fmt: skip
    for i, (t, c) in enumerate(plan, 1):
        r = _level(gen, stack, t, c, o)
        out.append(r)
        say(_line(i, len(plan), r))
    return out


def stream_phase(stack: Stack, salt: int, o: Options) -> dict[str, Any]:
    """The streaming targets (``app.bench.streams``) at each of ``o.stream_levels``: misses for every
    target, replays for the gateway's."""
    from app.bench import streams

    if not stack.model_ready(streams.MODEL):
        say(f"streaming phase skipped: {streams.MODEL} is not ready")
        return {}
    assert stack.triton is not None
    ports = {"triton-sse": stack.triton.http_port, "triton-grpc": stack.triton.grpc_port,
             "gateway-sse": stack.gateway_port, "gateway-ws": stack.gateway_port,
             "gateway-grpc": stack.gateway_grpc_port}  # fmt: skip
    plan: list[tuple[StreamTarget, int]] = []
    for name in o.stream_targets:
        if name not in ports:
            say(f"skipping stream target {name}: unknown (known: {', '.join(STREAM_TARGETS)})")
            continue
        for replay in (False, True) if name.startswith("gateway") else (False,):
            plan += [(StreamTarget(name, "127.0.0.1", ports[name], replay), c) for c in o.stream_levels]
    merged: dict[tuple[str, bool, int], StreamLevel] = {}
    cpu: dict[tuple[str, bool, int], list[dict[str, float]]] = {}
    rounds = o.stream_rounds
    say(f"streaming phase: {streams.MODEL}, {o.stream_horizon} responses a stream"
        + (f", {rounds} rounds in turn" if rounds > 1 else "") + " …")  # fmt: skip
    for rnd in range(rounds):
        for i, (target, c) in enumerate(plan, 1):
            if target.replay:
                streams.prime(target, o.stream_horizon)
            # each target's misses their own series (a stream stored through one door replays through all)
            own = salt + 10_000_000 * o.stream_targets.index(target.name) + 100_000_000 * rnd
            pids = stack.server_pids()
            before = {k: cpu_seconds(v) for k, v in pids.items()}
            t0 = time.monotonic()
            level = streams.measure(target, c, o.stream_horizon, o.warmup_s, o.duration_s, o.generators, own)
            wall = time.monotonic() - t0  # warm-up, measurement and the generators' start: CPU over all of it
            used = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
            level.server_cpu_cores = {k: round(v / wall, 2) for k, v in used.items()}
            key = (target.name, target.replay, c)
            cpu.setdefault(key, []).append(level.server_cpu_cores)
            merged[key] = streams.pooled(merged.get(key), level)
            r = level.row()
            tag = f"{i:>3}/{len(plan)}" + (f" r{rnd + 1}" if rounds > 1 else "")
            say(f"[{tag}] {r['target']:<13} {r['cache']:<6} c={c:<4} {r['streams']:>6} streams  "
                f"first p50 {r['first_p50_ms']:7.2f} p99 {r['first_p99_ms']:7.2f} ms  "
                f"gap p50 {r['gap_p50_ms']:6.3f} p99 {r['gap_p99_ms']:7.3f} ms  err {r['errors']}  cpu "
                + " ".join(f"{k}={v:.2f}" for k, v in level.server_cpu_cores.items())
                + (f"\n      errors: {r['error_samples'][0]}" if r["error_samples"] else ""))  # fmt: skip
    levels = list(merged.values())
    for key, level in merged.items():  # CPU: the rounds' mean
        samples = cpu[key]
        level.server_cpu_cores = {
            k: round(sum(s.get(k, 0.0) for s in samples) / len(samples), 2) for k in samples[0]
        }
    say(streams.table(levels))
    goals = streams.checks(levels)
    for g in goals:
        say(f"  {'met' if g['met'] else 'NOT MET'}: {g['name']}: {g['measured']} (goal {g['goal']})")
    targets = {k: v for k, v in STREAM_TARGET_HELP.items() if k in o.stream_targets}
    return {"horizon": o.stream_horizon, "rounds": rounds, "levels": [lv.row() for lv in levels],
            "checks": goals, "targets": targets}  # fmt: skip


def _line(i: int, n: int, r: LevelResult) -> str:
    cache = ",".join(f"{k}:{v}" for k, v in sorted(r.cache.items()))
    srv = " ".join(f"{k}={v:.2f}" for k, v in r.server_cpu_cores.items())
    gw_us = 1e6 * r.server_cpu_cores.get("gateway", 0.0) / r.throughput_rps if r.throughput_rps else 0.0
    if gw_us:
        srv += f" (gateway {gw_us:,.0f} µs CPU/req)"
    return (
        f"[{i:>3}/{n}] {r.model:<22} {r.target:<16} c={r.concurrency:<4} {r.throughput_rps:>9,.0f} req/s  "
        f"p50 {r.p50_ms:6.2f}  p99 {r.p99_ms:7.2f}  max {r.max_ms:7.1f} ms  err {r.errors}  "
        f"gen {r.generator_cpu_cores:.2f} cores (max {r.generator_cpu_max_pct:.0f}%)  cpu {srv}"
        + (f"  [{cache}]" if cache else "")
        + (
            f"  batch {r.batch_formed:.1f} ({r.triton_inferences:,} rows, {r.triton_requests:,} requests / "
            f"{r.triton_executions:,} executions)"
            if r.triton_executions
            else ""
        )
        + (f"\n      errors: {r.error_samples[0]}" if r.error_samples else "")
    )


def run_wrk(url: str, body_request: bytes, concurrency: int, duration_s: float) -> dict[str, Any] | None:
    """``wrk`` with the same request body (fixed), for a cross-check of one figure."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    _, _, body = body_request.partition(b"\r\n\r\n")
    script = (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{body.decode()}]==]\n"  # level-2 long string: JSON bodies contain "]]"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    try:
        threads = max(1, min(2, concurrency))
        proc = subprocess.run(
            [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, int(duration_s))}s", "--latency",
             "-s", fh.name, url],
            capture_output=True, text=True, timeout=duration_s + 30, check=False,
        )  # fmt: skip
    finally:
        os.unlink(fh.name)
    out = proc.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = dict(re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)", out, re.M))

    def ms(text: str | None) -> float:
        if not text:
            return math.nan
        v = float(re.sub(r"[a-z]+$", "", text))
        unit = re.sub(r"^[\d.]+", "", text)
        return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}.get(unit, math.nan)

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "throughput_rps": float(m.group(1)) if m else math.nan,
        "p50_ms": ms(lat.get("50")),
        "p90_ms": ms(lat.get("90")),
        "p99_ms": ms(lat.get("99")),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "raw": out[-1500:],
    }


def soak(gen: Generator, stack: Stack, t: TargetSpec, total: int, o: Options) -> dict[str, Any]:
    """Cache-miss load at concurrency 64 until ``total`` requests; the gateway workers' RSS after each
    chunk. Growth is measured from the sample nearest 200 k requests to the last one."""
    samples: list[dict[str, Any]] = []
    done = 0
    t_start = time.monotonic()
    while done < total and time.monotonic() - t_start < o.soak_max_s:
        shards = gen.run(t, 64, 0.0, 5.0)
        r = merge(t.model.name, t.name, 64, 5.0, shards)
        done += r.requests + r.errors
        rss = rss_bytes(stack.gateway_pids())
        samples.append({"requests": done, "rss_mb": {str(k): round(v / 2**20, 1) for k, v in rss.items()},
                        "throughput_rps": round(r.throughput_rps), "errors": r.errors})  # fmt: skip
        say(f"  soak: {done:>9,} requests, gateway RSS (MB) {samples[-1]['rss_mb']}, "
            f"{r.throughput_rps:,.0f} req/s")  # fmt: skip
    workers = [p for p in stack.gateway_pids()[1:]] or stack.gateway_pids()
    per_worker_final = {str(p): samples[-1]["rss_mb"].get(str(p), math.nan) for p in workers}
    ref = min(samples, key=lambda s: abs(s["requests"] - 200_000))
    last = samples[-1]["rss_mb"]
    growth = {
        str(p): round(last.get(str(p), math.nan) - ref["rss_mb"].get(str(p), math.nan), 1) for p in workers
    }
    return {
        "requests": done, "seconds": round(time.monotonic() - t_start, 1), "samples": samples,
        "worker_rss_mb_final": per_worker_final, "worker_growth_mb_after_200k": growth,
        "reference_requests": ref["requests"],
    }  # fmt: skip


def check_targets(results: Sequence[LevelResult], soak_doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    def get(model: str, target: str, c: int) -> LevelResult | None:
        return next((r for r in results if (r.model, r.target, r.concurrency) == (model, target, c)), None)

    out: list[dict[str, Any]] = []

    def tp_ratio(name: str, model: str, target: str, goal: float) -> None:
        a, b = get(model, target, 64), get(model, "triton-http", 64)
        if a and b:
            v = ratio(a.throughput_rps, b.throughput_rps)
            out.append({"name": name, "measured": f"{v:.2f}x", "goal": f">= {goal}x", "met": v >= goal})

    tp_ratio("tiny: cache-miss throughput / Triton HTTP, c=64", "identity_fp32", "gateway-miss", 0.5)
    tp_ratio("tiny: cache-hit throughput / Triton HTTP, c=64", "identity_fp32", "gateway-hit", 1.0)
    a, b = get("identity_fp32", "gateway-miss", 1), get("identity_fp32", "triton-http", 1)
    if a and b:
        d50, d99 = a.p50_ms - b.p50_ms, a.p99_ms - b.p99_ms
        out.append({"name": "tiny: added p50 at c=1 (miss)", "measured": f"{d50:.3f} ms", "goal": "<= 0.3 ms",
                    "met": d50 <= 0.3})  # fmt: skip
        out.append({"name": "tiny: added p99 at c=1 (miss)", "measured": f"{d99:.3f} ms", "goal": "<= 1 ms",
                    "met": d99 <= 1.0})  # fmt: skip
    tp_ratio("transformer_timeseries: miss throughput / Triton HTTP, c=64", "transformer_timeseries",
             "gateway-miss", 0.8)  # fmt: skip
    if soak_doc:
        final = max(soak_doc["worker_rss_mb_final"].values(), default=math.nan)
        growth = max(soak_doc["worker_growth_mb_after_200k"].values(), default=math.nan)
        n = soak_doc["requests"]
        out.append({"name": f"gateway RSS per worker after {n:,} requests", "measured": f"{final:.0f} MB",
                    "goal": "< 250 MB", "met": final < 250})  # fmt: skip
        out.append({"name": "RSS growth, ~200 k -> end", "measured": f"{growth:+.1f} MB", "goal": "< 5 MB",
                    "met": growth < 5})  # fmt: skip
    return out


def run(o: Options) -> int:
    t_begin = time.monotonic()
    o.out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="tgw-bench-"))
    say(f"tgw bench: {'quick' if o.quick else 'full'} run; levels {o.levels}, {o.duration_s:g} s each "
        f"(+{o.warmup_s:g} s warm-up); {o.generators} generator processes; gateway workers {o.workers}; "
        f"reports in {o.out}/")  # fmt: skip
    stack = Stack(state, workers=o.workers, gateway_env=o.gateway_env, model_config_name=o.model_config_name,
                  load_models=o.load_models)  # fmt: skip
    gen: Generator | None = None
    results: list[LevelResult] = []
    meta: dict[str, Any] = {"machine": machine_info()}
    try:
        say("starting Redis, Triton and the gateway …")
        stack.start()
        gen = Generator(o.generators)
        assert stack.triton is not None
        meta["triton_version"] = triton_version(stack)
        meta["model_config_name"] = stack.triton.model_config_name
        say(f"Triton model configs: {stack.triton.model_config_name}")
        models = []
        for name in o.models:
            if name not in MODELS:
                say(f"skipping model {name}: unknown to the harness (known: {', '.join(MODELS)})")
            elif not stack.model_ready(name):
                say(f"skipping model {name}: not in the model repository (or not ready) on this checkout")
            else:
                models.append(MODELS[name])
        salt = random.randrange(1, 1 << 23)
        gw = ("127.0.0.1", stack.gateway_port)
        th = ("127.0.0.1", stack.triton.http_port)
        tg = ("127.0.0.1", stack.triton.grpc_port)
        gg = ("127.0.0.1", stack.gateway_grpc_port)
        plan = [(t, c) for m in models for t in make_targets(m, th, tg, gw, salt, tuple(o.targets), gg)
                for c in o.levels]  # fmt: skip
        for i, (t, c) in enumerate(plan, 1):
            r = _level(gen, stack, t, c, o)
            results.append(r)
            say(_line(i, len(plan), r))
        if o.wrk and models:
            meta["wrk"] = []
            for name in ("triton-http", "gateway-hit"):
                t = make_targets(models[0], th, tg, gw, salt, (name,))[0]
                w = run_wrk(f"http://{t.host}:{t.port}{t.path}", http_request_factory(t, 0)(0), 64,
                            o.duration_s)  # fmt: skip
                if w is None:
                    say("wrk not found: skipping the cross-check (apt-get install wrk)")
                    break
                key = (t.model.name, name, 64)
                ours = next((r for r in results if (r.model, r.target, r.concurrency) == key), None)
                w.update(model=t.model.name, target=name, concurrency=64,
                         harness_rps=ours.throughput_rps if ours else None)  # fmt: skip
                meta["wrk"].append(w)
                say(f"wrk cross-check {t.model.name} {name} c=64: wrk {w['throughput_rps']:,.0f} req/s "
                    f"(p50 {w['p50_ms']:.2f}, p99 {w['p99_ms']:.2f} ms)"
                    + (f" vs harness {ours.throughput_rps:,.0f} req/s" if ours else "")
                    + (f" — INVALID: {w['non_2xx']} non-2xx answers" if w["non_2xx"] else ""))  # fmt: skip
        soak_doc = None
        if o.soak_requests and models and models[0].name == "identity_fp32":
            say(f"memory soak: {o.soak_requests:,} cache-miss requests at c=64 …")
            t = make_targets(models[0], th, tg, gw, salt + 1, ("gateway-miss",))[0]
            soak_doc = soak(gen, stack, t, o.soak_requests, o)
            meta["soak"] = soak_doc
        if o.stream_levels and o.stream_targets:
            meta["streams"] = stream_phase(stack, salt + 3, o)
        if o.auth_levels and models and models[0].name == "identity_fp32":
            results.extend(auth_phase(gen, stack, models[0], salt + 2, o))
        meta["targets_check"] = check_targets(results, soak_doc)
    except LaunchError as exc:
        say(f"could not start the stack: {exc}")
        return 1
    finally:
        if gen is not None:
            gen.close()
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)
    meta.update({
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(o).items()},
        "targets": {k: v for k, v in TARGET_HELP.items()
                    if k in o.targets or (k in KEY_TARGETS and any(r.target == k for r in results))},
        "seconds": round(time.monotonic() - t_begin, 1),
    })  # fmt: skip
    report.write_json(o.out / "results.json", results, meta)
    report.write_csv(o.out / "results.csv", results)
    report.write_markdown(o.out / "results.md", results, meta)
    plotted = report.write_plot(o.out / "results.png", results)
    say("")
    say(report.markdown(results, meta))
    cost_rows = report.costs(results)
    if cost_rows:
        say("cost per request (gateway CPU µs/req, system calls with --strace, added p50/p99 vs the same "
            "protocol direct to Triton):")  # fmt: skip
        for q in cost_rows:
            sys_text = f"  {q['syscalls']:.1f} syscalls" if q["syscalls"] is not None else ""
            added = (f"+{q['added_p50_ms']:.3f} / +{q['added_p99_ms']:.3f} ms vs {q['versus']}"
                     if q["added_p50_ms"] is not None else "")  # fmt: skip
            say(f"  {q['model']:<22} {q['target']:<18} c={q['concurrency']:<4} {q['gateway_cpu_us']:7,.0f} µs"
                f"{sys_text}  {added}")  # fmt: skip
    say("ratios gateway / Triton direct HTTP (throughput; added p50/p99 ms):")
    for q in report.ratios(results):
        say(f"  {q['model']:<22} {q['target']:<16} c={q['concurrency']:<4} {q['throughput_ratio']:.2f}x  "
            f"+{q['added_p50_ms']:.3f} / +{q['added_p99_ms']:.3f} ms")  # fmt: skip
    say(f"wrote {o.out}/results.json, results.csv, results.md" + (", results.png" if plotted else
        " (no plot: pip install matplotlib)") + f" in {meta['seconds']:.0f} s")  # fmt: skip
    errors = sum(r.errors for r in results) + sum(
        lv["errors"] for lv in meta.get("streams", {}).get("levels", [])
    )
    if errors:
        say(f"{errors} requests failed")
    return 1 if errors or not (results or meta.get("streams")) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tgw bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run(options_from(args))
