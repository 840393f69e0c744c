"""Settings come in groups, one per component that reads them; every TGW_ name keeps working (the old
name of a renamed field too), flat keywords still build Settings, and a bad value names its variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import (
    GROUPS,
    RENAMED,
    AuthSettings,
    CacheSettings,
    Settings,
    env_names,
    env_of,
    setting_fields,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("TGW_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout


# One field of each group from its variable (a value other than the default), read at settings.<group>.<field>.
FROM_ENV = {
    "server": ("TGW_BODY_TIMEOUT_S", "12.5", "body_timeout_s", 12.5),
    "triton": ("TGW_TRITON_EJECT_AFTER", "7", "triton_eject_after", 7),
    "cache": ("TGW_CACHE_TTL_S", "60", "cache_ttl_s", 60),
    "jobs": ("TGW_WEBHOOK_SCHEDULE_S", "1, 2", "webhook_schedule_s", [1.0, 2.0]),
    "auth": ("TGW_AUTH_WS_PER_KEY", "3", "auth_ws_per_key", 3),
    "embedded": ("TGW_EMBEDDED_TRITONS", "2", "embedded_tritons", 2),
    "observability": ("TGW_LOG_FORMAT", "text", "log_format", "text"),
    "streams": ("TGW_STREAM_BUFFER_RESPONSES", "32", "stream_buffer_responses", 32),
    "traffic": ("TGW_TRAFFIC_SHADOW_MAX_IN_FLIGHT", "3", "traffic_shadow_max_in_flight", 3),
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_reads_its_fields_from_the_environment(
    group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    var, raw, field, value = FROM_ENV[group]
    monkeypatch.setenv(var, raw)
    assert getattr(getattr(Settings(), group), field) == value
    assert getattr(GROUPS[group](), field) == value  # a group alone reads the environment as well


def test_every_field_is_in_one_group_and_names_are_unique() -> None:
    fields = list(setting_fields())
    assert len(fields) == len({f.env for f in fields}) == sum(len(m.model_fields) for m in GROUPS.values())
    assert len(fields) > 100
    old = {f.old_env for f in fields if f.old_env}
    assert old.isdisjoint({f.env for f in fields}) and env_names() == {f.env for f in fields} | old


RENAMES = [(f"TGW_{new.upper()}", f"TGW_{old.upper()}", new) for new, old in sorted(RENAMED.items())]


@pytest.mark.parametrize(("new", "old", "field"), RENAMES, ids=[r[2] for r in RENAMES])
def test_a_renamed_setting_reads_its_new_and_its_old_name(
    new: str, old: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (group,) = [f.group for f in setting_fields() if f.name == field]
    values = {"cache_redis_url": ("redis://old:1/0", "redis://new:1/0"), "cache_redis_maxmemory": ("1gb", "2gb"),
              "job_worker_in_process": ("true", "false"), "job_worker_metrics_port": ("9101", "9102"),
              "cache_redis_port": ("7001", "7002")}  # fmt: skip
    a, b = values.get(field, ("3", "4"))

    def read() -> object:
        return getattr(getattr(Settings(), group), field)

    default = read()
    monkeypatch.setenv(old, a)
    from_old = read()
    assert from_old != default and str(from_old).lower().startswith(a.removesuffix("/0").split(":")[0])
    monkeypatch.setenv(new, b)
    from_new = read()  # both set: the new name wins
    assert from_new != from_old
    monkeypatch.delenv(old)
    assert read() == from_new
    # Flat keywords: the new field name and the old one.
    assert getattr(getattr(Settings(**{field: from_old}), group), field) == from_old
    old_kw = old.removeprefix("TGW_").lower()
    assert getattr(getattr(Settings(**{old_kw: from_old}), group), field) == from_old  # over the environment


def test_the_renames() -> None:
    assert RENAMED == {
        "cache_redis_url": "redis_url",
        "cache_redis_timeout_s": "redis_timeout_s",
        "cache_redis_port": "redis_port",
        "cache_redis_maxmemory": "redis_maxmemory",
        "jobs_redis_timeout_s": "job_redis_timeout_s",
        "job_worker_concurrency": "worker_concurrency",
        "job_worker_in_process": "worker_in_process",
        "job_worker_metrics_port": "worker_metrics_port",
        "batch_max_in_flight": "batch_max_inflight",
    }


def test_flat_keywords_groups_and_updated() -> None:
    s = Settings(
        port=9000, auth="required", key_pepper="9f1c4e7a2b8d5036e1f4a7c2d9b05e38a1", redis_url="redis://r:1/0"
    )
    assert s.server.port == 9000 and s.auth.auth == "required" and s.cache.cache_redis_url == "redis://r:1/0"
    assert s.server.model_fields_set == {"port"}  # TGW_WORKERS "set or not" still tells
    given = Settings(cache=CacheSettings(cache_ttl_s=5), auth={"auth_ws_per_key": 2})
    assert given.cache.cache_ttl_s == 5 and given.auth.auth_ws_per_key == 2
    copy = s.updated(shutdown_delay_s=0.0, worker_in_process=True)
    assert (
        copy.server.shutdown_delay_s == 0.0 and copy.jobs.job_worker_in_process and copy.server.port == 9000
    )
    assert s.server.shutdown_delay_s == 5.0 and not s.jobs.job_worker_in_process
    assert isinstance(s.auth, AuthSettings)


def test_addresses_across_groups() -> None:
    s = Settings(redis_port=7000, triton_grpc_port=9001)
    assert s.cache_redis_address == "redis://127.0.0.1:7000/0" == s.jobs_redis_address == s.auth_redis_address
    assert s.triton_grpc_address == "127.0.0.1:9001"
    s = Settings(jobs_redis_url="redis://jobs:1/0", triton_url="t:1")
    assert s.auth_redis_address == "redis://jobs:1/0" and s.triton_grpc_address == "t:1"


def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGW_PORT", "x")
    monkeypatch.setenv("TGW_REDIS_URL", "http://nope")  # the old name of TGW_CACHE_REDIS_URL
    monkeypatch.setenv("TGW_AUTH_TIERS", "gold:0:1")
    with pytest.raises(ValidationError) as caught:
        Settings()
    named = {env_of(e["loc"]) for e in caught.value.errors()}
    assert named == {"TGW_PORT", "TGW_REDIS_URL", "TGW_AUTH_TIERS"}  # every group's errors at once
    monkeypatch.setenv("TGW_CACHE_REDIS_URL", "http://nope")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "TGW_CACHE_REDIS_URL" in {env_of(e["loc"]) for e in caught.value.errors()}  # the one set now


def test_tgw_names_the_bad_variables_and_exits_2(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    env.update(TGW_WORKER_CONCURRENCY="0", TGW_LOG_LEVEL="LOUD", TGW_STATE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "app.cli", "config", "show"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "TGW_WORKER_CONCURRENCY='0': Input should be greater than or equal to 1" in out.stderr
    assert "TGW_LOG_LEVEL='LOUD'" in out.stderr and "Traceback" not in out.stderr
