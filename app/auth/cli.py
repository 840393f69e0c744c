"""``tgw keys create|list|revoke|rotate``: manage API keys in Redis (TGW_REDIS_URL, TGW_KEY_PEPPER).

``create`` and ``rotate`` print, once, a JSON object with the key (``"key"``) and its id; only its HMAC
is stored, so it cannot be shown again."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from app.auth.admin import BudgetSpec, NewKey, create_key, update_budget
from app.auth.keys import KeyStore
from app.auth.principal import parse_tiers
from app.auth.stage import ADMIN_TIER
from app.cli_common import stack_settings
from app.clients.redis import make_redis
from app.errors import GatewayError
from app.services.usage import parse_budget
from app.settings import Settings, redact_url


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke, rotate (TGW_KEY_PEPPER, Redis)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="a new key, printed once as JSON")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--tenant", help="owner of its jobs (default: the name)")
    create.add_argument("--tier", help="a TGW_AUTH_TIERS tier or admin (default TGW_AUTH_DEFAULT_TIER)")
    create.add_argument("--rps", type=float, help="requests per second (default TGW_AUTH_DEFAULT_RPS)")
    create.add_argument("--burst", type=int, help="burst above the rate (default TGW_AUTH_DEFAULT_BURST)")
    create.add_argument("--concurrency", type=int, help="in-flight requests, 0 = unbounded")
    create.add_argument("--daily-quota", type=int, help="requests per UTC day, 0 = none")
    create.add_argument("--budget", help=_BUDGET_HELP)
    create.set_defaults(fn=cmd_keys)
    update = ksub.add_parser("update", help="change a key's monthly budget")
    update.add_argument("id")
    update.add_argument("--budget", required=True, help=_BUDGET_HELP + "; none removes it")
    update.set_defaults(fn=cmd_keys)
    ksub.add_parser("list", help="every key (never the key itself)").set_defaults(fn=cmd_keys)
    revoke = ksub.add_parser("revoke", help="revoke a key by id (effective within TGW_AUTH_KEY_CACHE_S)")
    revoke.add_argument("id")
    revoke.set_defaults(fn=cmd_keys)
    rotate = ksub.add_parser("rotate", help="a new secret for a key id, printed once")
    rotate.add_argument("id")
    rotate.add_argument("--grace-s", type=int, default=0, help="the old secret works this much longer")
    rotate.set_defaults(fn=cmd_keys)


_BUDGET_HELP = "monthly caps, e.g. requests=1000000,rows=5000000,compute_s=3600[,soft=0.8] (docs/usage.md)"


def budget_spec(text: str | None) -> BudgetSpec | None:
    """``--budget`` as the API's ``BudgetSpec`` (InvalidInput when malformed)."""
    budget = parse_budget(text, "--budget") if text is not None else None
    return BudgetSpec(**budget.as_dict()) if budget is not None else None


def _out(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def auth_redis_source(settings: Settings) -> tuple[str, str]:
    """(the variable that chose it, the address) of the Redis that holds keys."""
    chosen = (
        ("TGW_AUTH_REDIS_URL", settings.auth.auth_redis_url),
        ("TGW_JOBS_REDIS_URL", settings.jobs.jobs_redis_url),
        ("TGW_REDIS_URL", settings.cache.cache_redis_url),
    )
    for var, value in chosen:
        if value:
            return var, value
    return "TGW_REDIS_PORT", settings.auth_redis_address


class EvictingStore(Exception):
    """The keys' Redis may evict keys (an allkeys-* maxmemory-policy)."""


async def eviction_policy(redis: Any) -> str:
    """The server's maxmemory-policy (INFO works where CONFIG is disabled, as on managed Redis)."""
    info = await redis.info("memory")
    if "maxmemory_policy" not in info:  # a cluster client answers per node
        policies = {str(node.get("maxmemory_policy", "")) for node in info.values() if isinstance(node, dict)}
        return ",".join(sorted(policies))
    return str(info["maxmemory_policy"])


async def _with_store(settings: Settings, fn: Callable[[KeyStore], Awaitable[int]], writes: bool) -> int:
    assert settings.auth.key_pepper is not None
    redis = make_redis(settings.auth_redis_address, 2.0, settings.cache.redis_cluster)
    try:
        if writes:
            policy = await eviction_policy(redis)
            if "allkeys" in policy:
                raise EvictingStore(policy)
        return await fn(KeyStore(redis, settings.auth.key_pepper, timeout_s=5.0))
    finally:
        await redis.aclose()


def cmd_keys(args: argparse.Namespace) -> int:
    settings = stack_settings("tgw keys")
    if not settings.auth.key_pepper:
        sys.stderr.write("tgw keys needs TGW_KEY_PEPPER (the same secret the gateway uses)\n")
        return 2
    tiers = set(parse_tiers(settings.auth.auth_tiers)) | {ADMIN_TIER}

    async def run(store: KeyStore) -> int:
        cmd = args.keys_command
        if cmd == "create":
            try:
                spec = NewKey(
                    name=args.name, tenant=args.tenant, tier=args.tier, rps=args.rps, burst=args.burst,
                    concurrency=args.concurrency, daily_quota=args.daily_quota,
                    budget=budget_spec(args.budget),
                )  # fmt: skip
                _out(await create_key(store, settings.auth, tiers, spec))
            except (GatewayError, ValueError) as exc:
                sys.stderr.write(f"tgw keys create: {getattr(exc, 'message', exc)}\n")
                return 2
            return 0
        if cmd == "list":
            _out([rec.public() for rec in await store.list()])
            return 0
        if cmd == "update":
            try:
                updated = await update_budget(store, args.id, budget_spec(args.budget))
            except (GatewayError, ValueError) as exc:
                sys.stderr.write(f"tgw keys update: {getattr(exc, 'message', exc)}\n")
                return 2
            if updated is None:
                sys.stderr.write(f"no key {args.id!r}\n")
                return 1
            _out(updated)
            return 0
        if cmd == "revoke":
            if not await store.revoke(args.id):
                sys.stderr.write(f"no key {args.id!r}\n")
                return 1
            _out({"id": args.id, "revoked": True})
            return 0
        rotated = await store.rotate(args.id, args.grace_s)
        if rotated is None:
            sys.stderr.write(f"no key {args.id!r}\n")
            return 1
        token, rec = rotated
        _out({"key": token, **rec.public()})
        return 0

    var, address = auth_redis_source(settings)
    shown = redact_url(address)
    try:
        writes = args.keys_command in ("create", "rotate", "update")
        return asyncio.run(_with_store(settings, run, writes=writes))
    except EvictingStore as exc:
        sys.stderr.write(
            f"tgw keys: refusing to store keys in {shown} ({var}): its maxmemory-policy is {exc}, so Redis"
            " may evict them and valid keys would be refused. Point TGW_AUTH_REDIS_URL at a Redis with"
            " maxmemory-policy noeviction (docs/auth.md).\n"
        )
        return 2
    except (RedisError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"tgw keys: Redis unreachable at {shown} ({var}): {type(exc).__name__}: {exc}\n")
        return 1
