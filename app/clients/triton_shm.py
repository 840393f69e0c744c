"""Shared memory between the gateway and Triton on one host (``TGW_TRITON_SHM=system``).

An ``InferenceTransport`` wrapping the configured one: a call whose inputs hold at least
``TGW_SHM_MIN_BYTES`` (together) has those inputs written into a POSIX shared-memory region registered
with Triton, and goes to Triton over gRPC with only the region name, offset and size; smaller calls, and
calls larger than a region, go to the wrapped transport unchanged. Outputs come back over the socket
(the example models answer a few values; placing outputs needs their sizes before the call).

Regions: a pool of ``TGW_SHM_REGIONS`` regions of ``TGW_SHM_REGION_BYTES``, created and registered when
the gateway starts (retried on the first large call if Triton was not up), each used by one call at a
time, unregistered and unlinked when it stops. Names are ``tgw_shm_<pid>_<random>_<i>``: two gateways
(or two workers of one) never share a region, and a gateway that starts removes the regions — in
``/dev/shm`` and in Triton's registry — of gateways whose process is gone (a crash leaks nothing past
the next start). If Triton forgets the regions (it restarted), the call goes through the wrapped
transport and the pool is registered again on the next large call.

CUDA shared memory (``cuda``) is not implemented in this version: the setting accepts ``off`` and
``system`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from app.clients.protocols import InferenceTransport, TritonCall, TritonResult
from app.errors import from_grpc, grpc_status_from_text

logger = logging.getLogger(__name__)

PREFIX = "tgw_shm_"
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+_\d+$")
SHM_DIR = Path("/dev/shm")


def region_owner(name: str) -> int | None:
    """The pid in one of our region names (None: not ours)."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def stale(names: Iterable[str], alive: Any = pid_alive) -> list[str]:
    """Our region names whose owning process is gone."""
    out = []
    for name in names:
        pid = region_owner(name)
        if pid is not None and pid != os.getpid() and not alive(pid):
            out.append(name)
    return out


def layout(arrays: dict[str, np.ndarray], min_bytes: int, region_bytes: int) -> dict[str, tuple[int, int]]:
    """``name -> (offset, size)`` in one region for the inputs that travel by shared memory: all inputs of
    at least 1 KiB when they hold ``min_bytes`` together, 64-byte aligned; empty when the call is small or
    does not fit a region (it then goes through the socket)."""
    big = {n: a for n, a in arrays.items() if a.nbytes >= 1024}
    if not big or sum(a.nbytes for a in big.values()) < min_bytes:
        return {}
    out, offset = {}, 0
    for name, a in big.items():
        out[name] = (offset, int(a.nbytes))
        offset += (int(a.nbytes) + 63) // 64 * 64
    return out if offset <= region_bytes else {}


class SharedMemoryTransport:
    """``InferenceTransport``: large inputs through system shared memory, the rest through ``inner``."""

    def __init__(
        self,
        inner: InferenceTransport,
        grpc_address: str,
        min_bytes: int,
        regions: int,
        region_bytes: int,
        retry_after_s: int = 2,
    ) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.inner = inner
        self.min_bytes = min_bytes
        self.region_bytes = region_bytes
        self.retry_after_s = retry_after_s
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(grpc_address)
        token = secrets.token_hex(4)
        self.names = [f"{PREFIX}{os.getpid()}_{token}_{i}" for i in range(regions)]
        self._handles: dict[str, Any] = {}
        self._free: asyncio.Queue[str] = asyncio.Queue()
        self._registered = False
        self._lock = asyncio.Lock()
        self.calls = 0  # calls that went through shared memory (tests, metrics)

    async def start(self) -> None:
        """Create the pool, clean what dead gateways left, register with Triton (best effort: retried on
        the first large call if Triton does not answer yet)."""
        self._create_pool()
        try:
            await self._register()
        except Exception as exc:
            logger.warning("shared memory: registering with Triton failed (%s); retried later", exc)

    def _create_pool(self) -> None:
        from tritonclient.utils import shared_memory as shm

        for name in stale(p.name for p in SHM_DIR.glob(f"{PREFIX}*")):
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink()
                logger.info("removed the shared-memory region %s of a gateway that is gone", name)
        for name in self.names:
            self._handles[name] = shm.create_shared_memory_region(name, "/" + name, self.region_bytes)
            self._free.put_nowait(name)

    async def _register(self) -> None:
        async with self._lock:
            if self._registered:
                return
            status = await self._client.get_system_shared_memory_status(as_json=True)
            known = set(status.get("regions", {}))  # a map: name -> {key, offset, byte_size}
            for name in stale(known):
                with contextlib.suppress(Exception):
                    await self._client.unregister_system_shared_memory(name)
                    logger.info("unregistered the shared-memory region %s of a gateway that is gone", name)
            for name in self.names:
                if name in known:
                    await self._client.unregister_system_shared_memory(name)
                await self._client.register_system_shared_memory(name, "/" + name, self.region_bytes)
            self._registered = True
            logger.info("shared memory: %d regions of %d bytes registered with Triton",
                        len(self.names), self.region_bytes)  # fmt: skip

    async def infer(self, call: TritonCall) -> TritonResult:
        arrays = {n: np.ascontiguousarray(a) for n, a in call.inputs.items()}
        places = layout(arrays, self.min_bytes, self.region_bytes)
        if not places or not self._handles:
            return await self.inner.infer(call)
        if not self._registered:
            try:
                await self._register()
            except Exception:
                return await self.inner.infer(call)
        region = await self._free.get()
        try:
            return await self._infer_shm(call, arrays, places, region)
        except _Unregistered:
            self._registered = False
            return await self.inner.infer(call)
        finally:
            self._free.put_nowait(region)

    async def _infer_shm(
        self, call: TritonCall, arrays: dict[str, np.ndarray], places: dict[str, tuple[int, int]], region: str
    ) -> TritonResult:
        from tritonclient.utils import InferenceServerException
        from tritonclient.utils import shared_memory as shm

        grpcclient = self._grpc
        inputs = []
        for name, a in arrays.items():
            tensor = grpcclient.InferInput(name, list(a.shape), call.datatypes[name])
            if name in places:
                offset, size = places[name]
                shm.set_shared_memory_region(self._handles[region], [a], offset=offset)
                tensor.set_shared_memory(region, size, offset=offset)
            else:
                tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(n) for n in call.outputs] if call.outputs else None
        try:
            result = await self._client.infer(
                call.model, inputs, model_version=call.version, outputs=outputs, request_id=call.request_id,
                sequence_id=call.sequence_id, sequence_start=call.sequence_start,
                sequence_end=call.sequence_end, priority=call.priority, timeout=call.timeout_us or None,
                parameters=dict(call.parameters) if call.parameters else None,
                client_timeout=call.remaining_s(),
            )  # fmt: skip
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            if "shared memory" in message.lower() and "region" in message.lower():
                raise _Unregistered(message) from exc
            raise from_grpc(grpc_status_from_text(exc.status()), message, self.retry_after_s) from exc
        self.calls += 1
        response = result.get_response()
        out: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for o in response.outputs:
            arr = result.as_numpy(o.name)
            if arr is not None:
                out[o.name] = arr
                dtypes[o.name] = o.datatype
        return TritonResult(response.model_version, out, dtypes)

    async def live(self) -> bool:
        return await self.inner.live()

    async def close(self) -> None:
        """Unregister the pool from Triton and unlink it (the wrapped transport is closed by its owner)."""
        from tritonclient.utils import shared_memory as shm

        if self._registered:
            for name in self.names:
                with contextlib.suppress(Exception):
                    await self._client.unregister_system_shared_memory(name)
            self._registered = False
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                shm.destroy_shared_memory_region(handle)
        self._handles.clear()
        with contextlib.suppress(Exception):
            await self._client.close()


class _Unregistered(Exception):
    """Triton does not know the region (it restarted): the call is re-sent through the socket."""
