"""Large payloads decoded (and large answers encoded) in a small process pool, off the event loop.

A worker *thread* does not take a large decode off the loop: orjson and numpy hold the interpreter lock for
the whole call (a 16 MB /v1 body: ~95 ms with the lock held, the loop's too). ``Offload`` runs such calls in
``TGW_DECODE_PROCESSES`` child processes (spawned, never forked: gRPC's and uvloop's threads run in the
parent), so the loop only pays for pickling what crosses (bytes in; numpy arrays, the decoded request or
the encoded answer out: ~1 ms for 3.5 MB of float32).

- At or below ``DECODE_POOL_BYTES`` (decode) / ``ENCODE_POOL_VALUES`` (encode) the call runs in place,
  exactly as before: a pool hop would cost more than the call.
- ``TGW_DECODE_PROCESSES=0``: no pool; large decodes go to a worker thread as before (``decode_off_loop``).
- A child that dies (OOM kill, ``kill -9``) breaks the pool: it is rebuilt once (in the background) and the
  request that saw it is decoded in a worker thread, never answered 500, never left hanging.

Built once per process by ``app.gateway.build_gateway`` (``Gateway.offload``), warmed in the background at
start-up (the child started and the codecs imported, so the first large body does not pay a spawn), and
shut down (children joined, killed if they will not stop) when the gateway closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from app.services.payload import OFF_LOOP_BYTES, decode_off_loop

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Bodies above this are decoded in the pool. Measured on the 2-core dev box: decode in place costs ~5 ms at
# this size for the densest legitimate body (single-digit numbers, "0,0,...": ~85 ns a value, 2 bytes a
# value; 96 KiB = 49k values = 4.8 ms); typical floats ("0.4173...", ~11 bytes a value) cost ~0.8 ms here.
# A pool hop costs the request ~0.4 ms of latency and the loop ~0.15 ms of CPU.
DECODE_POOL_BYTES = 96 * 1024
# Answers with more JSON values than this are encoded in the pool: orjson writes ~25 ns a float32 value
# (random floats; 200k values: 5 ms), numpy's BYTES -> str conversion ~10x that (weighed in ``json_values``).
ENCODE_POOL_VALUES = 200_000
_JOIN_S = 5.0  # a child still decoding at shutdown gets this long, then it is killed
_GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _child_init(parent: int, preload: tuple[str, ...] = ()) -> None:
    """In each child: the parent decides when children end (a SIGINT/SIGTERM sent to the whole process
    group must not kill a child under a request the parent is still answering), and a parent that dies
    without closing the pool (``kill -9``, OOM) takes its children with it; the modules whose functions
    run here (``preload``: the codecs, named by the composition root) are imported once now, not on the
    first request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _GROUP_SIGNALS)  # blocked by the parent while it started us
    _die_with(parent)
    for module in preload:
        importlib.import_module(module)


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """SIGKILL when the parent process ends (Linux ``PR_SET_PDEATHSIG``). A child holds both ends of the
    pool's pipes itself, so it would never see them close and would outlive a killed gateway. Children are
    started from the event-loop thread (every ``submit`` is made there), which lives as long as the pool:
    the signal is tied to that thread."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends the children
        return
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(0)


def _pid() -> int:
    return os.getpid()


class Offload:
    """``await offload.decode(size, fn, *args)`` / ``await offload.encode(values, fn, *args)``: ``fn(*args)``
    in place when small, else in a child process. ``fn`` and its arguments must pickle: a module-level
    function, bytes, ``ModelInfo``, numpy arrays; ``GatewayError``s raised in the child come back with their
    status, details and headers."""

    def __init__(self, processes: int, preload: tuple[str, ...] = ()) -> None:
        self.processes = processes
        self.preload = preload  # modules each child imports at start (those whose functions it runs)
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._warming: asyncio.Task[None] | None = None
        self._healthy = False  # the current pool's children started and answered
        self.rebuilds = 0  # pools rebuilt after a child died

    @property
    def enabled(self) -> bool:
        return self.processes > 0

    def start(self) -> None:
        """Create the pool and warm it in the background (call on the running loop)."""
        if self.processes > 0 and self._executor is None:
            self._executor = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor | None:
        """A pool with its children starting; None (and an error logged) where processes cannot be
        started at all, e.g. without /dev/shm for multiprocessing's semaphores: large bodies then go to
        worker threads, the gateway still serves."""
        try:
            return self._start_pool()
        except OSError as exc:
            logger.error("decode processes cannot start (%r): large bodies are decoded in worker threads "
                         "instead (TGW_DECODE_PROCESSES)", exc)  # fmt: skip
            return None

    def _start_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        executor = concurrent.futures.ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(os.getpid(), self.preload),
        )
        # One no-op call per process starts every child now (a call made while none is idle starts one),
        # with SIGINT and SIGTERM blocked: a child inherits the mask, so a Ctrl-C or a SIGTERM sent to the
        # process group while it is still importing cannot kill it (``_child_init`` then ignores both).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
        try:
            calls = [executor.submit(_pid) for _ in range(self.processes)]
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._healthy = False
        loop = asyncio.get_running_loop()
        self._warming = loop.create_task(self._warm(executor, calls), name="offload-warm")
        return executor

    async def _warm(
        self, executor: concurrent.futures.ProcessPoolExecutor, calls: list[concurrent.futures.Future[int]]
    ) -> None:
        """Wait for the children's first answers: started and initialised."""
        try:
            pids = await asyncio.gather(*(asyncio.wrap_future(call) for call in calls))
            self._healthy = executor is self._executor
            logger.info("decode pool ready: %d process(es) %s", self.processes, sorted(set(pids)))
        except Exception as exc:  # a broken or closed pool: the first call that needs it says so
            logger.warning("decode pool did not warm up: %r", exc)

    async def ready(self) -> None:
        """Wait until the pool's children have started (tests; start-up does not wait)."""
        if self._warming is not None:
            await asyncio.shield(self._warming)

    @property
    def in_place_bytes(self) -> int:
        """Bodies up to this size are decoded in place; larger ones in the pool (without one: a thread)."""
        return DECODE_POOL_BYTES if self.enabled else OFF_LOOP_BYTES

    async def decode(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """A request body of ``size`` bytes: in place up to ``DECODE_POOL_BYTES``, else in the pool
        (without a pool: today's worker thread above ``OFF_LOOP_BYTES``)."""
        if size <= DECODE_POOL_BYTES:
            return fn(*args)
        if self._executor is None:
            return await decode_off_loop(size, fn, *args)
        return await self._in_child(fn, args)

    def encodes_in_child(self, values: int) -> bool:
        return values > ENCODE_POOL_VALUES and self._executor is not None

    async def encode(self, values: int, fn: Callable[..., T], *args: Any) -> T:
        """An answer of ``values`` JSON values: in the pool above ``ENCODE_POOL_VALUES``, else in place."""
        if not self.encodes_in_child(values):
            return fn(*args)
        return await self._in_child(fn, args)

    async def _in_child(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        executor = self._executor
        assert executor is not None
        try:
            future = executor.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError) as exc:  # broken, or shut down since
            return await self._recover(executor, fn, args, exc)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            return await self._recover(executor, fn, args, exc)

    async def _recover(
        self, broken: concurrent.futures.ProcessPoolExecutor, fn: Callable[..., T], args: tuple[Any, ...],
        exc: BaseException,
    ) -> T:  # fmt: skip
        """A child died: a fresh pool (once for all the calls that saw this one break), and this call in a
        worker thread (slower for the loop, but answered). A pool whose children never started is not
        rebuilt (it would break again at once): large bodies go to worker threads from then on."""
        if broken is self._executor:
            broken.shutdown(wait=False, cancel_futures=True)  # its manager has ended the other children
            if self._healthy:
                self.rebuilds += 1
                logger.warning("decode pool broken (%r): a child process died; starting a new one", exc)
                self._executor = self._new_pool()
            else:
                logger.error("decode pool children cannot start (%r): large bodies are decoded in worker "
                             "threads instead", exc)  # fmt: skip
                self._executor = None
        return await asyncio.to_thread(fn, *args)

    async def close(self) -> None:
        """Shut the pool down: children asked to stop and waited for (up to ``_JOIN_S``), then killed;
        none is left behind."""
        executor, self._executor = self._executor, None
        if self._warming is not None:
            self._warming.cancel()
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)  # the pool's manager thread reaps them
        alive = await asyncio.to_thread(_still_running, processes, _JOIN_S)
        for process in alive:
            logger.warning("decode pool child %s did not stop within %g s: killed", process.pid, _JOIN_S)
            with contextlib.suppress(OSError):
                process.kill()


def _still_running(processes: list[Any], timeout_s: float) -> list[Any]:
    """The processes that have not ended within ``timeout_s`` (their sentinels; never reaps them)."""
    pending = {p.sentinel: p for p in processes}
    deadline = time.monotonic() + timeout_s
    while pending and (left := deadline - time.monotonic()) > 0:
        for sentinel in multiprocessing.connection.wait(list(pending), left):
            pending.pop(sentinel)
    return list(pending.values())


# No pool: in place, large decodes in a worker thread (TGW_DECODE_PROCESSES=0, tests, tools).
INLINE = Offload(0)
