"""``tgw usage``: usage per tenant from Redis (where the gateways meter it, ``app.services.usage``) as a
table and a per-day bar chart (rich), or CSV/JSON; ``tgw usage budget TENANT``: a tenant's monthly
budget. The same Redis and settings as ``tgw keys``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.exceptions import RedisError

from app.cli_common import stack_settings
from app.clients.redis import make_redis
from app.errors import GatewayError
from app.services import usage
from app.settings import redact_url

_METRICS_SHOWN = ("requests", "rows", "hits", "errors", "bytes_in", "bytes_out", "compute_s", "saved_s")
_HEADERS = {"bytes_in": "in", "bytes_out": "out", "compute_s": "compute s", "saved_s": "saved s"}


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "usage", help="usage per tenant: requests, rows, bytes, cache hits, errors, compute (docs/usage.md)"
    )
    parser.add_argument("--tenant", help="one tenant (default: every tenant metered)")
    parser.add_argument("--model", help="one model")
    parser.add_argument("--key", dest="key_id", help="one key id")
    parser.add_argument("--from", dest="start", help="ISO 8601 start (default: the start of this UTC month)")
    parser.add_argument("--to", dest="end", help="ISO 8601 end (default: now)")
    parser.add_argument(
        "--group-by", default="model", choices=usage.GROUP_BY, help="table rows (default model)"
    )
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.set_defaults(fn=cmd_usage, usage_command=None)
    usub = parser.add_subparsers(dest="usage_command")
    budget = usub.add_parser("budget", help="show or set a tenant's monthly budget (all its keys together)")
    budget.add_argument("tenant")
    budget.add_argument("--requests", type=float, help="requests per UTC month")
    budget.add_argument("--rows", type=float, help="rows per UTC month")
    budget.add_argument("--compute-s", type=float, help="Triton compute seconds per UTC month")
    budget.add_argument("--soft", type=float, default=0.8, help="Usage-Warning past this fraction (0.8)")
    budget.add_argument("--webhook-url", help='where usage.warning events go ("" removes it)')
    budget.add_argument("--clear", action="store_true", help="remove the budget")
    budget.set_defaults(fn=cmd_usage)


def cmd_usage(args: argparse.Namespace) -> int:
    settings = stack_settings("tgw usage")
    redis_url = settings.auth_redis_address

    async def run() -> int:
        redis = make_redis(redis_url, 5.0, settings.cache.redis_cluster)
        try:
            if args.usage_command == "budget":
                return await _budget(redis, args)
            return await _report(redis, args)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except GatewayError as exc:
        sys.stderr.write(f"tgw usage: {exc.message}\n")
        return 2
    except (RedisError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"tgw usage: Redis unreachable at {redact_url(redis_url)}: {type(exc).__name__}\n")
        return 1


async def _budget(redis: Any, args: argparse.Namespace) -> int:
    changing = args.clear or any(v is not None for v in (args.requests, args.rows, args.compute_s))
    if changing or args.webhook_url is not None:
        budget = None
        if not args.clear:
            text = ",".join(
                f"{name}={value}"
                for name, value in (
                    ("requests", args.requests),
                    ("rows", args.rows),
                    ("compute_s", args.compute_s),
                )
                if value is not None
            )
            budget = usage.parse_budget(f"{text},soft={args.soft}" if text else "none", "budget")
        if changing:
            await usage.set_tenant_budget(redis, args.tenant, budget, args.webhook_url)
        else:  # only the webhook URL: keep the budget
            current = (await usage.tenant_settings(redis, args.tenant))["budget"]
            kept = usage.Budget(**current) if current else None
            await usage.set_tenant_budget(redis, args.tenant, kept, args.webhook_url)
    shown = await usage.tenant_settings(redis, args.tenant)
    sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _report(redis: Any, args: argparse.Namespace) -> int:
    now = time.time()
    start = usage.parse_time(args.start, "--from", usage.month_start(now))
    end = usage.parse_time(args.end, "--to", datetime.now(UTC))
    tenants = [args.tenant] if args.tenant else await usage.tenants(redis)
    rows = await usage.query(redis, tenants, start, end, args.group_by, args.model, args.key_id)
    if args.format == "csv":
        sys.stdout.write(usage.to_csv(rows))
        return 0
    if args.format == "json":
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    try:
        import rich  # noqa: F401  (the table and the bars)
    except ImportError:
        sys.stderr.write("tgw usage: the table needs the rich package (pip install rich); "
                         "--format csv or json work without it\n")  # fmt: skip
        return 2
    days = await usage.query(redis, tenants, start, end, "day", args.model, args.key_id)
    _render(rows, days, args.group_by, start, end)
    return 0


def _render(
    rows: list[dict[str, Any]], days: list[dict[str, Any]], group_by: str, start: Any, end: Any
) -> None:
    """The table, then requests per day as bars (rich: imported here, only this command needs it)."""
    from rich.bar import Bar
    from rich.console import Console
    from rich.table import Table

    # piped or redirected (no terminal to measure): wide enough for every column, not rich's 80
    console = Console() if sys.stdout.isatty() else Console(width=140)
    span = f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    table = Table(title=f"usage by {group_by}, {span}")
    columns = [c for c in (rows[0] if rows else {"tenant": ""}) if c not in usage.FIELDS]
    for column in columns:
        table.add_column(column, no_wrap=True)
    for metric in _METRICS_SHOWN:
        table.add_column(_HEADERS.get(metric, metric), justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            *(str(row[c]) for c in columns), *(_cell(metric, row[metric]) for metric in _METRICS_SHOWN)
        )
    console.print(table)
    if not days:
        console.print("no usage in this range")
        return
    chart = Table(title="requests per day", show_header=True)
    chart.add_column("day")
    chart.add_column("tenant")
    chart.add_column("requests", justify="right")
    chart.add_column("", width=42)
    top = max(row["requests"] for row in days) or 1
    for row in sorted(days, key=lambda r: (r["day"], r["tenant"])):
        chart.add_row(row["day"], row["tenant"], str(row["requests"]), Bar(top, 0, row["requests"], width=40))
    console.print(chart)


def _cell(metric: str, value: Any) -> str:
    if metric in ("compute_s", "saved_s"):
        return f"{value:.3f}"
    if metric.startswith("bytes"):
        return _bytes(int(value))
    return str(value)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
