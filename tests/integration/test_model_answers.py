"""Model metadata, config and statistics through the gateway are Triton's own answers field for field, and
the same body from every worker (issue 19, item 18). Compared against Triton's HTTP API itself, through
``tgw serve`` with two workers (the answers were built per process: the config's maps came out in another
order in each, its 64-bit numbers as strings and its zero fields left out; the statistics did not count
what the gateway's cache answered, so a tool reading them around a window of cache hits, NVIDIA's
perf_analyzer, found no request and stopped)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway_addresses
from tests.integration.serve_workers import serving_workers, worker_of

pytestmark = pytest.mark.integration
MODELS = [
    "identity_fp32",
    "versioned_fp32",
    "transformer_timeseries",
    "forecast",
    "typed",
    "repeat_decoupled",
]


@pytest.fixture(scope="module")
def workers_url(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "tgw.log"
    namespace = f"answers-{uuid.uuid4().hex[:8]}"  # its own cache and served counts in the session Redis
    with serving_workers(triton, redis_server, log, workers=2, TGW_CACHE_NAMESPACE=namespace) as url:
        yield url


def _same_keys(ours: Any, theirs: Any, where: str = "") -> None:
    """Every field Triton writes is there, of the same JSON type, and nothing else (recursively)."""
    assert type(ours) is type(theirs), (
        f"{where}: {type(ours).__name__} against Triton's {type(theirs).__name__}"
    )
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"{where}: {sorted(set(ours) ^ set(theirs))}"
        for k in theirs:
            _same_keys(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, list) and theirs and ours:
        _same_keys(ours[0], theirs[0], f"{where}[0]")


def _bodies(url: str, path: str, n: int, most: int = 60) -> tuple[set[bytes], set[str]]:
    """The bodies of ``n`` answers (more, up to ``most``, until both workers have answered)."""
    bodies, workers = set(), set()
    for i in range(most):  # a fresh connection each: the workers share the listening socket
        if i >= n and len(workers) == 2:
            break
        r = httpx.get(f"{url}{path}", timeout=10)
        assert r.status_code == 200, r.text
        bodies.add(r.content)
        workers.add(worker_of(r))
    return bodies, workers


def test_metadata_and_config_are_tritons_and_the_same_from_every_worker(
    triton: EmbeddedTriton, workers_url: str
) -> None:
    answered_by: set[str] = set()
    for model in MODELS:
        for path in (
            f"/v2/models/{model}",
            f"/v2/models/{model}/config",
            f"/v2/models/{model}/versions/1/config",
        ):
            theirs = httpx.get(f"{triton.http_url}{path}", timeout=10).json()
            bodies, workers = _bodies(workers_url, path, 12)
            answered_by |= workers
            assert len(bodies) == 1, f"{path}: {len(bodies)} different bodies from {len(workers)} workers"
            ours = httpx.get(f"{workers_url}{path}").json()
            _same_keys(ours, theirs, path)
            assert ours == theirs, path
    assert len(answered_by) == 2  # both workers answered


def test_statistics_are_tritons_plus_what_the_gateway_answered(
    triton: EmbeddedTriton, workers_url: str
) -> None:
    model = "versioned_fp32"
    row = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [time.time(), 1.0]}]}
    path = f"/v2/models/{model}/versions/1/stats"
    with httpx.Client(base_url=workers_url, timeout=10) as c:  # one connection: one worker
        outcomes = []
        for _ in range(12):  # a miss, then answers from the gateway's cache
            r = c.post(f"/v2/models/{model}/versions/1/infer", json=row)
            assert r.status_code == 200, r.text
            outcomes.append(r.headers["x-cache"])
        no_cache = c.post(
            f"/v2/models/{model}/versions/1/infer", json=row, headers={"Cache-Control": "no-cache"}
        )
        assert no_cache.status_code == 200 and no_cache.headers["x-cache"] == "BYPASS"
    hits = outcomes.count("HIT")
    assert outcomes[0] == "MISS" and hits >= 8, outcomes

    def published() -> tuple[Any, Any]:  # each worker adds its count to the shared one every 0.5 s
        theirs = httpx.get(f"{triton.http_url}{path}").json()
        bodies, workers = _bodies(workers_url, path, 12)
        assert len(bodies) == 1 and len(workers) == 2, f"{len(bodies)} bodies from {len(workers)} workers"
        ours = httpx.get(f"{workers_url}{path}").json()
        counted = ours["model_stats"][0]["inference_stats"]["cache_hit"]["count"]
        assert counted == theirs["model_stats"][0]["inference_stats"]["cache_hit"]["count"] + hits, counted
        return theirs, ours

    theirs, ours = eventually(published, 15, 0.25, "the cache hits in the shared statistics of both workers")
    _same_keys(ours, theirs)  # zero fields too: last_inference, inference_count, execution_count, …
    t, o = theirs["model_stats"][0], ours["model_stats"][0]
    assert t["inference_stats"]["success"]["count"] >= 2  # the miss and the no-cache request reached Triton
    for name in ("inference_count", "execution_count"):
        assert o[name] == t[name], name  # as Triton counts its own cache hits: not executions
    for part in ("success", "queue", "cache_hit"):
        assert o["inference_stats"][part]["count"] == t["inference_stats"][part]["count"] + hits, part
    assert o["inference_stats"]["cache_hit"]["ns"] > t["inference_stats"]["cache_hit"]["ns"]
    for part in ("compute_input", "compute_infer", "compute_output", "fail", "cache_miss"):
        assert o["inference_stats"][part] == t["inference_stats"][part], part
    assert o["batch_stats"] == t["batch_stats"]
    assert o["last_inference"] >= t["last_inference"] > 0


def test_the_grpc_door_answers_the_same_statistics(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    with running_gateway_addresses(
        triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis_server.url,
        cache_namespace=f"answers-{uuid.uuid4().hex[:8]}",
    ) as gw:  # fmt: skip
        grpc = grpcclient.InferenceServerClient(gw.grpc)
        try:
            via_grpc = grpc.get_inference_statistics("identity_fp32", as_json=True)
        finally:
            grpc.close()
        via_http = httpx.get(f"{gw.http}/v2/models/identity_fp32/stats").json()
    entry = via_grpc["model_stats"][0]
    assert entry["name"] == "identity_fp32" and "endpoint" not in entry
    assert int(entry.get("inference_count", 0)) == via_http["model_stats"][0]["inference_count"]
