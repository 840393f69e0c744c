from __future__ import annotations

import pytest

from app.services.registry import ModelInfo, TensorSpec


@pytest.fixture
def batched() -> ModelInfo:
    return ModelInfo(
        name="ts", version="1", versions=("1",), platform="python", max_batch_size=8,
        inputs={"series": TensorSpec("series", "FP32", (-1, 20, 1)),
                "scale": TensorSpec("scale", "FP32", (-1, 1), optional=True)},
        outputs={"forecast": TensorSpec("forecast", "FP32", (-1, 10))},
    )  # fmt: skip


@pytest.fixture
def typed() -> ModelInfo:
    return ModelInfo(
        name="typed", version="1", versions=("1",), platform="python", max_batch_size=0,
        inputs={"I8": TensorSpec("I8", "INT8", (2,)), "U16": TensorSpec("U16", "UINT16", (1,)),
                "B": TensorSpec("B", "BOOL", (1,)), "S": TensorSpec("S", "BYTES", (-1,)),
                "H": TensorSpec("H", "FP16", (1,))},
        outputs={"OUT": TensorSpec("OUT", "FP32", (1,))},
    )  # fmt: skip
