"""Shared memory between the gateway and Triton on one host (``TGW_TRITON_SHM=system|cuda``).

An ``InferenceTransport`` wrapping the configured one: a call whose large tensors (inputs and outputs of
at least 1 KiB each) hold at least ``TGW_SHM_MIN_BYTES`` together goes to Triton over gRPC with those
tensors placed in one registered region: the inputs are written there before the call, Triton writes the
outputs there, and only region name, offset and size cross the socket. Smaller calls, and calls larger
than a region, go to the wrapped transport unchanged. Output sizes come from the model's configuration
(fetched once per model and version): an output with a variable dimension besides the batch, or of
type BYTES, comes back over the socket.

Two kinds of region:

- ``system``: POSIX shared memory (``/dev/shm``), tritonclient's ``shared_memory`` utilities.
- ``cuda``: device memory on GPU ``TGW_SHM_CUDA_DEVICE`` allocated with ``cudaMalloc`` through
  ``cuda-bindings`` (``cuda.bindings.runtime``) and handed to Triton as a CUDA IPC handle; the gateway
  copies inputs host -> device and outputs device -> host itself (tritonclient's CUDA helpers copy whole
  regions and take no offsets). When ``cuda-bindings`` is not importable or no GPU is visible, the
  gateway logs why and uses ``system`` regions.

Regions: a pool of ``TGW_SHM_REGIONS`` regions of ``TGW_SHM_REGION_BYTES``, created and registered when
the gateway starts (retried on the first large call if Triton was not up), each used by one call at a
time, unregistered and freed (unlinked / ``cudaFree``) when it stops. Names are
``tgw_shm_<pid>_<random>_<i>``: two gateways (or two workers of one) never share a region, and a
gateway that starts removes the regions — in ``/dev/shm`` and in Triton's registry, system and CUDA —
of gateways whose process is gone (a crash leaks nothing past the next start; the driver frees a dead
process's device memory once Triton's mapping of it is unregistered). If Triton forgets the regions (it
restarted), the call goes through the wrapped transport and the pool is registered again on the next
large call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.clients.grpc_status import from_grpc, grpc_status_from_text
from app.clients.protocols import InferenceTransport, TritonCall, TritonResult

logger = logging.getLogger(__name__)

PREFIX = "tgw_shm_"
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+_\d+$")
SHM_DIR = Path("/dev/shm")
MIN_TENSOR_BYTES = 1024  # a tensor smaller than this always travels in the message


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


def place(sizes: Mapping[str, int], min_bytes: int, region_bytes: int) -> dict[str, tuple[int, int]]:
    """``name -> (offset, size)`` in one region for the tensors that travel by shared memory: all of at
    least 1 KiB when they hold ``min_bytes`` together, 64-byte aligned, in the order given; empty when the
    call is small or does not fit a region (it then goes through the socket)."""
    big = {n: s for n, s in sizes.items() if s >= MIN_TENSOR_BYTES}
    if not big or sum(big.values()) < min_bytes:
        return {}
    out, offset = {}, 0
    for name, size in big.items():
        out[name] = (offset, int(size))
        offset += (int(size) + 63) // 64 * 64
    return out if offset <= region_bytes else {}


def layout(arrays: dict[str, np.ndarray], min_bytes: int, region_bytes: int) -> dict[str, tuple[int, int]]:
    """``place`` for input arrays only."""
    return place({n: int(a.nbytes) for n, a in arrays.items()}, min_bytes, region_bytes)


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One output of a model's configuration: its datatype and dims (without the batch dimension)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    batched: bool

    def nbytes(self, batch: int) -> int | None:
        """Its size for a batch of ``batch`` rows; None when not known before the call."""
        from tritonclient.utils import triton_to_np_dtype

        dtype = triton_to_np_dtype(self.datatype) if self.datatype != "BYTES" else None
        if dtype is None or any(d < 0 for d in self.dims):
            return None
        n = int(np.prod(self.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
        return n * batch if self.batched else n


def output_specs(config: Mapping[str, Any]) -> list[OutputSpec]:
    """The outputs of a model configuration as ``get_model_config(as_json=True)["config"]`` gives it
    (int64 dims arrive as strings)."""
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    out = []
    for o in config.get("output", []):
        datatype = str(o.get("data_type", "TYPE_INVALID")).removeprefix("TYPE_")
        datatype = "BYTES" if datatype == "STRING" else datatype
        dims = tuple(int(d) for d in o.get("dims", []))
        out.append(OutputSpec(str(o["name"]), datatype, dims, batched))
    return out


# --- the two kinds of region -------------------------------------------------------------------------
class Regions(Protocol):
    kind: str

    def create(self, name: str, size: int) -> Any: ...
    def write(self, region: Any, offset: int, array: np.ndarray) -> None: ...
    def flush(self) -> None: ...
    def read(self, region: Any, offset: int, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray: ...
    def destroy(self, region: Any) -> None: ...
    def clean_stale(self) -> None: ...
    async def status(self, client: Any) -> set[str]: ...
    async def register(self, client: Any, name: str, region: Any, size: int) -> None: ...
    async def unregister(self, client: Any, name: str) -> None: ...


class SystemRegions:
    """POSIX shared memory in ``/dev/shm``."""

    kind = "system"

    def create(self, name: str, size: int) -> Any:
        from tritonclient.utils import shared_memory as shm

        return shm.create_shared_memory_region(name, "/" + name, size)

    def write(self, region: Any, offset: int, array: np.ndarray) -> None:
        from tritonclient.utils import shared_memory as shm

        shm.set_shared_memory_region(region, [array], offset=offset)

    def flush(self) -> None:
        pass

    def read(self, region: Any, offset: int, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
        from tritonclient.utils import shared_memory as shm

        return np.array(shm.get_contents_as_numpy(region, dtype, shape, offset=offset))  # a copy

    def destroy(self, region: Any) -> None:
        from tritonclient.utils import shared_memory as shm

        shm.destroy_shared_memory_region(region)

    def clean_stale(self) -> None:
        for name in stale(p.name for p in SHM_DIR.glob(f"{PREFIX}*")):
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink()
                logger.info("removed the shared-memory region %s of a gateway that is gone", name)

    async def status(self, client: Any) -> set[str]:
        return set((await client.get_system_shared_memory_status(as_json=True)).get("regions", {}))

    async def register(self, client: Any, name: str, region: Any, size: int) -> None:
        await client.register_system_shared_memory(name, "/" + name, size)

    async def unregister(self, client: Any, name: str) -> None:
        await client.unregister_system_shared_memory(name)


@dataclass(slots=True)
class CudaRegion:
    ptr: int
    ipc_handle: bytes


class CudaRegions:
    """Device memory shared with Triton by CUDA IPC (``cuda-bindings``). Raises at construction when
    ``cuda-bindings`` is missing or device ``device_id`` is not visible."""

    kind = "cuda"

    def __init__(self, device_id: int) -> None:
        from cuda.bindings import runtime  # type: ignore[import-not-found,unused-ignore]

        self._rt: Any = runtime
        self.device_id = device_id
        count = self._check(runtime.cudaGetDeviceCount())
        if count <= device_id:
            raise RuntimeError(f"CUDA device {device_id} is not visible ({count} devices)")
        self._check(runtime.cudaSetDevice(device_id))

    def _check(self, result: Any) -> Any:
        err, rest = result[0], result[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {self._rt.cudaGetErrorName(err)[1]!r}")
        return rest[0] if len(rest) == 1 else None

    def create(self, name: str, size: int) -> CudaRegion:
        rt = self._rt
        self._check(rt.cudaSetDevice(self.device_id))
        ptr = int(self._check(rt.cudaMalloc(size)))
        handle = self._check(rt.cudaIpcGetMemHandle(ptr))
        raw = bytes((ctypes.c_char * rt.CUDA_IPC_HANDLE_SIZE).from_address(handle.getPtr()))
        return CudaRegion(ptr, raw)

    def write(self, region: CudaRegion, offset: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpy(region.ptr + offset, a.ctypes.data, a.nbytes, kind))

    def flush(self) -> None:
        # a copy from pageable memory may return before the DMA is done: Triton reads on its own stream
        self._check(self._rt.cudaDeviceSynchronize())

    def read(self, region: CudaRegion, offset: int, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
        out = np.empty(shape, dtype)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpy(out.ctypes.data, region.ptr + offset, out.nbytes, kind))
        return out

    def destroy(self, region: CudaRegion) -> None:
        self._check(self._rt.cudaFree(region.ptr))

    def clean_stale(self) -> None:
        pass  # the driver frees a dead process's allocations; Triton's registrations are cleaned in _register

    async def status(self, client: Any) -> set[str]:
        return set((await client.get_cuda_shared_memory_status(as_json=True)).get("regions", {}))

    async def register(self, client: Any, name: str, region: CudaRegion, size: int) -> None:
        raw = base64.b64encode(region.ipc_handle)
        await client.register_cuda_shared_memory(name, raw, self.device_id, size)

    async def unregister(self, client: Any, name: str) -> None:
        await client.unregister_cuda_shared_memory(name)


def make_regions(kind: str, cuda_device: int = 0) -> Regions:
    """``system`` or ``cuda`` regions; ``cuda`` falls back to ``system`` (logged) where it cannot work."""
    if kind == "cuda":
        try:
            return CudaRegions(cuda_device)
        except Exception as exc:
            logger.warning("shared memory: CUDA regions unavailable (%s: %s); using system shared memory",
                           type(exc).__name__, exc)  # fmt: skip
    return SystemRegions()


class SharedMemoryTransport:
    """``InferenceTransport``: large inputs and outputs through shared memory, the rest through ``inner``."""

    def __init__(
        self,
        inner: InferenceTransport,
        grpc_address: str,
        min_bytes: int,
        regions: int,
        region_bytes: int,
        retry_after_s: int = 2,
        kind: str = "system",
        cuda_device: int = 0,
    ) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.inner = inner
        self.min_bytes = min_bytes
        self.region_bytes = region_bytes
        self.retry_after_s = retry_after_s
        self.regions = make_regions(kind, cuda_device)
        self.kind = self.regions.kind
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(grpc_address)
        token = secrets.token_hex(4)
        self.names = [f"{PREFIX}{os.getpid()}_{token}_{i}" for i in range(regions)]
        self._handles: dict[str, Any] = {}
        self._free: asyncio.Queue[str] = asyncio.Queue()
        self._registered = False
        self._lock = asyncio.Lock()
        self._outputs: dict[tuple[str, str], list[OutputSpec]] = {}
        self.calls = 0  # calls that went through shared memory (tests, metrics)
        self.output_calls = 0  # of those, calls whose outputs came back through it

    async def start(self) -> None:
        """Create the pool, clean what dead gateways left, register with Triton (best effort: retried on
        the first large call if Triton does not answer yet)."""
        self._create_pool()
        try:
            await self._register()
        except Exception as exc:
            logger.warning("shared memory: registering with Triton failed (%s); retried later", exc)

    def _create_pool(self) -> None:
        self.regions.clean_stale()
        for name in self.names:
            self._handles[name] = self.regions.create(name, self.region_bytes)
            self._free.put_nowait(name)

    async def _register(self) -> None:
        async with self._lock:
            if self._registered:
                return
            known = await self.regions.status(self._client)
            for name in stale(known):
                with contextlib.suppress(Exception):
                    await self.regions.unregister(self._client, name)
                    logger.info("unregistered the shared-memory region %s of a gateway that is gone", name)
            for name in self.names:
                if name in known:
                    await self.regions.unregister(self._client, name)
                await self.regions.register(self._client, name, self._handles[name], self.region_bytes)
            self._registered = True
            logger.info("shared memory: %d %s regions of %d bytes registered with Triton",
                        len(self.names), self.kind, self.region_bytes)  # fmt: skip

    async def _output_specs(self, call: TritonCall) -> list[OutputSpec]:
        key = (call.model, call.version)
        specs = self._outputs.get(key)
        if specs is None:
            try:
                config = await self._client.get_model_config(call.model, call.version, as_json=True)
            except Exception:
                return []  # not cached: asked again on the next call (the call itself reports the error)
            specs = self._outputs[key] = output_specs(config.get("config", {}))
        return specs

    async def infer(self, call: TritonCall) -> TritonResult:
        if not self._handles or call.classification:  # top-k answers are a few strings: no region
            return await self.inner.infer(call)
        arrays = {n: np.ascontiguousarray(a) for n, a in call.inputs.items()}
        sizes = {f"in:{n}": int(a.nbytes) for n, a in arrays.items()}
        specs = await self._output_specs(call)
        if specs:
            batch = int(next(iter(arrays.values())).shape[0]) if arrays and specs[0].batched else 1
            wanted = set(call.outputs) if call.outputs else None
            for spec in specs:
                size = spec.nbytes(batch) if wanted is None or spec.name in wanted else None
                if size is not None:
                    sizes[f"out:{spec.name}"] = size
        places = place(sizes, self.min_bytes, self.region_bytes)
        if not places:
            return await self.inner.infer(call)
        if not self._registered:
            try:
                await self._register()
            except Exception:
                return await self.inner.infer(call)
        region = await self._free.get()
        try:
            return await self._infer_shm(call, arrays, places, specs, region)
        except _Unregistered:
            self._registered = False
            return await self.inner.infer(call)
        finally:
            self._free.put_nowait(region)

    async def _infer_shm(
        self,
        call: TritonCall,
        arrays: dict[str, np.ndarray],
        places: dict[str, tuple[int, int]],
        specs: list[OutputSpec],
        region: str,
    ) -> TritonResult:
        from tritonclient.utils import InferenceServerException, triton_to_np_dtype

        grpcclient = self._grpc
        handle = self._handles[region]
        inputs = []
        for name, a in arrays.items():
            tensor = grpcclient.InferInput(name, list(a.shape), call.datatypes[name])
            if f"in:{name}" in places:
                offset, size = places[f"in:{name}"]
                self.regions.write(handle, offset, a)
                tensor.set_shared_memory(region, size, offset=offset)
            else:
                tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        self.regions.flush()
        out_places = {k[4:]: v for k, v in places.items() if k.startswith("out:")}
        names = list(call.outputs) if call.outputs else ([s.name for s in specs] if out_places else [])
        outputs = []
        for name in names:
            requested = grpcclient.InferRequestedOutput(name)
            if name in out_places:
                offset, size = out_places[name]
                requested.set_shared_memory(region, size, offset=offset)
            outputs.append(requested)
        options = call.options
        try:
            result = await self._client.infer(
                call.model, inputs, model_version=call.version, outputs=outputs or None,
                request_id=call.request_id, sequence_id=options.sequence_id,
                sequence_start=options.sequence_start, sequence_end=options.sequence_end,
                priority=options.priority, timeout=options.timeout_us or None,
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
            if o.name in out_places:
                offset, size = out_places[o.name]
                dtype = np.dtype(triton_to_np_dtype(o.datatype))
                shape = [int(d) for d in o.shape]
                if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > size:
                    raise from_grpc(None, f"output {o.name} is larger than its shared-memory place")
                arr = self.regions.read(handle, offset, dtype, shape)
            else:
                arr = result.as_numpy(o.name)
            if arr is not None:
                out[o.name] = arr
                dtypes[o.name] = o.datatype
        if out_places:
            self.output_calls += 1
        return TritonResult(response.model_version, out, dtypes)

    def stream(self, call: TritonCall) -> AsyncIterator[TritonResult]:
        """Streamed calls go through the wrapped transport (their responses arrive one by one)."""
        return self.inner.stream(call)

    async def live(self) -> bool:
        return await self.inner.live()

    async def close(self) -> None:
        """Unregister the pool from Triton and free it (the wrapped transport is closed by its owner)."""
        if self._registered:
            for name in self.names:
                with contextlib.suppress(Exception):
                    await self.regions.unregister(self._client, name)
            self._registered = False
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                self.regions.destroy(handle)
        self._handles.clear()
        with contextlib.suppress(Exception):
            await self._client.close()


class _Unregistered(Exception):
    """Triton does not know the region (it restarted): the call is re-sent through the socket."""
