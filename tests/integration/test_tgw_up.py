"""``tgw up`` as a real process: serves, stops all three on SIGTERM, goes down whole when a child dies,
and leaves no orphans when it is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.launcher import free_port
from tests.eventually import eventually
from tests.processes import ROOT, TgwProcess, alive, start_tgw, up_env, wait_gone

pytestmark = pytest.mark.integration


def leftovers(state: Path) -> list[str]:
    """Processes still running from a stack's state dir (e.g. Python-backend stubs)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and alive(int(proc.name)):
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(state) in cmd:
                found.append(cmd[:200])
    return found


def wait_no_leftovers(stack: TgwProcess) -> None:
    eventually(lambda: not leftovers(stack.state), 30, 0.3,
               message=lambda: f"left running: {leftovers(stack.state)}")  # fmt: skip


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TgwProcess]:
    env = up_env(
        tmp_path / "state", TGW_SHUTDOWN_DELAY_S="0", TGW_DRAIN_S="5", **getattr(request, "param", {})
    )
    with start_tgw(["up"], env, tmp_path / "tgw-up.log") as stack:
        yield stack


def test_sigterm_stops_all_three(stack: TgwProcess) -> None:
    r = httpx.post(f"{stack.url}/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[1.0, 2.0]]}})
    assert r.status_code == 200
    # tgw up serves the gRPC front door too
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.env['TGW_GRPC_PORT']}")
    tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    assert grpc_client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0").tolist() == [[1.0, 2.0]]
    grpc_client.close()
    children = stack.children()  # and the gateway's decode process (TGW_DECODE_PROCESSES) with its tracker
    servers = [p for p in children if b"multiprocessing" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(servers) == 3  # redis-server (cache), redis-server (jobs) and tritonserver
    assert "serving on uvloop.Loop" in stack.log.read_text()  # the same loop as `tgw serve` (issue 15)
    # Redis memory (issue 15): a bounded cache that evicts, and a jobs instance that never does.
    import redis

    for port, policy, bounded in (
        ("TGW_REDIS_PORT", "allkeys-lru", True),
        ("TGW_JOBS_REDIS_PORT", "noeviction", False),
    ):
        config = redis.Redis(port=int(stack.env[port]), decode_responses=True).config_get("maxmemory*")
        assert config["maxmemory-policy"] == policy
        assert (int(config["maxmemory"]) > 0) is bounded
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=60) == 0
    wait_gone(children)
    wait_no_leftovers(stack)


@pytest.mark.parametrize("stack", [{"TGW_SUPERVISE_MAX_RESTARTS": "0"}], indirect=True)
def test_a_dead_child_takes_the_stack_down(stack: TgwProcess) -> None:
    """With no restarts allowed (the default restarts; tests/integration/test_chaos.py), a dead child stops
    everything with its log tail."""
    children = stack.children()
    triton_pid = next(p for p in children if "tritonserver" in Path(f"/proc/{p}/cmdline").read_text())
    os.kill(triton_pid, signal.SIGKILL)
    assert stack.proc.wait(timeout=60) == 1
    wait_gone(children)
    wait_no_leftovers(stack)
    assert "tritonserver exited unexpectedly" in stack.log.read_text()


def test_sigkill_leaves_no_orphans(stack: TgwProcess) -> None:
    children = stack.children()
    stack.proc.kill()
    stack.proc.wait()
    wait_gone(children, timeout=30)
    wait_no_leftovers(stack)


PEPPER = "pepper-" + __import__("secrets").token_urlsafe(32)


@pytest.mark.parametrize("stack", [{"TGW_AUTH": "required", "TGW_KEY_PEPPER": PEPPER}], indirect=True)
def test_tgw_keys_from_another_shell_finds_the_running_stack(stack: TgwProcess, tmp_path: Path) -> None:
    """`tgw keys create` beside `make run`, in a shell that knows only the pepper (and the state dir, as a
    checkout's default .tgw/): the key lands in the stack's keys Redis and the gateway accepts it. Pointed at
    the cache Redis (allkeys-lru), it refuses; with no stack and no address, it says which it would use."""
    shell = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    shell.update({"TGW_KEY_PEPPER": PEPPER, "TGW_STATE_DIR": stack.env["TGW_STATE_DIR"]})

    def tgw(*args: str, env: dict[str, str] = shell) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    made = tgw("create", "--name", "newcomer")
    assert made.returncode == 0, made.stderr
    key = __import__("json").loads(made.stdout)["key"]
    r = httpx.get(f"{stack.url}/v1/models", headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 200, r.text
    assert (
        httpx.get(f"{stack.url}/v1/models", headers={"X-API-Key": key + "x"}, timeout=10).status_code == 401
    )

    cache = {**shell, "TGW_REDIS_URL": f"redis://127.0.0.1:{stack.env['TGW_REDIS_PORT']}/0"}
    refused = tgw("create", "--name", "evictable", env=cache)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "allkeys-lru" in refused.stderr and "TGW_REDIS_URL" in refused.stderr, refused.stderr

    nowhere = {**shell, "TGW_STATE_DIR": str(tmp_path / "no-stack")}
    lost = tgw("list", env=nowhere)
    assert lost.returncode == 2 and "no running `tgw up`" in lost.stderr, lost.stderr
    assert "redis://127.0.0.1:6379/0" in lost.stderr, lost.stderr

    down = {**shell, "TGW_AUTH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    unreachable = tgw("list", env=down)
    assert unreachable.returncode == 1 and "TGW_AUTH_REDIS_URL" in unreachable.stderr, unreachable.stderr
    assert down["TGW_AUTH_REDIS_URL"] in unreachable.stderr


def test_a_model_that_fails_to_load_stops_the_start_at_once_naming_it(tmp_path: Path) -> None:
    """Triton logs the failure 0.1 s after start but stays not-ready: the start fails as soon as Triton's
    repository index reports the model UNAVAILABLE, naming it and quoting its log line, not after 120 s."""
    import shutil

    from app.launcher import EmbeddedTriton, LaunchError

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "tests" / "models" / "identity_fp32", repo / "identity_fp32",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    broken = repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text(
        (repo / "identity_fp32" / "config.pbtxt").read_text().replace('"identity_fp32"', '"broken"')
    )
    (broken / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('boom')\n"
    )
    server = EmbeddedTriton([repo], free_port(), free_port(), free_port(), tmp_path / "state")
    start = time.monotonic()
    with pytest.raises(LaunchError) as failed:
        server.start(timeout=120)
    took = time.monotonic() - start
    message = str(failed.value)
    assert "'broken'" in message and "boom" in message, message
    assert took < 60, f"the failure was reported after {took:.0f} s"
    assert not server.process.alive()


def test_tgw_doctor_reports_the_running_stack(stack: TgwProcess, tmp_path: Path) -> None:
    """From another shell that knows only the state dir: the gateway, both Redis with their eviction
    policies, Triton and its models; with no stack it fails naming what is missing."""
    shell = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    shell["TGW_STATE_DIR"] = stack.env["TGW_STATE_DIR"]

    def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "doctor"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    out = doctor(shell)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split(None, 1)[1].split("  ")[0].strip(): line for line in out.stdout.splitlines()}
    assert lines["tgw up"].startswith("ok") and str(stack.proc.pid) in lines["tgw up"]
    assert lines["gateway"].startswith("ok") and lines["gateway ready"].startswith("ok")
    assert "allkeys-lru" in lines["cache Redis"] and lines["cache Redis"].startswith("ok")
    keys = lines["keys and jobs Redis"]
    assert keys.startswith("ok") and "noeviction" in keys and stack.env["TGW_JOBS_REDIS_PORT"] in keys
    assert lines["Triton"].startswith("ok") and lines["models"].startswith("ok")

    gone = doctor({**shell, "TGW_STATE_DIR": str(tmp_path / "none"), "TGW_PORT": str(free_port())})
    assert gone.returncode == 1 and "FAIL  gateway" in gone.stdout, gone.stdout


def test_ctrl_c_drains_the_gateway_then_stops_the_children_quietly(tmp_path: Path) -> None:
    """A terminal's Ctrl-C is SIGINT to the whole foreground process group. The children run in their own
    sessions, so only `tgw up` gets it: the gateway drains while Redis and Triton still serve, then they
    stop. Before, Redis died first and every clean stop logged connection warnings."""
    log = tmp_path / "up.log"
    tgw = start_tgw(["up"], up_env(tmp_path / "state", TGW_LOG_FORMAT="text"), log, new_session=True)
    try:
        children = tgw.children()
        assert len(children) >= 3, children  # two Redis, Triton
        os.killpg(tgw.proc.pid, signal.SIGINT)  # the terminal's Ctrl-C
        assert tgw.proc.wait(timeout=60) == 0, tgw.log_tail()
    finally:
        tgw.stop(graceful=False)
    wait_gone(children)
    after = log.read_text().split("SIGINT received", 1)[1]
    noisy = [line for line in after.splitlines() if " WARNING " in line or " ERROR " in line]
    assert noisy == [], noisy
    assert "stopping tritonserver" in after and "stopping redis-server" in after


@pytest.mark.parametrize("stack", [{"TGW_WORKERS": "2"}], indirect=True)
def test_tgw_up_serves_with_the_worker_count_it_is_given(stack: TgwProcess) -> None:
    """TGW_WORKERS gateway processes under tgw up (it served one before, whatever the setting said), the
    children still supervised; SIGTERM stops them all."""
    import psutil

    me = psutil.Process(stack.proc.pid)

    def spawned() -> list[psutil.Process] | None:
        found = [p for p in me.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
        # the gateway workers, not their decode processes (spawned by them: TGW_DECODE_PROCESSES)
        workers = [p for p in found if p.ppid() not in {s.pid for s in found}]
        return workers if len(workers) >= 2 else None

    gateways = eventually(
        spawned, 30, 0.3, message=lambda: str([p.cmdline() for p in me.children(recursive=True)])
    )
    assert len(gateways) == 2, [p.cmdline() for p in me.children(recursive=True)]
    with httpx.Client(base_url=stack.url, timeout=10) as c:
        for _ in range(20):
            r = c.post("/v2/models/identity_fp32/infer", json={"inputs": [
                {"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]})  # fmt: skip
            assert r.status_code == 200, r.text
    assert "2 worker processes" in stack.log.read_text()
    children = stack.children()
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=60) == 0, stack.log_tail()
    wait_gone(children + [p.pid for p in gateways])
