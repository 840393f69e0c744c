"""Generic Python-backend model that serves ``<version>/model.pt`` (TorchScript) with PyTorch on a GPU.

This is what every ``configs/gpu*.pbtxt`` written by ``tgw convert`` points at (through
``<version>/model_torch.py``). Input and output names, types and batching come from the model
configuration; nothing is model-specific here. TensorRT stays the production reference
(``config.pbtxt``); no TensorRT plan was built anywhere, this runner is what serves on a GPU without one.

Parameters read from the configuration (all optional, ``string_value``):

- ``torch_file``: TorchScript file inside the version directory (default ``model.pt``)
- ``precision``: ``fp16`` (default: FP16 weights under ``torch.autocast``: matrix products and
  convolutions in FP16, the inputs and what autocast keeps in FP32 (reductions, normalisation) in FP32,
  so a model that standardises raw values keeps their precision), ``half`` (everything in FP16, inputs
  cast too) or ``fp32``. On a CPU instance it is always FP32.
- ``execution``: ``graphs`` (default: one CUDA graph per batch bucket, captured at load) or ``eager``

Tensors travel by DLPack both ways (``to_dlpack`` / ``pb_utils.Tensor.from_dlpack``): no numpy here.
The requests Triton hands ``execute`` together are copied row after row into one pinned host buffer,
moved to the GPU in one copy into the captured input buffer, padded to the next bucket (1, 2, 4 …
``max_batch_size``; the padded rows hold whatever the buffer held and their outputs are ignored),
computed by one graph replay and copied back in one copy, then split per request.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

try:  # only importable inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - unit tests do not need it
    pb_utils = None

logger = logging.getLogger(__name__)

# Triton config data types -> torch dtype names (resolved with getattr(torch, name) once torch is imported).
TRITON_TO_TORCH: dict[str, str] = {
    "TYPE_BOOL": "bool",
    "TYPE_UINT8": "uint8",
    "TYPE_INT8": "int8",
    "TYPE_INT16": "int16",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP16": "float16",
    "TYPE_FP32": "float32",
    "TYPE_FP64": "float64",
}
EXECUTION_MODES = ("graphs", "eager")
PRECISIONS = ("fp16", "half", "fp32")


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a graph is captured for: powers of two up to ``max_batch``, and ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``rows`` (a batch is padded up to it)."""
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def chunks(sizes: list[int], max_batch: int) -> list[list[int]]:
    """Group request indices into runs whose rows fit ``max_batch`` (Triton's batcher keeps a batch within
    ``max_batch_size``; this only guards against a request larger than that on its own)."""
    groups: list[list[int]] = []
    rows = 0
    for i, n in enumerate(sizes):
        if groups and rows + n <= max_batch:
            groups[-1].append(i)
            rows += n
        else:
            groups.append([i])
            rows = n
    return groups


def _param(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return str(value) if value not in (None, "") else default


def parse_options(config: dict[str, Any]) -> dict[str, str]:
    """The runner's parameters, checked (ValueError names the bad one)."""
    opts = {
        "torch_file": _param(config, "torch_file", "model.pt"),
        "precision": _param(config, "precision", "fp16"),
        "execution": _param(config, "execution", "graphs"),
    }
    if opts["precision"] not in PRECISIONS:
        raise ValueError(f"parameter precision: expected one of {PRECISIONS}, got {opts['precision']!r}")
    if opts["execution"] not in EXECUTION_MODES:
        raise ValueError(f"parameter execution: expected one of {EXECUTION_MODES}, got {opts['execution']!r}")
    return opts


class TritonPythonModel:
    """Triton Python-backend entry point (``initialize`` / ``execute`` / ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        import torch

        self.torch = torch
        config = json.loads(args["model_config"])
        self.name = str(config.get("name"))
        opts = parse_options(config)
        path = os.path.join(args["model_repository"], args["model_version"], opts["torch_file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.name}: TorchScript file not found: {path}")
        on_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(
            f"cuda:{int(args.get('model_instance_device_id', 0))}" if on_gpu else "cpu"
        )
        if on_gpu:
            torch.cuda.set_device(self.device)
        self.precision = opts["precision"] if on_gpu else "fp32"
        model = torch.jit.load(path, map_location=self.device).eval()
        self.model = model if self.precision == "fp32" else model.half()
        self.inputs = [
            (t["name"], getattr(torch, TRITON_TO_TORCH[t["data_type"]]), [int(d) for d in t["dims"]])
            for t in config["input"]
        ]
        self.outputs = [
            (t["name"], getattr(torch, TRITON_TO_TORCH[t["data_type"]])) for t in config["output"]
        ]
        self.max_batch = max(int(config.get("max_batch_size", 0)), 1)
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.buckets = batch_buckets(self.max_batch)
        self.use_graphs = opts["execution"] == "graphs" and on_gpu
        if opts["execution"] == "graphs" and not on_gpu:
            logger.warning("%s: CUDA graphs need a GPU instance; running eager on %s", self.name, self.device)
        pin = on_gpu
        # Host staging (pinned: one asynchronous copy each way) and the device input buffers the graphs read.
        self.host_in = [
            torch.zeros((self.max_batch, *dims), dtype=dt, pin_memory=pin) for _, dt, dims in self.inputs
        ]
        self.dev_in = [
            torch.zeros((self.max_batch, *dims), dtype=dt, device=self.device) for _, dt, dims in self.inputs
        ]
        self.graphs: dict[int, tuple[Any, list[Any]]] = {}
        with torch.no_grad():
            if self.use_graphs:
                self._capture()
            else:
                self._forward([b[:1] for b in self.dev_in])  # load check
        logger.info(
            "%s: %s on %s, %s, buckets %s",
            self.name,
            "CUDA graphs" if self.use_graphs else "eager",
            self.device,
            opts["precision"],
            self.buckets,
        )

    def _forward(self, xs: list[Any]) -> list[Any]:
        """The model on device tensors at the configured precision, outputs cast to the declared dtypes."""
        torch = self.torch
        if self.precision == "half":
            xs = [x.half() if x.is_floating_point() else x for x in xs]
        # The TorchScript graph as traced, without the JIT's profiling re-optimisation (which could compile
        # kernels in the middle of a capture); no autocast weight-cast cache (it does not survive capture).
        with torch.jit.optimized_execution(False):
            if self.precision == "fp16":
                with torch.autocast(self.device.type, dtype=torch.float16, cache_enabled=False):
                    out = self.model(*xs)
            else:
                out = self.model(*xs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(outs) != len(self.outputs):
            raise ValueError(
                f"the model returned {len(outs)} outputs, the configuration declares {len(self.outputs)}"
            )
        return [o.to(dt) for o, (_, dt) in zip(outs, self.outputs, strict=True)]

    def _capture(self) -> None:
        torch = self.torch
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)
        for b in sorted(self.buckets, reverse=True):  # largest first: the shared pool is sized by it
            views = [x[:b] for x in self.dev_in]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (cuBLAS handles, autotuning) outside the capture
                    self._forward(views)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outs = self._forward(views)
            self.graphs[b] = (graph, outs)
        torch.cuda.synchronize(self.device)

    def _run(self, rows: int) -> list[Any]:
        """Inputs are in ``host_in[:rows]``; returns host tensors of ``rows`` rows per output."""
        for h, d in zip(self.host_in, self.dev_in, strict=True):
            d[:rows].copy_(h[:rows], non_blocking=True)
        if self.use_graphs:
            graph, outs = self.graphs[bucket_for(rows, self.buckets)]
            graph.replay()
            return [o[:rows].to("cpu") for o in outs]
        return [o.to("cpu") for o in self._forward([d[:rows] for d in self.dev_in])]

    def _gather(self, requests: list[Any]) -> list[int]:
        from torch.utils.dlpack import from_dlpack

        sizes: list[int] = []
        offsets = [0] * len(self.inputs)
        for r in requests:
            n = None
            for k, (name, _, _) in enumerate(self.inputs):
                t = from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack())
                if not self.batching:
                    t = t.unsqueeze(0)
                rows = int(t.shape[0])
                self.host_in[k][offsets[k] : offsets[k] + rows].copy_(t)
                offsets[k] += rows
                n = rows if n is None else n
            sizes.append(int(n or 0))
        return sizes

    def _respond(self, outs: list[Any], start: int, rows: int) -> Any:
        from torch.utils.dlpack import to_dlpack

        tensors = []
        for (name, _), o in zip(self.outputs, outs, strict=True):
            part = o[start : start + rows] if self.batching else o[start]
            tensors.append(pb_utils.Tensor.from_dlpack(name, to_dlpack(part.contiguous())))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        sizes = [self._rows(r) for r in requests]
        for group in chunks(sizes, self.max_batch):
            batch = [requests[i] for i in group]
            try:
                got = self._gather(batch)
                total = sum(got)
                if total > self.max_batch:
                    raise ValueError(f"{total} rows exceed max_batch_size {self.max_batch}")
                with self.torch.no_grad():
                    outs = self._run(total)
                start = 0
                for i, n in zip(group, got, strict=True):
                    responses[i] = self._respond(outs, start, n)
                    start += n
            except Exception as exc:  # one bad batch must not take the instance down
                for i in group:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"PyTorch: {exc}"))
        return responses

    def _rows(self, request: Any) -> int:
        if not self.batching:
            return 1
        shape = pb_utils.get_input_tensor_by_name(request, self.inputs[0][0]).shape()
        return int(shape[0]) if shape else 1

    def finalize(self) -> None:
        self.graphs.clear()
        self.model = None
