"""What `tgw up|serve|worker` check before starting anything: one line per problem naming the variable, a
port another process listens on (also one shared with SO_REUSEPORT, as a gRPC front door does), and
unknown TGW_* variables with the closest real name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli_common import preflight, unknown_variables
from app.launcher import free_port
from app.settings import Settings, env_names, setting_fields

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def reuseport_listener() -> Iterator[int]:
    """A listener like another stack's gRPC front door (grpc sets SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    env.update(extra)
    return env


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    warnings = unknown_variables({"TGW_AUTHH": "required", "TGW_PORT": "1", "TGW_CHAOS_SCALE": "1", "X": "y"})
    assert warnings == ["unknown variable TGW_AUTHH: no setting reads it (did you mean TGW_AUTH?)"]


def test_preflight_names_each_problem(reuseport_listener: int) -> None:
    settings = Settings(auth="required", grpc_port=reuseport_listener, port=free_port(), host="127.0.0.1")
    problems = preflight(settings)
    assert len(problems) == 2, problems
    assert problems[0].startswith("TGW_KEY_PEPPER is required with TGW_AUTH=required")
    assert problems[1].startswith(f"TGW_GRPC_PORT={reuseport_listener}: the port is already in use")
    assert preflight(Settings(port=free_port(), grpc_port=free_port())) == []


def test_serve_refuses_a_grpc_port_another_stack_shares(reuseport_listener: int, tmp_path: Path) -> None:
    """Without the check a second stack bound :8081 with SO_REUSEPORT too and the kernel split gRPC
    connections between two unrelated stacks."""
    env = clean_env(TGW_PORT=str(free_port()), TGW_GRPC_PORT=str(reuseport_listener),
                    TGW_STATE_DIR=str(tmp_path), TGW_STARTUP_WAIT_S="0")  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"TGW_GRPC_PORT={reuseport_listener}: the port is already in use" in out.stderr


def test_up_without_a_pepper_stops_before_starting_anything(tmp_path: Path) -> None:
    env = clean_env(TGW_AUTH="required", TGW_AUTHH="typo", TGW_STATE_DIR=str(tmp_path / "state"),
                    TGW_PORT=str(free_port()), TGW_GRPC_PORT=str(free_port()))  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "app.cli", "up"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "TGW_KEY_PEPPER is required with TGW_AUTH=required" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 4, out.stderr
    assert "TGW_AUTHH" in out.stderr and "did you mean TGW_AUTH?" in out.stderr
    assert not (tmp_path / "state" / "redis").exists() and not (tmp_path / "state" / "triton").exists()


def test_version_and_help_say_what_starts_where() -> None:
    def tgw(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "app.cli", *args], env=clean_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return out.stdout

    assert tgw("--version").startswith("tgw (triton-gateway) 0.")
    up = tgw("up", "--help")
    for fact in (
        ":6379",
        ":6380",
        ":8000",
        ":8001",
        ":8080",
        ":8081",
        "TGW_STATE_DIR",
        "triton.log",
        "stack.json",
    ):
        assert fact in up, fact
    assert "TGW_TRITON_URL" in tgw("serve", "--help") and "TGW_DRAIN_S" in tgw("worker", "--help")
    for name in (
        "TGW_PORT",
        "TGW_GRPC_PORT",
        "TGW_CACHE_REDIS_PORT",
        "TGW_JOBS_REDIS_PORT",
        "TGW_JOB_WORKER_CONCURRENCY",
    ):
        assert name in env_names() and name in tgw("up", "--help") + tgw("worker", "--help"), name


def test_settings_from_a_dotenv_file_and_config_show_says_where_each_came_from(tmp_path: Path) -> None:
    secret = "s3cret-8c1f5a9e3d7b2046f1e8a4c9d3b70e52"
    (tmp_path / ".env").write_text(f"TGW_PORT=9123\nTGW_KEY_PEPPER={secret}\nTGW_PROT=1\nOTHER=x\n")
    env = clean_env(TGW_LOG_LEVEL="DEBUG", TGW_PORT="9124")  # the environment wins over .env
    out = subprocess.run([sys.executable, "-m", "app.cli", "config", "show"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()}
    assert rows["TGW_PORT"] == "9124  (environment)"
    assert rows["TGW_KEY_PEPPER"] == "<redacted>  (.env)" and secret not in out.stdout
    assert rows["TGW_LOG_LEVEL"] == "DEBUG  (environment)" and rows["TGW_HOST"] == "127.0.0.1  (default)"
    assert len(rows) == len(list(setting_fields()))
    assert "unknown variable TGW_PROT" in out.stderr and "TGW_PORT?" in out.stderr
    assert Settings(_env_file=tmp_path / ".env").server.port == 9123


def test_bench_help_gives_defaults_and_duration() -> None:
    out = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--help"], env=clean_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "about 8 minutes" in out and "(default: bench-results)" in out and "--quick" in out
