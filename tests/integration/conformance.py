"""Helpers of the conformance suite (test_conformance.py): the two targets every check runs against (the
embedded Triton and the gateway in front of it), sample inputs built from a model's metadata, and
normalisers that keep what the KServe v2 protocol specifies and drop what it leaves free (message text,
field order)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    name: str  # "triton" or "gateway"
    http: str  # http://host:port
    grpc: str  # host:port

    @property
    def http_host(self) -> str:
        return self.http.removeprefix("http://")


@dataclass(frozen=True)
class Outcome:
    """What a client call gave: ``ok`` and a normalised value, or ``error`` and the status (gRPC code or
    HTTP status class)."""

    ok: bool
    value: Any = None
    status: str = ""
    message: str = ""

    def same_as(self, other: Outcome) -> bool:
        return (self.ok, self.value if self.ok else self.status) == (
            other.ok,
            other.value if other.ok else other.status,
        )


def outcome(fn: Callable[[], T], normalise: Callable[[T], Any] = lambda v: v) -> Outcome:
    try:
        value = fn()
    except InferenceServerException as exc:
        status = exc.status() or ""
        if status.isdigit():  # tritonclient.http: the HTTP status; compare its class (400 vs 404 is free)
            status = f"{status[0]}xx"
        return Outcome(False, status=status, message=exc.message() or "")
    return Outcome(True, normalise(value))


def sample_value(datatype: str, shape: list[int], seed: int = 0) -> np.ndarray:
    """Values every model of the repositories accepts: a periodic series for floats, small counts for
    integers (horizons, repeat counts), text for BYTES."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return np.array([f"t{i}".encode() for i in range(count)], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    dtype = triton_to_np_dtype(datatype)
    if np.dtype(dtype).kind in "iu":
        return np.full(shape, 3, dtype=dtype)
    t = np.arange(count, dtype=np.float64) + seed
    return (np.abs(np.sin(2 * np.pi * t / 10)) + 0.1).astype(dtype).reshape(shape)


def sample_inputs(metadata: dict[str, Any], config: dict[str, Any], seed: int = 0) -> list[
    tuple[str, str, np.ndarray]
]:  # fmt: skip
    """(name, datatype, array) for every required input: batch 1, variable dims 24."""
    optional = {i["name"] for i in config.get("input", []) if i.get("optional")}
    batched = int(config.get("max_batch_size", 0)) > 0
    out = []
    for tensor in metadata["inputs"]:
        if tensor["name"] in optional:
            continue
        dims = [int(d) for d in tensor["shape"]]
        shape = [1 if (i == 0 and batched) else (24 if d < 0 else d) for i, d in enumerate(dims)]
        out.append((tensor["name"], tensor["datatype"], sample_value(tensor["datatype"], shape, seed)))
    return out


def arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype == np.object_:
            if x.tolist() != y.tolist():
                return False
        elif not np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
            return False
    return True


def metadata_view(meta: dict[str, Any]) -> dict[str, Any]:
    """KServe v2 model metadata, order-free; shapes as ints (gRPC's JSON mapping gives int64 as text)."""
    return {
        "name": meta["name"],
        "versions": sorted(meta.get("versions", [])),
        "platform": meta.get("platform", ""),
        "inputs": sorted((t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]),
        "outputs": sorted((t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]),
    }


def index_view(models: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((m["name"], str(m.get("version", "")), m.get("state", "")) for m in models)
