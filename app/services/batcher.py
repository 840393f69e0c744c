"""Gateway-side micro-batching: concurrent small requests to the same model and version are stacked along
the batch dimension into one Triton call, and the outputs are split back per request.

It never changes an answer:

* Only calls with ``max_batch_rows`` > 0 are batched: the inference service sets it from the model info
  (``ModelInfo.max_batch_rows``: ``max_batch_size > 1`` and ``dynamic_batching`` in the config, not a
  sequence model; Triton's own scheduler would stack the same requests the same way), and only for
  requests with no parameters and no sequence controls.
* Only requests that agree on everything but the batch rows are stacked: same requested outputs, same
  priority and Triton timeout, same input names, datatypes and non-batch dims. Up to ``max_batch_rows``.
* If the batched call fails in a way that one request could have caused (Triton rejected it), every request
  is re-sent alone, so each gets its own answer or its own error. Timeouts and "unavailable" are shared.
* If an output does not come back with one row per input row, the requests are re-sent alone.

Waiting is bounded: a request to an idle model (nothing queued, nothing in flight) is sent at once from
its own task; otherwise it is sent when fewer than ``max_inflight`` batched calls are in flight for its
model (after one event-loop turn, so requests that arrive together leave together), or joins the next
batch, which leaves as soon as a call returns — or after ``window_us`` when that is set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from app.clients.protocols import InferenceTransport, TritonCall, TritonResult
from app.errors import GatewayError, ServiceUnavailable, UpstreamTimeout


@dataclass(slots=True)
class _Item:
    call: TritonCall
    rows: int
    queued_at: float
    future: asyncio.Future[TritonResult]


class _Queue:
    """Pending calls of one (model, version, outputs, options, input layout)."""

    def __init__(self, owner: BatchingTransport, max_rows: int) -> None:
        self.owner = owner
        self.max_rows = max_rows
        self.pending: list[_Item] = []
        self.rows = 0
        self.inflight = 0
        self.scheduled = False

    async def direct(self, call: TritonCall) -> TritonResult:
        """An idle model's call leaves at once, from the caller's task (no queue hop: at low load a hop
        is pure latency). It counts as in flight, so calls arriving meanwhile queue and batch."""
        self.inflight += 1
        try:
            return await self.owner.inner.infer(call)
        finally:
            self.inflight -= 1
            if self.pending and not self.scheduled:
                self._schedule()

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
            now = time.perf_counter()
            for it in batch:
                it.call.queued_s = now - it.queued_at
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
            result = await self.owner.inner.infer(item.call)
        except BaseException as exc:
            _fail(item.future, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _resolve(item.future, result)

    async def _batched(self, batch: list[_Item]) -> None:
        first = batch[0].call
        stacked = {n: np.concatenate([it.call.inputs[n] for it in batch], axis=0) for n in first.inputs}
        total = sum(it.rows for it in batch)
        call = replace(first, inputs=stacked, deadline=max(it.call.deadline for it in batch))
        started = time.perf_counter()
        try:
            result = await self.owner.inner.infer(call)
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
        per_row = (time.perf_counter() - started) / total  # the call's time, split by rows (usage metering)
        start = 0
        for it in batch:
            end = start + it.rows
            outputs = {n: arr[start:end].copy() for n, arr in result.outputs.items()}
            split = TritonResult(
                result.model_version, outputs, dict(result.datatypes), compute_s=per_row * it.rows
            )
            _resolve(it.future, split)
            start = end


def _resolve(fut: asyncio.Future[TritonResult], result: TritonResult) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future[TritonResult], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class BatchingTransport:
    """An ``InferenceTransport`` that micro-batches calls where it is safe and passes the rest through."""

    def __init__(self, inner: InferenceTransport, window_us: int = 0, max_inflight: int = 2) -> None:
        self.inner = inner
        self.window_s = window_us / 1e6
        self.max_inflight = max_inflight
        self.queues: dict[tuple[Any, ...], _Queue] = {}
        self.tasks: set[asyncio.Future[None]] = set()

    async def infer(self, call: TritonCall) -> TritonResult:
        max_rows = call.max_batch_rows
        rows = _rows(call.inputs) if max_rows > 1 and not call.parameters and not call.sequenced else None
        if rows is None or rows >= max_rows:
            return await self.inner.infer(call)
        layout = tuple(
            (n, call.datatypes[n], a.dtype.str, a.shape[1:])
            for n, a in sorted(call.inputs.items(), key=lambda kv: kv[0])
        )
        outputs = tuple(call.outputs) if call.outputs else None
        key = (call.model, call.version, outputs, call.options.priority, call.options.timeout_us, layout)
        queue = self.queues.get(key)
        if queue is None:
            if len(self.queues) > 1024:  # layouts are client-controlled: keep the map bounded
                self.queues = {k: q for k, q in self.queues.items() if q.pending or q.inflight}
            queue = self.queues[key] = _Queue(self, max_rows)
        if not queue.inflight and not queue.pending:
            return await queue.direct(call)
        future: asyncio.Future[TritonResult] = asyncio.get_running_loop().create_future()
        queue.submit(_Item(call, rows, time.perf_counter(), future))
        return await future

    def stream(self, call: TritonCall) -> AsyncIterator[TritonResult]:
        """Streamed calls are never stacked: straight to the wrapped transport."""
        return self.inner.stream(call)

    async def live(self) -> bool:
        return await self.inner.live()

    async def close(self) -> None:
        """The inner transport is owned (and closed) by whoever created it."""


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
