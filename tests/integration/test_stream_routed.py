"""The gRPC stream door, statistics and repository index go through the gateway's clients (issue 21 item 5,
the streaming seam): with ``TGW_TRITON_URLS`` naming two real Tritons and the first one stopped, a
decoupled model's stream, a sequence over the stream, ``ModelStatistics`` and ``RepositoryIndex`` are all
served by the second. (They used their own channel to the first Triton before, and died with it.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.gateway_server import running_gateway_addresses
from tests.integration.servers import running_tritons
from tests.integration.test_grpc_stream_edge import SEQUENCE, count_request, fp32_request, output, stub_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedTriton]]:
    with running_tritons(
        tmp_path_factory, ["identity_fp32", "repeat_decoupled", SEQUENCE], count=2
    ) as servers:
        yield servers


def _stream(
    address: str, requests: list[service_pb2.ModelInferRequest]
) -> list[service_pb2.ModelStreamInferResponse]:
    with stub_for(address) as stub:
        return list(stub.ModelStreamInfer(iter(requests), timeout=60))


def test_stream_statistics_and_index_are_served_by_the_second_triton_when_the_first_is_gone(
    two_tritons: list[EmbeddedTriton], redis_server: EmbeddedRedis
) -> None:
    first, second = two_tritons
    urls = ",".join(t.grpc_url for t in two_tritons)
    with running_gateway_addresses(triton_urls=urls, redis_url=redis_server.url) as gateway:
        before = _stream(gateway.grpc, [count_request(3, "warm")])
        assert [r.error_message for r in before] == [""] * 3
        first.stop()
        for attempt in range(4):  # each one a fresh stream; the dead endpoint may be picked first
            # a parameter of its own: a completed stream is cached, and a replay would not reach Triton
            responses = _stream(gateway.grpc, [count_request(3, f"d{attempt}", attempt=attempt)])
            assert [r.error_message for r in responses] == [""] * 3, responses
            assert [r.infer_response.id for r in responses] == [f"d{attempt}"] * 3
        seq = 7_000_000 + free_port()
        values = np.full((1, 3), 2.5, np.float32)
        [answer] = _stream(gateway.grpc, [fp32_request(values, "s", model=SEQUENCE, sequence_id=seq,
                                                       sequence_start=True, sequence_end=True)])  # fmt: skip
        assert not answer.error_message, answer.error_message
        assert output(answer, "OUTPUT0", np.float32).ravel().tolist() == [2.5, 2.5, 2.5]
        with stub_for(gateway.grpc) as stub:
            stats = stub.ModelStatistics(
                service_pb2.ModelStatisticsRequest(name="repeat_decoupled"), timeout=30
            )
            index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=30)
        assert [s.name for s in stats.model_stats] == ["repeat_decoupled"]
        assert stats.model_stats[0].inference_stats.success.count >= 1
        assert {m.name for m in index.models} >= {"identity_fp32", "repeat_decoupled", SEQUENCE}
        assert {m.state for m in index.models} == {"READY"}
    assert second.process is not None and second.process.alive()
