"""Gateway-side micro-batching: concurrent small requests to the same model and version are stacked along
the batch dimension into one Triton call, and the outputs are split back per request.

It never changes an answer:

* Only models that already accept being batched by Triton are batched: ``max_batch_size > 1`` and
  ``dynamic_batching`` in their config (Triton's own scheduler would stack the same requests the same way),
  and not sequence models.
* Only requests that agree on everything but the batch rows are stacked: same requested outputs, no
  request parameters, same input names, datatypes and non-batch dims. Up to ``max_batch_size`` rows.
* If the batched call fails in a way that one request could have caused (Triton rejected it), every request
  is re-sent alone, so each gets its own answer or its own error. Timeouts and "unavailable" are shared.
* If an output does not come back with one row per input row, the requests are re-sent alone.

Waiting is bounded: a request is sent at once when fewer than ``max_inflight`` batched calls are in flight
for its model (after one event-loop turn, so requests that arrive together leave together); otherwise it
joins the next batch, which leaves as soon as a call returns — or after ``window_us`` when that is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.clients.protocols import TritonClient, TritonResult
from app.errors import GatewayError, ServiceUnavailable, UpstreamTimeout
from app.services.registry import ModelInfo

ModelLookup = Callable[[str, str], "ModelInfo | None"]


def batchable(info: ModelInfo | None) -> bool:
    if info is None or info.max_batch_size <= 1:
        return False
    config = info.config
    return "dynamic_batching" in config and "sequence_batching" not in config


@dataclass(slots=True)
class _Item:
    inputs: Mapping[str, np.ndarray]
    rows: int
    request_id: str
    timeout_s: float
    future: asyncio.Future[TritonResult]


class _Queue:
    """Pending requests of one (model, version, outputs, input layout)."""

    def __init__(self, owner: BatchingTritonClient, model: str, version: str, max_rows: int,
                 datatypes: Mapping[str, str], outputs: Sequence[str] | None) -> None:  # fmt: skip
        self.owner = owner
        self.model = model
        self.version = version
        self.max_rows = max_rows
        self.datatypes = dict(datatypes)
        self.outputs = list(outputs) if outputs else None
        self.pending: list[_Item] = []
        self.rows = 0
        self.inflight = 0
        self.scheduled = False

    def submit(self, item: _Item) -> None:
        self.pending.append(item)
        self.rows += item.rows
        if self.rows >= self.max_rows:
            self._flush()
        elif not self.scheduled and self.inflight < self.owner.max_inflight:
            self._schedule()

    def _schedule(self) -> None:
        self.scheduled = True
        loop = asyncio.get_running_loop()
        if self.owner.window_s > 0:
            loop.call_later(self.owner.window_s, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending:
            batch: list[_Item] = []
            rows = 0
            while self.pending and rows + self.pending[0].rows <= self.max_rows:
                item = self.pending.pop(0)
                batch.append(item)
                rows += item.rows
            if not batch:  # cannot happen (each item has rows <= max_rows), but never spin
                batch.append(self.pending.pop(0))
            self.rows -= sum(i.rows for i in batch)
            self.inflight += 1
            task = asyncio.ensure_future(self._run(batch))
            self.owner.tasks.add(task)
            task.add_done_callback(self.owner.tasks.discard)
            if self.rows < self.max_rows:
                break
        # anything left waits for a call to come back (or the window)

    async def _run(self, batch: list[_Item]) -> None:
        try:
            if len(batch) == 1:
                await self._single(batch[0])
            else:
                await self._batched(batch)
        finally:
            self.inflight -= 1
            if self.pending and not self.scheduled:
                self._schedule()

    async def _single(self, item: _Item) -> None:
        try:
            result = await self.owner.inner.infer(
                self.model, self.version, item.inputs, self.datatypes, self.outputs, None,
                item.request_id, item.timeout_s,
            )  # fmt: skip
        except BaseException as exc:
            _fail(item.future, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _resolve(item.future, result)

    async def _batched(self, batch: list[_Item]) -> None:
        names = list(batch[0].inputs)
        stacked = {n: np.concatenate([it.inputs[n] for it in batch], axis=0) for n in names}
        total = sum(it.rows for it in batch)
        self.owner.batches += 1
        self.owner.batched_requests += len(batch)
        try:
            result = await self.owner.inner.infer(
                self.model, self.version, stacked, self.datatypes, self.outputs, None,
                batch[0].request_id, max(it.timeout_s for it in batch),
            )  # fmt: skip
        except (ServiceUnavailable, UpstreamTimeout) as exc:  # the same for every request
            for it in batch:
                _fail(it.future, exc)
            return
        except GatewayError:  # maybe one request's fault: let each one have its own answer
            await asyncio.gather(*(self._single(it) for it in batch))
            return
        except BaseException as exc:
            for it in batch:
                _fail(it.future, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if any(arr.ndim == 0 or arr.shape[0] != total for arr in result.outputs.values()):
            await asyncio.gather(*(self._single(it) for it in batch))
            return
        start = 0
        for it in batch:
            end = start + it.rows
            outputs = {n: arr[start:end].copy() for n, arr in result.outputs.items()}
            _resolve(it.future, TritonResult(result.model_version, outputs, dict(result.datatypes)))
            start = end


def _resolve(fut: asyncio.Future[TritonResult], result: TritonResult) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future[TritonResult], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class BatchingTritonClient:
    """A ``TritonClient`` that micro-batches ``infer`` where it is safe and delegates everything else."""

    def __init__(
        self, inner: TritonClient, lookup: ModelLookup, window_us: int = 0, max_inflight: int = 2
    ) -> None:
        self.inner = inner
        self.lookup = lookup
        self.window_s = window_us / 1e6
        self.max_inflight = max_inflight
        self.queues: dict[tuple[Any, ...], _Queue] = {}
        self.tasks: set[asyncio.Future[None]] = set()
        self.batches = 0  # calls that carried more than one request
        self.batched_requests = 0

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        datatypes: Mapping[str, str],
        outputs: Sequence[str] | None,
        parameters: Mapping[str, Any] | None,
        request_id: str,
        timeout_s: float,
    ) -> TritonResult:
        info = self.lookup(model, version)
        rows = _rows(inputs) if not parameters and batchable(info) else None
        if info is None or rows is None or rows >= info.max_batch_size:
            return await self.inner.infer(
                model, version, inputs, datatypes, outputs, parameters, request_id, timeout_s
            )
        layout = tuple(
            (n, datatypes[n], a.dtype.str, a.shape[1:])
            for n, a in sorted(inputs.items(), key=lambda kv: kv[0])
        )
        key = (model, version, tuple(outputs) if outputs else None, layout)
        queue = self.queues.get(key)
        if queue is None:
            if len(self.queues) > 1024:  # layouts are client-controlled: keep the map bounded
                self.queues = {k: q for k, q in self.queues.items() if q.pending or q.inflight}
            queue = self.queues[key] = _Queue(self, model, version, info.max_batch_size, datatypes, outputs)
        future: asyncio.Future[TritonResult] = asyncio.get_running_loop().create_future()
        queue.submit(_Item(dict(inputs), rows, request_id, timeout_s, future))
        return await future

    async def server_live(self) -> bool:
        return await self.inner.server_live()

    async def server_ready(self) -> bool:
        return await self.inner.server_ready()

    async def server_metadata(self) -> dict[str, Any]:
        return await self.inner.server_metadata()

    async def repository_index(self) -> list[dict[str, Any]]:
        return await self.inner.repository_index()

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        return await self.inner.model_metadata(model, version)

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        return await self.inner.model_config(model, version)

    async def close(self) -> None:
        """The inner client is owned (and closed) by whoever created it."""


def _rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    """The common batch size of all inputs, or None when they have none."""
    rows = None
    for arr in inputs.values():
        if arr.ndim == 0 or arr.shape[0] < 1:
            return None
        if rows is None:
            rows = int(arr.shape[0])
        elif rows != arr.shape[0]:
            return None
    return rows
