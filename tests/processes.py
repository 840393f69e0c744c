"""Real ``tgw`` processes for the tests (``tgw serve``, ``tgw up``: started, awaited until ready, stopped)
and the checks on processes (alive, gone)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.launcher import EmbeddedTriton, free_port
from tests.eventually import eventually

ROOT = Path(__file__).resolve().parents[1]
TEST_MODELS = ROOT / "tests" / "models"


def clean_env() -> dict[str, str]:
    """This process's environment less the gateway's settings (``TGW_*``, ``PROMETHEUS_*``): a fresh shell's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TGW_", "PROMETHEUS_"))}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not reaped yet) is dead for our purpose."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows "(comm)", which may hold spaces


def wait_gone(pids: Iterable[int], timeout: float = 30) -> None:
    """Until none of ``pids`` runs; fails naming those still running."""
    pids = list(pids)
    eventually(lambda: not any(alive(p) for p in pids), timeout, 0.2,
               message=lambda: f"still running: {[p for p in pids if alive(p)]} of {pids}")  # fmt: skip


@dataclass
class TgwProcess:
    """A ``tgw`` command run as ``python -m app.cli`` with exactly ``env``, its output in ``log``."""

    proc: subprocess.Popen[bytes]
    args: list[str]
    env: dict[str, str]
    log: Path
    new_session: bool = False  # its own process group: signals go to the whole group
    graceful_stop: bool = False  # how a ``with`` block ends it: SIGTERM first, or SIGKILL at once

    def __enter__(self) -> TgwProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(graceful=self.graceful_stop)

    @property
    def port(self) -> int:
        return int(self.env["TGW_PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Path:
        """The state dir of a ``tgw up`` (``TGW_STATE_DIR``)."""
        return Path(self.env["TGW_STATE_DIR"])

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def find(self, name: str) -> int | None:
        """pid of a child whose command line contains ``name``."""
        for pid in self.children():
            try:
                if name in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
                    return pid
            except OSError:
                continue
        return None

    def child(self, name: str) -> int:
        pid = self.find(name)
        if pid is None:
            raise AssertionError(f"no child matching {name!r}:\n{self.log_tail(2000)}")
        return pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def signal(self, sig: int) -> None:
        if self.new_session:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait_ready(self, path: str = "/readyz", timeout: float = 120) -> None:
        """Until ``path`` answers 200; at once a failure if the process exits first."""
        command = " ".join(["tgw", *self.args])

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"`{command}` exited {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                )
            return httpx.get(f"{self.url}{path}", timeout=2).status_code == 200

        eventually(ready, timeout, 0.2, ignoring=(httpx.HTTPError,),
                   message=lambda: f"`{command}` did not get ready:\n{self.log_tail()}")  # fmt: skip

    def stop(self, graceful: bool = True, timeout: float = 60) -> None:
        """SIGTERM and ``timeout`` seconds to exit (``graceful``), then SIGKILL."""
        if self.proc.poll() is None:
            if graceful:
                self.signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
                    return
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGKILL)
        self.proc.wait(10)


def start_tgw(
    args: list[str],
    env: Mapping[str, str],
    log: Path,
    *,
    cwd: Path = ROOT,
    ready: str = "/readyz",
    timeout: float = 120,
    new_session: bool = False,
    graceful_stop: bool = False,
) -> TgwProcess:
    """``tgw *args`` with exactly ``env``, awaited until ``ready`` answers 200 on its ``TGW_PORT``; killed if
    it does not get there. As a context manager, stopped when the block ends."""
    env = dict(env)
    if args[:1] == ["serve"]:  # one worker unless the test asks for more (unset: one per core)
        env.setdefault("TGW_WORKERS", "1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, stdout=out, stderr=out,
                                cwd=cwd, start_new_session=new_session)  # fmt: skip
    tgw = TgwProcess(proc, args, dict(env), log, new_session, graceful_stop)
    try:
        tgw.wait_ready(ready, timeout)
    except BaseException:
        tgw.stop(graceful=False)
        raise
    return tgw


def tgw_serve(
    triton: EmbeddedTriton,
    redis_url: str,
    log: Path,
    *,
    base: Mapping[str, str] | None = None,
    ready: str = "/readyz",
    new_session: bool = False,
    graceful_stop: bool = False,
    **env: str,
) -> TgwProcess:
    """A real ``tgw serve`` on free ports in front of ``triton`` (gRPC; add ``TGW_TRITON_HTTP_URL`` for
    inference over HTTP) and ``redis_url``; its environment ``base`` (this process's by default) with
    ``env`` on top."""
    environ = {
        **(os.environ if base is None else base), "TGW_TRITON_URL": triton.grpc_url, "TGW_REDIS_URL": redis_url,
        "TGW_HOST": "127.0.0.1", "TGW_PORT": str(free_port()), "TGW_GRPC_PORT": str(free_port()), **env,
    }  # fmt: skip
    return start_tgw(["serve"], environ, log, ready=ready, timeout=60, new_session=new_session,
                     graceful_stop=graceful_stop)  # fmt: skip


def up_env(state: Path, base: Mapping[str, str] | None = None, **env: str) -> dict[str, str]:
    """The environment of a ``tgw up`` on free ports with a private state dir, serving tests/models: ``base``
    (``clean_env()`` by default) with ``env`` on top."""
    out = dict(clean_env() if base is None else base)
    out.update({
        "TGW_PORT": str(free_port()), "TGW_GRPC_PORT": str(free_port()),
        "TGW_TRITON_HTTP_PORT": str(free_port()), "TGW_TRITON_GRPC_PORT": str(free_port()),
        "TGW_TRITON_METRICS_PORT": str(free_port()), "TGW_REDIS_PORT": str(free_port()),
        "TGW_JOBS_REDIS_PORT": str(free_port()), "TGW_MODEL_REPOSITORY": str(TEST_MODELS),
        "TGW_STATE_DIR": str(state),
    })  # fmt: skip
    out.update(env)
    return out
