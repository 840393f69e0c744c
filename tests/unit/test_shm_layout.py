"""Shared-memory transport, the pure parts: which inputs go through a region and where, whose regions
are stale."""

from __future__ import annotations

import numpy as np

from app.clients.triton_shm import layout, region_owner, stale


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
