"""``tgw traffic set|show|promote|rollback|clear MODEL``: the models' traffic policies in Redis, reached
the way ``tgw keys`` reaches its keys (the same settings: TGW_AUTH_REDIS_URL, else the jobs', else the
cache's Redis, else the running ``tgw up``'s). Every change is audited in the log and applied by every
replica within TGW_TRAFFIC_POLL_INTERVAL_S (docs/traffic.md)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import math
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from app.cli_common import stack_settings
from app.clients.redis import make_redis
from app.errors import GatewayError
from app.launcher import StackState
from app.services.traffic import TrafficStore
from app.settings import Settings, redact_url

_EXAMPLE = "e.g. tgw traffic set vae_timeseries --weights 1=90,2=10 --shadow 2 --shadow-sample 0.25"


def add_parser(sub: Any) -> None:
    traffic = sub.add_parser(
        "traffic", help="traffic policies: canary weights, shadow traffic, promotion (docs/traffic.md)"
    )
    tsub = traffic.add_subparsers(dest="traffic_command", required=True)
    put = tsub.add_parser("set", help=f"set a model's policy (a new revision); {_EXAMPLE}")
    put.add_argument("model")
    put.add_argument(
        "--weights", required=True, help="VERSION=WEIGHT,... over ready versions, e.g. 1=90,2=10"
    )
    put.add_argument("--sticky", choices=("key", "tenant"), help="a caller keeps its version")
    put.add_argument("--shadow", help="a version the sampled requests' inputs also go to (compared)")
    put.add_argument("--shadow-sample", type=float, help="the share of requests shadowed, 0..1 (default 1)")
    put.add_argument("--promote-when", help="e.g. 'n>=200,mean_rel<=0.01,err_delta<=0.01,p99_ratio<=1.2'")
    put.add_argument("--rollback-when", help="e.g. 'n>=50,err_delta>0.05'")
    put.add_argument("--json", action="store_true", help="print the policy as JSON (the admin API's answer)")
    put.set_defaults(fn=cmd_traffic)
    show = tsub.add_parser("show", help="a model's policy, its evidence (shadow comparisons) and decisions")
    show.add_argument("model")
    show.add_argument("--json", action="store_true", help="as JSON (the admin API's GET answer)")
    show.set_defaults(fn=cmd_traffic)
    for name, text in (
        ("promote", "now: the candidate gets all the weight, the shadow is cleared"),
        ("rollback", "now: the candidate gets weight 0"),
        ("clear", "remove the policy: the latest ready version serves again"),
    ):
        p = tsub.add_parser(name, help=text)
        p.add_argument("model")
        if name != "clear":
            p.add_argument("--json", action="store_true", help="print the policy as JSON")
        p.set_defaults(fn=cmd_traffic)


def parse_weights(text: str) -> dict[str, float]:
    """``1=90,2=10`` -> {"1": 90.0, "2": 10.0}; ValueError naming the bad part."""
    out: dict[str, float] = {}
    for part in text.split(","):
        version, sep, weight = part.strip().partition("=")
        if not sep or not version.strip():
            raise ValueError(f"--weights: {part.strip()!r} is not VERSION=WEIGHT (e.g. 1=90,2=10)")
        try:
            out[version.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--weights: {weight.strip()!r} is not a number") from None
    return out


def ready_versions(settings: Settings, model: str) -> tuple[str, ...] | None:
    """The model's ready versions from Triton's repository index over HTTP (TGW_TRITON_HTTP_URL, or the
    running ``tgw up``'s); None when Triton cannot be asked (the gateway checks again on the admin API)."""
    state = StackState.read(settings.embedded.state_dir)
    url = settings.triton.triton_http_url or (state.env.get("TGW_TRITON_HTTP_URL") if state else None)
    if not url:
        return None
    request = urllib.request.Request(f"{url}/v2/repository/index", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=3) as resp:
            index = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return tuple(
        str(e.get("version", "")) for e in index if e.get("name") == model and e.get("state") == "READY"
    )


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.{digits}g}"
    return str(int(x)) if isinstance(x, float) else str(x)


def render(summary: dict[str, Any]) -> str:
    """``tgw traffic show``'s text."""
    s = summary
    weights = "  ".join(f"{v}={_num(w)}" for v, w in s["weights"].items())
    lines = [
        f"{s['model']}  revision {s['revision']}  (set by {s['updated_by']} at {s['updated_at']})",
        f"  weights        {weights}" + (f"   sticky by {s['sticky']}" if s["sticky"] else ""),
        f"  production     {s['production'] or '-'}   candidate {s['candidate'] or '-'}",
    ]
    if s["shadow"]:
        lines.append(
            f"  shadow         version {s['shadow']}, {_num(s['shadow_sample'] * 100)} % of requests"
        )
    if s["promote_when"]:
        lines.append(f"  promote when   {s['promote_when']}")
    if s["rollback_when"]:
        lines.append(f"  rollback when  {s['rollback_when']}")
    lines += ["", f"  {'version':<8} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}"]
    for v, row in s["versions"].items():
        lines.append(
            f"  {v:<8} {row['requests']:>9} {row['errors']:>7} {_num(row['p50_ms']):>8}"
            f" {_num(row['p99_ms']):>8}"
        )
    for c in s["shadow_comparisons"]:
        lines += [
            "",
            f"  shadow {c['production']} -> {c['shadow']}: {c['calls']} calls, {c['compared']} compared, "
            f"{c['errors']} errors, {c['mismatched']} mismatched, {c['dropped']} dropped",
            f"    {'output':<16} {'mean_rel':>10} {'mean_abs':>10} {'max_abs':>10} {'exact':>7}",
        ]
        for name, o in c["outputs"].items():
            lines.append(
                f"    {name:<16} {_num(o['mean_rel']):>10} {_num(o['mean_abs']):>10} {_num(o['max_abs']):>10}"
                f" {_num(o.get('exact_match')):>7}"
            )
    ev = s["evidence"]
    lines += ["", "  evidence       " + " ".join(f"{k}={_num(v)}" for k, v in ev.items())]
    if s["decisions"]:
        lines.append("  decisions")
        for d in s["decisions"]:
            why = f" on {d['conditions']}" if d.get("conditions") else ""
            lines.append(
                f"    {d['at']}  {d['decision']} {d['candidate']} (production {d['production']}) "
                f"by {d['by']}{why}: revision {d['from_revision']} -> {d['to_revision']}"
            )
            if d.get("evidence"):
                lines.append("      on " + " ".join(f"{k}={_num(v)}" for k, v in d["evidence"].items()))
    else:
        lines.append("  decisions      none yet")
    return "\n".join(lines)


def _out(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _with_store(settings: Settings, fn: Callable[[TrafficStore], Awaitable[int]]) -> int:
    redis = make_redis(settings.auth_redis_address, 2.0, settings.cache.redis_cluster)
    try:
        return await fn(TrafficStore(redis, settings.traffic.traffic_latency_samples))
    finally:
        await redis.aclose()


def cmd_traffic(args: argparse.Namespace) -> int:
    settings = stack_settings("tgw traffic")
    # the audit lines are the gateways' (each replica logs the revision it applies and who set it): here the
    # command's own output says what was done
    logging.getLogger("app.services.traffic").addHandler(logging.NullHandler())
    cmd, model = args.traffic_command, args.model

    async def run(store: TrafficStore) -> int:
        if cmd == "set":
            spec: dict[str, Any] = {"weights": parse_weights(args.weights)}
            for name in ("sticky", "shadow", "shadow_sample", "promote_when", "rollback_when"):
                if getattr(args, name) is not None:
                    spec[name] = getattr(args, name)
            versions = ready_versions(settings, model)
            if versions is None:
                sys.stderr.write("tgw traffic: Triton's HTTP address is unknown: versions not checked here\n")
            elif not versions:
                sys.stderr.write(f"tgw traffic: model {model!r} has no ready version in Triton\n")
                return 2
            await store.set(model, spec, versions, _who())
        elif cmd in ("promote", "rollback"):
            if await store.decide_now(model, cmd, _who()) is None:
                sys.stderr.write(f"tgw traffic: model {model!r} has no traffic policy\n")
                return 1
        elif cmd == "clear":
            if not await store.remove(model, _who()):
                sys.stderr.write(f"tgw traffic: model {model!r} has no traffic policy\n")
                return 1
            _out({"model": model, "removed": True})
            return 0
        summary = await store.summary(model)
        if summary is None:
            sys.stderr.write(f"tgw traffic: model {model!r} has no traffic policy\n")
            return 1
        if not args.json:
            sys.stdout.write(render(summary) + "\n")
        else:
            _out(summary)
        return 0

    try:
        return asyncio.run(_with_store(settings, run))
    except (GatewayError, ValueError) as exc:
        sys.stderr.write(f"tgw traffic {cmd}: {getattr(exc, 'message', exc)}\n")
        return 2
    except (RedisError, OSError, TimeoutError) as exc:
        shown = redact_url(settings.auth_redis_address)
        sys.stderr.write(f"tgw traffic: Redis unreachable at {shown}: {type(exc).__name__}: {exc}\n")
        return 1
