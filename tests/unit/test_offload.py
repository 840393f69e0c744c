"""``app.services.offload``: small payloads stay in place, large ones go to a child process, a child that
dies costs no request (the pool is rebuilt once and the call answered in a thread), domain errors come back
whole, and closing the pool leaves no process behind. Real child processes (spawned), no mocks."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
import time

import numpy as np
import orjson
import pytest

from app.codecs.common import OFF_LOOP_BYTES
from app.errors import GatewayError, InvalidInput, PayloadTooLarge, ServiceUnavailable
from app.frontends.rest import codec as v1
from app.services.offload import DECODE_POOL_BYTES, ENCODE_POOL_VALUES, INLINE, Offload
from app.services.registry import ModelInfo, TensorSpec
from tests.app_errors import gateway_error_classes

IDENT = ModelInfo(name="identity_fp32", version="1", versions=("1",), platform="python", max_batch_size=64,
                  inputs={"INPUT0": TensorSpec("INPUT0", "FP32", (-1, -1))},
                  outputs={"OUTPUT0": TensorSpec("OUTPUT0", "FP32", (-1, -1))})  # fmt: skip
PARENT = os.getpid()


# --- what the children run (module level: pickled by name) -----------------------------------------------
def where() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def refuse(kind: str) -> None:
    if kind == "invalid":
        raise InvalidInput("inputs.X: bad", {"field": "inputs.X", "expected": {"max_values": 3}})
    if kind == "unavailable":
        raise ServiceUnavailable("busy", {"queue_max": 1}, retry_after_s=7)
    raise PayloadTooLarge("too big", {"limit_bytes": 10})


def die_in_child(parent: int, wait_s: float = 0.0) -> str:
    """Killed (as the OOM killer would) when run in a child; answers when run in the parent."""
    if os.getpid() != parent:
        time.sleep(wait_s)
        os.kill(os.getpid(), signal.SIGKILL)
    return "answered in the parent"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:  # gone; or going: reading a dying process's stat can fail with ESRCH
        return False


async def _started(processes: int = 1) -> Offload:
    offload = Offload(processes)
    offload.start()
    await offload.ready()
    return offload


async def test_small_in_place_large_in_a_child_and_errors_come_back_whole() -> None:
    offload = await _started()
    try:
        here = (PARENT, threading.get_ident())
        assert await offload.decode(DECODE_POOL_BYTES, where) == here  # at the threshold: in place, no hop
        assert await offload.encode(ENCODE_POOL_VALUES, where) == here
        pid, _ = await offload.decode(DECODE_POOL_BYTES + 1, where)
        assert pid != PARENT
        assert (await offload.encode(ENCODE_POOL_VALUES + 1, where))[0] == pid
        # a real decode: bytes in, the validated request (numpy arrays) out
        values = np.arange(300_000, dtype=np.float32).reshape(1, -1)
        body = orjson.dumps({"inputs": {"INPUT0": values}}, option=orjson.OPT_SERIALIZE_NUMPY)
        req = await offload.decode(len(body), v1.decode, IDENT, body)
        np.testing.assert_array_equal(req.inputs["INPUT0"], values)
        assert req.datatypes == {"INPUT0": "FP32"} and req.info == IDENT
        for kind, cls in (
            ("invalid", InvalidInput),
            ("unavailable", ServiceUnavailable),
            ("big", PayloadTooLarge),
        ):
            with pytest.raises(cls) as raised:
                await offload.decode(DECODE_POOL_BYTES + 1, refuse, kind)
            with pytest.raises(cls) as expected:
                refuse(kind)
            for attr in ("status_code", "code", "message", "details", "headers"):
                assert getattr(raised.value, attr) == getattr(expected.value, attr), attr
        with pytest.raises(InvalidInput) as bad:  # a refused body, decoded in the child
            await offload.decode(
                DECODE_POOL_BYTES + 1, v1.decode, IDENT, b'{"inputs": {"INPUT0": [[1, NaN]]}}'
            )
        assert bad.value.status_code == 422 and bad.value.details["field"].startswith("inputs")
    finally:
        await offload.close()


def test_every_gateway_error_pickles_with_its_status_details_and_headers() -> None:
    """What crosses back from a child: every GatewayError subclass in app/ (any that a decode can raise)."""
    for cls in gateway_error_classes():
        exc = cls.__new__(cls)  # whatever its __init__ takes
        GatewayError.__init__(exc, "message", {"field": "inputs.X", "n": [1, 2]}, {"Retry-After": "3"})
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls
        for attr in ("status_code", "code", "message", "details", "headers"):
            assert getattr(back, attr) == getattr(exc, attr), (cls, attr)


async def test_a_child_killed_mid_call_costs_no_request_and_the_pool_is_rebuilt_once() -> None:
    offload = await _started()
    try:
        old_pid, _ = await offload.decode(DECODE_POOL_BYTES + 1, where)
        # two calls in flight when the child dies: both answered (in a thread), one rebuild
        answers = await asyncio.wait_for(asyncio.gather(
            offload.decode(DECODE_POOL_BYTES + 1, die_in_child, PARENT, 0.2),
            offload.decode(DECODE_POOL_BYTES + 1, where),
        ), timeout=30)  # fmt: skip
        assert answers[0] == "answered in the parent"
        assert answers[1][0] == PARENT  # the call queued behind it: answered in a thread, not lost
        assert offload.rebuilds == 1
        await offload.ready()
        new_pid, _ = await offload.decode(DECODE_POOL_BYTES + 1, where)
        assert new_pid not in (PARENT, old_pid)  # large bodies go to the new child again
        assert not alive(old_pid)
    finally:
        await offload.close()


async def test_a_pool_whose_children_never_worked_is_not_rebuilt_in_a_loop() -> None:
    offload = await _started()
    try:
        offload._healthy = False  # as if its children had never answered (they cannot start)
        assert await offload.decode(DECODE_POOL_BYTES + 1, die_in_child, PARENT) == "answered in the parent"
        assert offload.rebuilds == 0 and not offload.encodes_in_child(ENCODE_POOL_VALUES + 1)
        pid, _ = await offload.decode(OFF_LOOP_BYTES + 1, where)  # from now on: today's thread path
        assert pid == PARENT
    finally:
        await offload.close()


async def test_without_a_pool_large_decodes_go_to_a_thread_as_before() -> None:
    loop_thread = threading.get_ident()
    assert await INLINE.decode(OFF_LOOP_BYTES, where) == (PARENT, loop_thread)
    pid, thread = await INLINE.decode(OFF_LOOP_BYTES + 1, where)
    assert pid == PARENT and thread != loop_thread
    assert await INLINE.encode(10 * ENCODE_POOL_VALUES, where) == (PARENT, loop_thread)


async def test_close_leaves_no_child_behind() -> None:
    offload = await _started(2)
    pids = {(await offload.decode(DECODE_POOL_BYTES + 1, where))[0] for _ in range(4)}
    assert pids and PARENT not in pids
    await offload.close()
    for _ in range(200):  # the pool's manager thread reaps them: up to 10 s
        if not any(alive(pid) for pid in pids):
            break
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in pids), pids
    assert await offload.decode(OFF_LOOP_BYTES + 1, where) != (PARENT, threading.get_ident())  # still answers


_KILLED_PARENT = """
import asyncio, sys
from app.services.offload import Offload

async def main():
    offload = Offload(1)
    offload.start()
    await offload.ready()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_killed_gateway_takes_its_children_with_it() -> None:
    """``kill -9`` of the parent (no shutdown at all): its decode process and multiprocessing's resource
    tracker end too (PR_SET_PDEATHSIG; the tracker once the child has gone)."""
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
    finally:
        proc.kill()
        proc.wait(10)
    alive_after = psutil.wait_procs(children, timeout=10)[1]
    assert not alive_after, alive_after


async def test_ctrl_c_to_the_process_group_does_not_kill_a_starting_child() -> None:
    """SIGINT/SIGTERM reach the decode processes too when sent to the process group (a terminal's Ctrl-C,
    ``kill -- -PGID``), even while a child is still importing: it survives, the parent stops it."""
    import psutil

    before = {p.pid for p in psutil.Process().children()}
    offload = Offload(1)
    offload.start()
    try:
        started = [p for p in psutil.Process().children() if p.pid not in before]
        assert started
        for child in started:  # at once: the child is still starting up
            child.send_signal(signal.SIGINT)
            child.send_signal(signal.SIGTERM)
        await offload.ready()
        assert (await offload.decode(DECODE_POOL_BYTES + 1, where))[0] != PARENT
        assert offload.rebuilds == 0
    finally:
        await offload.close()


async def test_where_processes_cannot_start_the_gateway_still_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """No /dev/shm for multiprocessing's semaphores, say: an error logged, large bodies in threads."""
    offload = Offload(1)

    def no_processes() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(offload, "_start_pool", no_processes)
    offload.start()
    pid, thread = await offload.decode(OFF_LOOP_BYTES + 1, where)
    assert pid == PARENT and thread != threading.get_ident()
    assert not offload.encodes_in_child(ENCODE_POOL_VALUES + 1)
    await offload.close()
