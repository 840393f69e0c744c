"""What the codecs share: ``Reply`` (a transport-neutral answer) and JSON tensor rendering."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import orjson

from app.errors import InvalidInput

if TYPE_CHECKING:
    from app.services.inference import InferRequest

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


T = TypeVar("T")
# Bodies larger than this are decoded in a worker thread: parsing and validating a few MB costs tens of
# milliseconds, which would hold every other request on the event loop; small bodies (the common case)
# are decoded in place, where a thread hop would cost more than the decode.
OFF_LOOP_BYTES = 256 * 1024


async def decode_off_loop(size: int, decode: Callable[..., T], *args: Any) -> T:
    """``decode(*args)``, in a worker thread when the body is ``size`` > ``OFF_LOOP_BYTES`` bytes."""
    if size <= OFF_LOOP_BYTES:
        return decode(*args)
    return await asyncio.to_thread(decode, *args)


class Reply(NamedTuple):
    """Status, body, content type and extra headers (lower-case names) of an answer."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_ORJSON_OPTS)


# What writing one JSON value of a BYTES tensor costs, in numeric values (numpy's per-item str conversion).
_OBJECT_VALUE_COST = 10


def json_values(outputs: Mapping[str, np.ndarray]) -> int:
    """The work of writing these tensors as JSON, in numeric values (``Offload.encode`` decides on it)."""
    total = 0
    for arr in outputs.values():  # a plain loop: ~0.15 µs for one small output (a generator: ~0.4)
        total += tensor_json_values(arr)
    return total


def tensor_json_values(arr: np.ndarray) -> int:
    return arr.size * _OBJECT_VALUE_COST if arr.dtype.kind == "O" else arr.size


def jsonable(arr: np.ndarray) -> Any:
    """orjson serialises numeric numpy arrays natively; BYTES become strings."""
    if arr.dtype == np.object_:
        return np.vectorize(
            lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object]
        )(arr).tolist()
    return arr


# Parameters Triton reads itself; they are not model parameters and never part of a cache key.
CALL_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"})


@dataclass(slots=True, frozen=True)
class CallOptions:
    """What a request asks of Triton's scheduler rather than of the model."""

    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False

    @property
    def sequence(self) -> bool:
        return bool(self.sequence_id)

    def apply(self, req: InferRequest) -> InferRequest:
        """Set these options on a decoded request (both KServe codecs, HTTP and gRPC)."""
        req.priority, req.timeout_us = self.priority, self.timeout_us
        req.sequence_id, req.sequence_start, req.sequence_end = (
            self.sequence_id, self.sequence_start, self.sequence_end,
        )  # fmt: skip
        return req


_NO_OPTIONS = CallOptions()


def call_options(params: dict[str, Any]) -> CallOptions:
    """Pop Triton's own parameters (``CALL_PARAMETERS``) out of ``params`` (in place) and check their
    types; the rest are the model's parameters (part of the cache key)."""

    if not params:
        return _NO_OPTIONS

    def take(key: str, kinds: type | tuple[type, ...], default: Any) -> Any:
        if key not in params:
            return default
        value = params.pop(key)
        if not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool)):
            raise InvalidInput(f"parameters.{key}: unexpected type {type(value).__name__}",
                               {"field": f"parameters.{key}"})  # fmt: skip
        if kinds is int and isinstance(value, int) and not 0 <= value < 2**64:  # Triton: uint64
            raise InvalidInput(f"parameters.{key}: expected an integer 0..{2**64 - 1}, got {value}",
                               {"field": f"parameters.{key}"})  # fmt: skip
        return value

    return CallOptions(
        priority=take("priority", int, 0),
        timeout_us=take("timeout", int, 0),
        sequence_id=take("sequence_id", (int, str), 0),
        sequence_start=take("sequence_start", bool, False),
        sequence_end=take("sequence_end", bool, False),
    )
