"""A bounded property-based run of the gateway's OpenAPI schema against the real stack (schemathesis +
hypothesis), in two modes: authentication off, and authentication required (``TGW_AUTH=required``, every
request with a tenant API key, the admin routes with the admin credential). Each operation gets
``TGW_FUZZ_EXAMPLES`` generated requests per round (valid and invalid), sent to the real Triton and Redis.

* Zero 5xx, anywhere: a hard failure, listing every operation and request that produced one.
* Zero contract failures (status codes, content types, response schemas against the published
  document): a hard failure, listing each operation with its first finding.

In ``make test`` one round runs per mode (15 examples per operation, seeded: reproducible; ~15 s a mode).
``make fuzz`` (``TGW_FUZZ_SECONDS=300``) runs rounds with new seeds until each mode has fuzzed that long
and writes the figures to ``fuzz-results/schema-fuzz.json``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings

from app.auth.stage import path_class
from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.gateway_server import running_gateway
from tests.integration.test_auth import ADMIN, auth_settings, make_key

FUZZ_SECONDS = float(os.environ.get("TGW_FUZZ_SECONDS", "0"))  # 0: one round (the suite)
MAX_EXAMPLES = int(os.environ.get("TGW_FUZZ_EXAMPLES", "15"))  # per operation and round
REPORT = Path(__file__).resolve().parents[2] / "fuzz-results" / "schema-fuzz.json"
MODES = ("auth-off", "auth-keys")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300 + 3 * FUZZ_SECONDS)]

SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                    database=None, phases=[Phase.explicit, Phase.generate])  # fmt: skip


def _gateway_settings(mode: str, triton: EmbeddedTriton, redis_url: str) -> dict[str, object]:
    if mode == "auth-keys":
        return auth_settings(triton, redis_url)
    return {"triton_url": triton.grpc_url, "triton_http_url": triton.http_url, "redis_url": redis_url,
            "auth": "off"}  # fmt: skip


@functools.cache
def fuzz(mode: str, triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> dict[str, Any]:
    """Runs one mode's fuzz once per session; returns its findings (both tests below read them)."""
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    server_errors: list[str] = []
    contract: dict[str, list[str]] = {}
    sent = rounds = 0
    started = time.monotonic()
    with running_gateway(**_gateway_settings(mode, triton, redis_server.url)) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        if mode == "auth-keys":  # limits high enough that requests reach the routes (429 is documented)
            key = make_key(url, name="fuzz", rps=1_000_000, burst=1_000_000, concurrency=0, daily_quota=0)
            tenant = {"Authorization": f"Bearer {key['key']}"}
        else:
            admin = tenant = {}
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=admin)
        operations = [result.ok() for result in schema.get_all_operations()]

        def fuzz_operation(op: Any, round_seed: int) -> None:
            headers = admin if path_class(op.path) == "admin" else tenant

            @seed(round_seed)
            @given(case=op.as_strategy())
            @SETTINGS
            def run(case: Any) -> None:
                nonlocal sent
                sent += 1
                label = case.operation.label
                response = case.call(base_url=url, headers=headers, timeout=30)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis FailureGroup: collected
                    server_errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
                    return
                try:
                    case.validate_response(response, checks=[
                        status_code_conformance, content_type_conformance, response_schema_conformance,
                    ])  # fmt: skip
                except (Exception, BaseExceptionGroup) as exc:
                    contract.setdefault(label, []).append(str(exc)[:300])

            run()

        out_of_time = False
        while not out_of_time:
            for op in operations:
                fuzz_operation(op, rounds)
                out_of_time = time.monotonic() - started >= FUZZ_SECONDS
                if out_of_time and FUZZ_SECONDS > 0:
                    break
            rounds += 1
    found = {
        "mode": mode, "seconds": round(time.monotonic() - started, 1), "rounds": rounds,
        "operations": len(operations), "requests": sent, "server_errors": server_errors,
        "contract_failures": sum(len(v) for v in contract.values()), "contract": contract,
    }  # fmt: skip
    print(f"\nschema fuzz [{mode}]: {sent} requests in {found['seconds']} s ({rounds} rounds); "
          f"{len(server_errors)} server errors; {found['contract_failures']} contract failures")  # fmt: skip
    if FUZZ_SECONDS > 0:
        REPORT.parent.mkdir(exist_ok=True)
        previous = json.loads(REPORT.read_text()) if REPORT.exists() else {}
        REPORT.write_text(json.dumps({**previous, mode: found}, indent=1))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_schema_fuzz_finds_no_server_errors(
    mode: str, triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    found = fuzz(mode, triton, redis_server)
    assert found["requests"] >= 250, found["requests"]
    assert not found["server_errors"], "\n".join(found["server_errors"])


@pytest.mark.parametrize("mode", MODES)
def test_schema_contract(mode: str, triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> None:
    """Every status, content type and body conforms to the published document (issue 15), the auth
    stage's 401/403/429/503 included."""
    contract = fuzz(mode, triton, redis_server)["contract"]
    assert not contract, "\n".join(f"{label} ({len(p)}x): {p[0]}" for label, p in sorted(contract.items()))
