"""The stack under test: embedded Triton (``model_repository`` + ``tests/models``) and Redis on free ports,
and the gateway as ``tgw serve`` subprocess(es) pointed at them — the same launcher code as ``tgw up``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from app.launcher import EmbeddedRedis, EmbeddedTriton, LaunchError, ManagedProcess, free_port
from app.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

REPOSITORIES = [PROJECT_ROOT / "model_repository", PROJECT_ROOT / "tests" / "models"]


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class Stack:
    state_dir: Path
    workers: int = 1
    gateway_env: dict[str, str] = field(default_factory=dict)
    model_config_name: str | None = "auto"
    load_models: list[str] = field(default_factory=list)  # empty: every model in the repositories
    triton: EmbeddedTriton | None = None
    redis: EmbeddedRedis | None = None
    gateway: ManagedProcess | None = None
    gateway_port: int = 0
    gateway_grpc_port: int = 0

    def start(self) -> None:
        repos = [r for r in REPOSITORIES if r.is_dir()]
        if self.load_models:
            repos = [self._subset(repos)]
        self.redis = EmbeddedRedis(free_port(), self.state_dir / "redis", appendonly=False)
        self.redis.start()
        self.triton = EmbeddedTriton(
            repos, free_port(), free_port(), free_port(), self.state_dir / "triton",
            model_config_name=self.model_config_name,
        )  # fmt: skip
        self.triton.start(timeout=180)
        self.start_gateway()

    def _subset(self, repos: list[Path]) -> Path:
        """A repository holding copies of only ``load_models`` (the gateway's /readyz wants every model in
        the index ready, so a subset is a repository of its own rather than explicit model control)."""
        target = self.state_dir / "repository"
        target.mkdir(parents=True, exist_ok=True)
        for name in self.load_models:
            src = next((r / name for r in repos if (r / name).is_dir()), None)
            if src is None:
                raise LaunchError(f"model {name!r} is in none of {[str(r) for r in repos]}")
            shutil.copytree(
                src, target / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        return target

    def start_gateway(self) -> None:
        assert self.triton is not None and self.redis is not None
        self.gateway_port = free_port()
        self.gateway_grpc_port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "TGW_TRITON_URL": self.triton.grpc_url,
                "TGW_TRITON_HTTP_URL": self.triton.http_url,  # as `tgw up`; blank it for gRPC
                "TGW_REDIS_URL": self.redis.url,
                "TGW_PORT": str(self.gateway_port),
                "TGW_GRPC_PORT": str(self.gateway_grpc_port),
                "TGW_HOST": "127.0.0.1",
                "TGW_WORKERS": str(self.workers),
                "TGW_LOG_LEVEL": "WARNING",
                "TGW_DRAIN_S": "1",
            }
        )
        env.update(self.gateway_env)
        argv = [sys.executable, "-m", "app.cli", "serve"]
        self.gateway = ManagedProcess(
            "gateway", argv, self.state_dir / "gateway.log", env=env, cwd=PROJECT_ROOT
        )
        self.gateway.start()
        url = f"{self.gateway_url}/readyz"
        self.gateway.wait_until(lambda: _get(url) == 200, 60, "ready (/readyz)")

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop(timeout=10)
            self.gateway = None

    def restart_gateway(self, workers: int | None = None, env: dict[str, str] | None = None) -> None:
        self.stop_gateway()
        if workers is not None:
            self.workers = workers
        if env is not None:
            self.gateway_env = env
        self.start_gateway()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def model_ready(self, model: str) -> bool:
        assert self.triton is not None
        return _get(f"{self.triton.http_url}/v2/models/{model}/ready") == 200

    def model_stats(self, model: str) -> dict[str, object]:
        """Triton's ``/v2/models/{model}/stats`` (every version); empty when it does not answer."""
        assert self.triton is not None
        try:
            with urllib.request.urlopen(f"{self.triton.http_url}/v2/models/{model}/stats", timeout=5) as resp:
                doc = json.loads(resp.read())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def gateway_pids(self) -> list[int]:
        """The gateway process and its uvicorn workers."""
        if self.gateway is None or self.gateway.pid is None:
            return []
        import psutil

        try:
            root = psutil.Process(self.gateway.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def server_pids(self) -> dict[str, list[int]]:
        import psutil

        out: dict[str, list[int]] = {"gateway": self.gateway_pids()}
        if self.triton is not None and self.triton.process.pid:
            try:
                root = psutil.Process(self.triton.process.pid)
                out["triton"] = [root.pid, *(c.pid for c in root.children(recursive=True))]
            except psutil.Error:
                out["triton"] = []
        if self.redis is not None and self.redis.process.pid:
            out["redis"] = [self.redis.process.pid]
        return out

    def stop(self) -> None:
        self.stop_gateway()
        for server in (self.triton, self.redis):
            if server is not None:
                try:
                    server.stop()
                except Exception as exc:  # keep stopping the others
                    logger.warning("stopping %s failed: %s", server, exc)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (0 for ones that are gone)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_bytes(pids: list[int]) -> dict[int, int]:
    import psutil

    out: dict[int, int] = {}
    for pid in pids:
        try:
            out[pid] = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            pass
    return out


def machine_info() -> dict[str, object]:
    import platform

    import psutil

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def triton_version(stack: Stack) -> str:
    assert stack.triton is not None
    try:
        with urllib.request.urlopen(f"{stack.triton.http_url}/v2", timeout=2) as resp:
            return str(json.loads(resp.read()).get("version", ""))
    except (OSError, ValueError):
        return ""


__all__ = ["LaunchError", "Stack", "cpu_seconds", "machine_info", "rss_bytes"]
