"""Pure logic of app.auth: tokens, the HMAC, routes' classes, credentials from headers, the local
limiter (GCRA) and the failed-auth limiter, the RateLimit headers, tiers and the settings' refusals, the
priority check, the cache scope. (The Redis parts are tested against the real server in
tests/integration/test_auth.py.)"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from pydantic import ValidationError

from app.auth.admin import NewKey
from app.auth.keys import KeyRecord, digest, key_id_of, new_token
from app.auth.limiter import ADMITTED, QUOTA, RATE, Decision, LocalLimiter, policy_header, state_header
from app.auth.principal import ANONYMOUS, Limits, Principal, TooManyRequests, cache_scope, parse_tiers
from app.auth.runtime import check_priorities
from app.auth.stage import AuthStage, FailedAuthLimiter, credential_from_headers, path_class
from app.settings import Settings


def test_tokens_are_high_entropy_with_a_public_id() -> None:
    key_id, token = new_token()
    assert token.startswith(f"tgw_{key_id}_") and len(token) >= 4 + 12 + 1 + 43
    assert key_id_of(token) == key_id
    assert len({new_token()[1] for _ in range(100)}) == 100
    for bad in ("", "tgw_", "Bearer x", "tgw_zzzzzzzzzzzz_" + "a" * 43, "tgw_0123456789ab_short",
                "xyz_0123456789ab_" + "a" * 43, "tgw_0123456789ab_" + "a" * 200):  # fmt: skip
        assert key_id_of(bad) is None, bad


def test_digest_is_hmac_sha256_with_the_pepper() -> None:
    token = new_token()[1]
    expected = hmac.new(b"p" * 32, token.encode(), hashlib.sha256).hexdigest()
    assert digest("p" * 32, token) == expected != digest("q" * 32, token)
    rec = KeyRecord("0123456789ab", "n", "t", "standard", 1.0, 2, 3, 4, 0.0, expected)
    assert KeyRecord.loads(rec.dumps()) == rec and "digest" not in rec.public()


@pytest.mark.parametrize(("path", "kind"), [
    ("/healthz", "open"), ("/readyz", "open"), ("/v2/health/ready", "open"), ("/openapi.json", "open"),
    ("/metrics", "admin"), ("/v1/admin/keys", "admin"), ("/v2/repository/index", "admin"),
    ("/v1/jobs/stats", "admin"), ("/v1/models/m/infer", "key"), ("/v1/jobs/abc", "key"), ("/v1/ws", "key"),
    ("/healthz/", "key"), ("/metricsx", "key"),
])  # fmt: skip
def test_path_classes(path: str, kind: str) -> None:
    assert path_class(path) == kind


def test_credential_from_headers() -> None:
    assert credential_from_headers({"authorization": "Bearer abc"}) == "abc"
    assert credential_from_headers({"authorization": "bearer  abc "}) == "abc"
    assert credential_from_headers({"x-api-key": "k"}) == "k"
    assert credential_from_headers({"authorization": "Basic xyz", "x-api-key": "k"}) == "k"
    assert credential_from_headers({"authorization": "Bearer "}) is None
    assert credential_from_headers({}) is None


def test_local_gcra_admits_burst_then_rate() -> None:
    lim = LocalLimiter()
    limits = Limits(rps=1.0, burst=3, concurrency=2, daily_quota=0)
    outcomes = [lim.admit("k", limits, take_slot=False).outcome for _ in range(4)]
    assert outcomes == [ADMITTED, ADMITTED, ADMITTED, RATE]
    denied = lim.admit("k", limits, take_slot=False)
    assert 0.9 < denied.retry_after_s <= 1.0
    assert lim.admit("other", limits, take_slot=False).admitted  # keys are independent


def test_local_inflight_bound_and_release() -> None:
    lim = LocalLimiter()
    limits = Limits(rps=1000.0, burst=1000, concurrency=2, daily_quota=0)
    assert lim.admit("k", limits, take_slot=True).admitted and lim.admit("k", limits, take_slot=True).admitted
    assert lim.admit("k", limits, take_slot=True).reason == "concurrency"
    lim.release("k")
    assert lim.admit("k", limits, take_slot=True).admitted


def test_failed_auth_limiter_blocks_an_address() -> None:
    f = FailedAuthLimiter(per_minute=3)
    for _ in range(3):
        assert f.blocked_for("1.2.3.4") == 0
        f.failed("1.2.3.4")
    assert 59 < f.blocked_for("1.2.3.4") <= 60 and f.blocked_for("5.6.7.8") == 0


def test_ratelimit_headers() -> None:
    limits = Limits(rps=2.0, burst=10, concurrency=0, daily_quota=500)
    assert policy_header(limits) == '"burst";q=10;w=5, "daily";q=500;w=86400'
    assert state_header(Decision(RATE, retry_after_s=1.2)) == '"burst";r=0;t=2'
    assert state_header(Decision(QUOTA, retry_after_s=3600)) == '"daily";r=0;t=3600'
    exc = TooManyRequests("over", 0.2, "p", "s")
    assert exc.status_code == 429 and exc.headers == {"Retry-After": "1", "RateLimit-Policy": "p",
                                                      "RateLimit": "s"}  # fmt: skip


def stage_of(settings: Settings, redis: object = None) -> AuthStage:
    """The auth stage of ``settings`` as ``build_auth`` makes it (its group and the two values it takes)."""
    return AuthStage(settings.auth, redis, retry_after_s=settings.server.retry_after_s, slot_ttl_s=90.0)


def test_tiers_and_settings_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    tiers = parse_tiers(["high:1:60:3600", "standard:2:30"])
    assert tiers["high"].priority == 1 and tiers["standard"].max_timeout_s == 30.0
    assert tiers["high"].max_stream_s == 3600.0 and tiers["standard"].max_stream_s is None  # the default
    with pytest.raises(ValidationError, match="tier:priority:max_timeout_s"):
        Settings(auth_tiers="gold:0:10")
    for bad in ("gold:1:10:0", "gold:1:10:x", "gold:1:10:5:5"):
        with pytest.raises(ValidationError, match=r"\[:max_stream_s\]"):
            Settings(auth_tiers=bad, auth_default_tier="gold")
    with pytest.raises(ValidationError, match="not in TGW_AUTH_TIERS"):
        Settings(auth_default_tier="gold")
    with pytest.raises(ValidationError, match="TGW_AUTH=off on the non-loopback"):
        Settings(host="0.0.0.0", auth="off")
    assert Settings(host="0.0.0.0", auth="off", auth_off_allow_public=True).auth.auth == "off"
    assert Settings(host="::1").auth.auth == "off"
    assert Settings(host="0.0.0.0", auth="required").auth.auth == "required"
    with pytest.raises(ValueError, match="TGW_KEY_PEPPER"):
        stage_of(Settings(auth="required"), redis=object())


async def test_auth_off_admits_everyone_as_anonymous() -> None:
    stage = stage_of(Settings())
    scope = {"type": "http", "path": "/metrics", "headers": []}
    assert await stage.admit(scope) is ANONYMOUS and scope["state"]["principal"] is ANONYMOUS


def test_priority_check_flags_models() -> None:
    stage = stage_of(Settings())
    configs = {
        "ok": {"dynamic_batching": {"priority_levels": "2"}},
        "none": {"dynamic_batching": {}},
        "few": {"dynamic_batching": {"priority_levels": "1"}},
        "ens": {"platform": "ensemble"},
    }
    problems = check_priorities(stage, configs)
    assert len(problems) == 3
    assert any("ens is an ensemble" in p for p in problems) and any("few has priority_levels 1" in p
                                                                   for p in problems)  # fmt: skip
    assert not any("model ok " in p for p in problems)


def test_cache_scope() -> None:
    p = Principal(key_id="k", tenant="acme", tier="standard")
    assert cache_scope(p, "shared") == "" and cache_scope(p, "tenant") == "acme"
    assert cache_scope(None, "tenant") == ""


async def test_admit_puts_principal_and_tenant_in_scope_state() -> None:
    from app.auth.principal import current_principal

    stage = stage_of(
        Settings(auth="required", key_pepper="9f1c4e7a2b8d5036e1f4a7c2d9b05e38" + "a1"), redis=object()
    )
    scope = {"type": "http", "path": "/healthz", "headers": []}
    principal = await stage.admit(scope)
    assert scope["state"] == {"principal": principal, "tenant": ""} and current_principal() is principal
    assert not principal.admin and principal.limits is None


def test_images_compose_and_k8s_require_keys() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    assert "TGW_AUTH=required" in (root / "Dockerfile.gateway").read_text()
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    for name in ("gateway", "worker"):
        assert compose["services"][name]["environment"]["TGW_AUTH"] == "required"
    triton_ports = compose["services"]["triton"]["ports"]
    assert triton_ports and all(p.startswith("127.0.0.1:") for p in triton_ports)  # the gateway is the way in
    configmap = yaml.safe_load((root / "k8s/base/configmap.yaml").read_text())
    assert configmap["data"]["TGW_AUTH"] == "required"
    secret = yaml.safe_load((root / "k8s/base/secret.yaml").read_text())["stringData"]
    assert len(secret["TGW_KEY_PEPPER"]) >= 32 and len(secret["TGW_ADMIN_TOKEN"]) >= 32
    monitors = list(yaml.safe_load_all((root / "k8s/base/servicemonitors.yaml").read_text()))
    gateway = next(m for m in monitors if m["metadata"]["name"] == "gateway")
    auth = gateway["spec"]["endpoints"][0]["authorization"]
    assert auth["credentials"] == {"name": "tgw-secrets", "key": "TGW_ADMIN_TOKEN"}


def test_bench_key_targets_send_the_key() -> None:
    from app.bench.payloads import TINY, http_request_factory, key_targets

    miss, hit = key_targets(TINY, ("127.0.0.1", 8080), salt=7, api_key="tgw_0123456789ab_" + "k" * 43)
    assert (miss.name, miss.unique, hit.name, hit.unique) == (
        "gateway-miss-key",
        True,
        "gateway-hit-key",
        False,
    )
    request = http_request_factory(miss, 0)(1)
    head, _, body = request.partition(b"\r\n\r\n")
    assert b"\r\nAuthorization: Bearer tgw_0123456789ab_" in head
    assert int(head.split(b"Content-Length: ")[1]) == len(body)


def test_new_key_limits_are_bounded() -> None:
    """Found by the schema fuzz (make fuzz): a daily_quota beyond 64 bits was accepted, then failed to
    serialize into the key record (a 500 from POST /v1/admin/keys)."""
    assert NewKey(name="k", daily_quota=10**12).daily_quota == 10**12
    with pytest.raises(ValidationError, match="daily_quota"):
        NewKey(name="k", daily_quota=2**64)


def test_placeholder_and_guessable_secrets_are_refused_at_start_up() -> None:
    """k8s/base/secret.yaml's placeholders are 40+ characters: length alone let them through."""
    import secrets as random_secrets
    from pathlib import Path

    import yaml

    from app.settings import secret_problem

    root = Path(__file__).resolve().parents[2]
    shipped = yaml.safe_load((root / "k8s/base/secret.yaml").read_text())["stringData"]
    for name in ("TGW_KEY_PEPPER", "TGW_ADMIN_TOKEN"):
        field = name.removeprefix("TGW_").lower()
        with pytest.raises(ValidationError, match="placeholder"):
            Settings(**{field: shipped[name]})
        with pytest.raises(ValidationError, match="too guessable"):
            Settings(**{field: "p" * 40})
        with pytest.raises(ValidationError, match="too guessable"):
            Settings(**{field: "test-pepper-" + "x" * 40})
        assert getattr(Settings(**{field: random_secrets.token_hex(32)}).auth, field)
        assert getattr(Settings(**{field: random_secrets.token_urlsafe(32)}).auth, field)
    assert secret_problem(random_secrets.token_hex(16)) is None  # 32 hex characters, 128 random bits


def test_compose_keeps_its_consoles_on_loopback_with_real_passwords() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert all(str(p).startswith("127.0.0.1:") for p in services["prometheus"]["ports"])
    assert all(str(p).startswith("127.0.0.1:") for p in services["grafana"]["ports"])
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), "no default password"
    for name in ("gateway", "worker"):
        assert services[name]["env_file"] == [{"path": "deploy/gateway.env", "required": True}]


async def test_a_streams_slot_outlives_the_longest_stream() -> None:
    """A route of class "stream" (SSE) takes its in-flight slot with a Redis TTL past the longest stream a
    tier allows (TGW_AUTH_TIERS' fourth field, else TGW_STREAM_MAX_DURATION_S), a unary route with the
    unary one: a stream is never left uncounted while it runs, a dead process's unary slot still frees
    itself soon."""
    from app.auth.principal import Limits
    from app.auth.runtime import build_auth

    settings = Settings(auth_tiers="high:1:60:3600,standard:2:30", stream_max_duration_s=900)
    stage = build_auth(settings, classify=lambda p: "stream" if p.endswith("/stream") else "key")
    drain = settings.server.drain_s
    assert stage.stream_slot_ttl_s == 3600 + drain + 60  # the longest tier's
    taken: list[float | None] = []

    class Limiter:
        async def admit(self, *args: object, slot_ttl_s: float | None = None, **kwargs: object) -> Decision:
            taken.append(slot_ttl_s)
            return Decision(ADMITTED, remaining=1, reset_s=1.0)

    stage.limiter = Limiter()  # type: ignore[assignment]
    principal = Principal(key_id="k", tenant="t", tier="standard", limits=Limits(10, 10, 1, 0))
    await stage.limit(principal, stream=True)
    await stage.limit(principal)
    assert taken == [3600 + drain + 60, None]  # None: the stage's unary TTL
