"""What the ``tgw`` commands share (``app.cli``, ``tgw keys`` in ``app.auth.cli``, ``tgw doctor`` in
``app.doctor``): settings from the environment with a bad value named (``load_settings``), the stores of a
running stack (``stack_settings``), unknown ``TGW_*`` variables and the checks before a start
(``preflight``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.launcher import StackState
from app.settings import Settings, env_names, env_of, redact_url

SECRET_WORDS = ("secret", "password", "token", "pepper")


def shown_value(name: str, value: Any) -> str:
    if any(word in name for word in SECRET_WORDS):
        return "<redacted>"
    if isinstance(value, str) and "://" in value:
        value = redact_url(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_settings() -> Settings:
    """Settings from the environment; on a bad value, say which variable, its value and why, exit 2."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            var = env_of(err["loc"])
            if var:
                shown = shown_value(var.lower(), err.get("input"))
                lines.append(f"  {var}={shown}: {err['msg']}")
            else:
                lines.append(f"  {err['msg']}")
        header = "invalid settings (fix these environment variables):\n"
        sys.stderr.write(header + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


# Where a command that talks to the stack finds its stores: these variables, else a running `tgw up`'s.
_STACK_ADDRESSES = ("TGW_REDIS_URL", "TGW_CACHE_REDIS_URL", "TGW_JOBS_REDIS_URL", "TGW_AUTH_REDIS_URL",
                    "TGW_REDIS_CLUSTER")  # fmt: skip


def stack_settings(command: str) -> Settings:
    """Settings for a command that talks to a running stack (``tgw keys``): the environment's, and where it
    names no Redis, the addresses of the ``tgw up`` running on this state dir (its ``stack.json``). With
    neither, exit 2 with a message naming the address it would have used: a key written to the wrong Redis
    is refused by the gateway as unknown, which is the worst way to find out."""
    settings = load_settings()
    if any(os.environ.get(name) for name in _STACK_ADDRESSES):
        return settings
    state = StackState.read(settings.embedded.state_dir)
    if state is None:
        state_file = settings.embedded.state_dir / "stack.json"
        would_use = redact_url(settings.auth_redis_address)
        sys.stderr.write(
            f"{command}: no Redis given and no running `tgw up` found ({state_file}).\n"
            "  Start the stack (`make run`) first, or set TGW_AUTH_REDIS_URL (or TGW_JOBS_REDIS_URL) to the"
            f" Redis that holds keys and jobs; without either it would use {would_use} (the cache).\n"
        )
        raise SystemExit(2)
    os.environ.update({k: v for k, v in state.env.items() if k in _STACK_ADDRESSES})  # this command only
    return load_settings()


# Variables the test and chaos harnesses read (not settings): not reported as unknown.
_HARNESS_VARIABLES = frozenset({"TGW_CHAOS_SCALE", "TGW_CHAOS_LOG_LEVEL", "TGW_CHAOS_REDIS_KILL_AT_S",
                                "TGW_FUZZ_SECONDS", "TGW_FUZZ_EXAMPLES", "TGW_TEST_WS_WINDOW_S",
                                "TGW_PERF_ANALYZER"})  # fmt: skip


def dotenv_values() -> dict[str, str]:
    """The TGW_* entries of the `.env` file Settings reads (none when there is no such file)."""
    from dotenv import dotenv_values as read

    path = Path(".env")
    if not path.is_file():
        return {}
    return {k: v for k, v in read(path).items() if k.startswith("TGW_") and v is not None}


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """A warning per ``TGW_*`` variable no setting reads (a misspelling is otherwise silently ignored),
    with the closest real name."""
    import difflib

    known = env_names()
    warnings = []
    names = environ if environ is not None else {**dotenv_values(), **os.environ}
    for name in sorted(names):
        if name.startswith("TGW_") and name not in known and name not in _HARNESS_VARIABLES:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"unknown variable {name}: no setting reads it{hint}")
    return warnings


def _port_taken(host: str, port: int) -> bool:
    """Whether another socket listens on (host, port). Bound without SO_REUSEPORT, so a listener that has it
    (a gRPC front door: its own workers share the port) is found too; SO_REUSEADDR ignores TIME_WAIT."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def preflight(settings: Settings, serving: bool = True) -> list[str]:
    """Problems that would stop the stack later, found before any child starts: one line each, naming the
    variable to set."""
    import importlib.util

    problems = []
    if serving and settings.auth.auth == "required" and not settings.auth.key_pepper:
        problems.append(
            "TGW_KEY_PEPPER is required with TGW_AUTH=required: a server secret of 32+ characters, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` (or TGW_AUTH=off on loopback)"
        )
    if settings.observability.otel_endpoint and importlib.util.find_spec("opentelemetry.sdk") is None:
        problems.append(
            f"TGW_OTEL_ENDPOINT={settings.observability.otel_endpoint}: tracing needs the `otel` extra "
            "(opentelemetry-sdk and its OTLP exporter), which is not installed; install it or unset it"
        )
    if serving:
        ports = [("TGW_PORT", settings.server.port)]
        if settings.server.grpc_enabled and settings.server.grpc_port:
            ports.append(("TGW_GRPC_PORT", settings.server.grpc_port))
        for var, port in ports:
            if _port_taken(settings.server.host, port):
                problems.append(
                    f"{var}={port}: the port is already in use on {settings.server.host} (another gateway or"
                    f" `make run` stack?); stop it or set {var} to a free port"
                )
    return problems
