"""Embedded servers are started without running code between fork and exec, keep their pid, and die with
the process that started them (even when it is SIGKILLed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.launcher import ManagedProcess
from tests.eventually import eventually
from tests.processes import ROOT, alive


def test_children_start_cleanly_while_grpc_threads_are_busy(tmp_path: Path) -> None:
    """With a ``preexec_fn`` (fork, then Python in the child) 9 of 300 such children died of SIGABRT here:
    gRPC's fork handlers restarted its poller in the child, whose epoll descriptor the child then closed."""
    stop = threading.Event()

    def busy() -> None:
        with grpc.insecure_channel("127.0.0.1:1") as channel:  # nothing listens: each call fails fast
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=0.05)
                except grpc.RpcError:
                    pass

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        codes = [_run(ManagedProcess("true", ["true"], tmp_path / "true.log")) for _ in range(150)]
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert codes == [0] * len(codes)


def test_the_child_keeps_its_pid_and_dies_with_a_killed_parent(tmp_path: Path) -> None:
    parent_code = (
        "import sys, time; from pathlib import Path; from app.launcher import ManagedProcess\n"
        f"p = ManagedProcess('sleeper', ['sleep', '60'], Path({str(tmp_path / 'sleep.log')!r}))\n"
        "p.start(); print(p.pid, flush=True); time.sleep(60)\n"  # a parent that only lives
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())

    def execd() -> bool:  # exec'd: the same pid runs sleep now
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert command.split(b"\0")[0] == b"sleep", command
        return True

    eventually(execd, 10, 0.02)
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    eventually(lambda: not alive(pid), 10, 0.05, "the child outlived its SIGKILLed parent")


def test_a_managed_process_stops(tmp_path: Path) -> None:
    proc = ManagedProcess("sleeper", ["sleep", "60"], tmp_path / "sleep.log")
    proc.start()
    assert proc.alive()
    proc.stop(timeout=5)
    assert not proc.alive() and proc.returncode() == -signal.SIGTERM


def _run(proc: ManagedProcess) -> int:
    proc.start()
    assert proc.proc is not None
    return proc.proc.wait(10)
