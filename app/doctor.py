"""``tgw doctor``: is the stack up, where, and is anything set up wrong. One line per check, ``ok`` /
``warn`` / ``FAIL``; exit 0 when nothing failed.

It reads the same settings as the stack (environment, ``.env``) and, where they name no Redis, the running
``tgw up``'s addresses (``<TGW_STATE_DIR>/stack.json``), as ``tgw keys`` does."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import redis

from app.cli_common import preflight, unknown_variables
from app.launcher import StackState
from app.settings import Settings, redact_url

Check = tuple[str, str, str]  # (verdict, what, detail)


def _get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def _redis_check(what: str, var: str, url: str, keys_store: bool) -> Check:
    shown = f"{redact_url(url)} ({var})"
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
            policy = str(client.info("memory").get("maxmemory_policy", "?"))
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return "FAIL", what, f"{shown}: unreachable ({type(exc).__name__})"
    if keys_store and policy.startswith("allkeys"):
        return "FAIL", what, f"{shown}: maxmemory-policy {policy} may evict keys and jobs; use noeviction"
    return "ok", what, f"{shown}: up, maxmemory-policy {policy}"


def _source(settings: Settings, chain: list[tuple[str, str | None]], default: str) -> tuple[str, str]:
    for var, value in chain:
        if value:
            return var, value
    return "default", default


def diagnose(settings: Settings, state: StackState | None) -> list[Check]:
    checks: list[Check] = []
    if state is not None:
        checks.append(("ok", "tgw up", f"running (pid {state.pid}), state in {settings.embedded.state_dir}"))
    else:
        none = f"none running on {settings.embedded.state_dir} (fine for `tgw serve` set-ups)"
        checks.append(("warn", "tgw up", none))
    host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::", "") else settings.server.host
    base = f"http://{host}:{settings.server.port}"
    code, _ = _get(f"{base}/healthz")
    checks.append(
        ("ok" if code == 200 else "FAIL", "gateway", f"{base}/healthz answered {code or 'nothing'}")
    )
    if code == 200:
        code, body = _get(f"{base}/readyz")
        detail = json.dumps(body)[:300] if body is not None else ""
        checks.append(("ok" if code == 200 else "FAIL", "gateway ready", f"/readyz {code}: {detail}"))
    if settings.cache.cache_enabled:
        chain = [("TGW_REDIS_URL", settings.cache.cache_redis_url)]
        var, url = _source(settings, chain, settings.cache_redis_address)
        checks.append(_redis_check("cache Redis", var, url, keys_store=False))
    chain = [("TGW_AUTH_REDIS_URL", settings.auth.auth_redis_url),
             ("TGW_JOBS_REDIS_URL", settings.jobs.jobs_redis_url),
             ("TGW_REDIS_URL", settings.cache.cache_redis_url)]  # fmt: skip
    var, url = _source(settings, chain, settings.auth_redis_address)
    checks.append(_redis_check("keys and jobs Redis", var, url, keys_store=True))
    triton_http = settings.triton.triton_http_url or (state.env.get("TGW_TRITON_HTTP_URL") if state else None)
    if triton_http:
        code, _ = _get(f"{triton_http}/v2/health/ready")
        checks.append(("ok" if code == 200 else "FAIL", "Triton", f"{triton_http} ready: {code == 200}"))
        request = urllib.request.Request(f"{triton_http}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                index = json.loads(resp.read())
            states = {f"{m['name']}": m.get("state", "?") for m in index if isinstance(m, dict)}
            bad = {name: st for name, st in states.items() if st != "READY"}
            verdict = "warn" if bad else "ok"
            summary = f"{len(states) - len(bad)} ready" + (f"; not ready: {bad}" if bad else "")
            checks.append((verdict, "models", summary))
        except (OSError, ValueError) as exc:
            checks.append(("warn", "models", f"repository index unavailable: {exc}"))
    else:
        checks.append(
            ("warn", "Triton", f"{settings.triton.triton_url or 'unset'}: gRPC only, readiness via /readyz")
        )
    for warning in unknown_variables():
        checks.append(("warn", "settings", warning))
    for problem in preflight(settings, serving=False):
        checks.append(("FAIL", "settings", problem))
    if settings.auth.auth == "off":
        checks.append(("warn", "auth", "TGW_AUTH=off: anyone who reaches the gateway may use every model"))
    return checks


def run(load_settings: Callable[[], Settings]) -> int:
    settings = load_settings()
    state = StackState.read(settings.embedded.state_dir)
    stores = ("TGW_REDIS_URL", "TGW_CACHE_REDIS_URL", "TGW_JOBS_REDIS_URL")
    if state is not None and not any(os.environ.get(v) for v in stores):
        os.environ.update(
            {k: v for k, v in state.env.items() if k.startswith("TGW_") and k not in os.environ}
        )
        settings = load_settings()
    checks = diagnose(settings, state)
    width = max(len(what) for _, what, _ in checks)
    for verdict, what, detail in checks:
        sys.stdout.write(f"{verdict:<4}  {what:<{width}}  {detail}\n")
    return 1 if any(verdict == "FAIL" for verdict, _, _ in checks) else 0
