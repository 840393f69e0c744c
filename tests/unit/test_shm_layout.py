"""Shared-memory transport, the pure parts: which inputs go through a region and where, whose regions
are stale."""

from __future__ import annotations

import numpy as np
import pytest

from app.clients.triton_shm import (
    SystemRegions,
    layout,
    make_regions,
    output_specs,
    place,
    region_owner,
    stale,
)


def test_layout_places_large_inputs_aligned() -> None:
    image = np.zeros((1, 3, 224, 224), np.float32)  # 602,112 bytes
    mask = np.zeros((1, 3, 224, 224), np.uint8)  # 150,528 bytes
    small = np.zeros((1, 4), np.float32)
    places = layout({"IMAGE": image, "MASK": mask, "K": small}, min_bytes=256 * 1024, region_bytes=1 << 20)
    assert places == {"IMAGE": (0, 602112), "MASK": (602112, 150528)}  # 602112 is 64-byte aligned
    assert layout({"IMAGE": image}, min_bytes=1 << 20, region_bytes=4 << 20) == {}  # below the threshold
    assert layout({"IMAGE": image}, min_bytes=1024, region_bytes=600_000) == {}  # does not fit a region
    assert layout({"K": small}, min_bytes=1024, region_bytes=1 << 20) == {}
    odd = np.zeros(1001, np.uint8)
    assert layout({"A": odd, "B": odd}, min_bytes=1024, region_bytes=1 << 20) == {}  # each under 1 KiB
    odd = np.zeros(1025, np.uint8)
    assert layout({"A": odd, "B": odd}, min_bytes=1024, region_bytes=1 << 20) == {
        "A": (0, 1025),
        "B": (1088, 1025),
    }


def test_region_names_and_stale_owners() -> None:
    assert region_owner("tgw_shm_123_ab12cd34_0") == 123
    assert region_owner("tgw_123_0") is None and region_owner("other") is None
    names = ["tgw_shm_10_aa_0", "tgw_shm_11_bb_1", "foreign_region", "tgw_shm_12_cc_2"]
    assert stale(names, alive=lambda pid: pid == 11) == ["tgw_shm_10_aa_0", "tgw_shm_12_cc_2"]


def test_place_puts_inputs_and_outputs_in_one_region() -> None:
    sizes = {"in:IMAGE": 602112, "in:K": 16, "out:MEAN": 12, "out:NEG": 602112}
    assert place(sizes, 256 * 1024, 2 << 20) == {"in:IMAGE": (0, 602112), "out:NEG": (602112, 602112)}
    assert place({"out:NEG": 602112}, 256 * 1024, 1 << 20) == {"out:NEG": (0, 602112)}  # a large answer alone
    assert place(sizes, 256 * 1024, 1 << 20) == {}  # both do not fit: the socket


def test_output_specs_from_the_model_config() -> None:
    config = {  # as get_model_config(as_json=True)["config"] gives it: int64 dims as strings
        "max_batch_size": 8,
        "output": [
            {"name": "MEAN", "data_type": "TYPE_FP32", "dims": ["3"]},
            {"name": "NEG", "data_type": "TYPE_FP16", "dims": ["3", "224", "224"]},
            {"name": "VAR", "data_type": "TYPE_FP32", "dims": ["-1"]},
            {"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["1"]},
        ],
    }
    specs = {s.name: s for s in output_specs(config)}
    assert specs["MEAN"].nbytes(4) == 4 * 3 * 4
    assert specs["NEG"].nbytes(2) == 2 * 3 * 224 * 224 * 2
    assert specs["VAR"].nbytes(1) is None and specs["TEXT"].nbytes(1) is None  # unknown before the call
    unbatched = output_specs({"output": [{"name": "Y", "data_type": "TYPE_INT64", "dims": ["5", "2"]}]})
    assert unbatched[0].nbytes(7) == 80


def test_cuda_falls_back_to_system_where_it_cannot_work() -> None:
    # here (no cuda-bindings or no GPU) asking for CUDA regions gives system ones; with both it gives CUDA
    try:
        from cuda.bindings import runtime  # noqa: F401

        pytest.skip("cuda-bindings is installed: the fallback is not reachable without hiding it")
    except ImportError:
        pass
    assert isinstance(make_regions("cuda"), SystemRegions)
    assert make_regions("system").kind == "system"
