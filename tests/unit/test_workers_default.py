"""How many gateway workers `tgw serve` and `tgw up` start when TGW_WORKERS is unset."""

from __future__ import annotations

import pytest

from app import cli
from app.settings import Settings


def test_serve_one_worker_per_usable_core_and_up_half(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TGW_WORKERS", raising=False)
    settings = Settings(triton_model_config_name="cpu")
    for cores, serve, up in ((1, 1, 1), (2, 2, 1), (16, 16, 8), (64, 16, 16)):
        monkeypatch.setattr(cli, "usable_cores", lambda n=cores: n)
        assert (cli.serve_workers(settings), cli.up_workers(settings)) == (serve, up)
    gpu = Settings(triton_model_config_name="gpu")  # the embedded Triton's models on the GPU
    for cores, up in ((2, 1), (4, 3), (16, 12)):
        monkeypatch.setattr(cli, "usable_cores", lambda n=cores: n)
        assert cli.up_workers(gpu) == up


def test_an_explicit_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGW_WORKERS", "3")
    monkeypatch.setattr(cli, "usable_cores", lambda: 16)
    settings = Settings()
    assert cli.serve_workers(settings) == 3 and cli.up_workers(settings) == 3


def test_usable_cores_is_bounded_by_the_affinity() -> None:
    import os

    assert 1 <= cli.usable_cores() <= len(os.sched_getaffinity(0))
