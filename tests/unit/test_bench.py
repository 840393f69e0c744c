"""The benchmark harness's pure logic: percentiles, merging shards, ratios, report writers, payloads."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import orjson
import pytest

from app.bench import report
from app.bench.payloads import TIMESERIES, TINY, grpc_request_factory, http_request_factory, make_targets
from app.bench.stats import LevelResult, Shard, merge, percentile, ratio


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_merge_shards() -> None:
    a = Shard(
        [100.0, 200.0, 300.0], errors=1, cache={"HIT": 3}, error_samples=["HTTP 502"], cpu_s=0.5, wall_s=1.0
    )
    b = Shard([400.0], cache={"HIT": 1, "MISS": 2}, cpu_s=0.25, wall_s=1.0)
    r = merge("m", "t", 8, 2.0, [a, b])
    assert r.requests == 4 and r.errors == 1
    assert r.throughput_rps == 2.0
    assert r.p50_ms == 0.2 and r.max_ms == 0.4 and r.mean_ms == 0.25
    assert r.cache == {"HIT": 4, "MISS": 2}
    assert r.generator_procs == 2 and r.generator_cpu_cores == 0.75 and r.generator_cpu_max_pct == 50.0
    assert r.error_samples == ["HTTP 502"]


def test_merge_empty() -> None:
    r = merge("m", "t", 1, 1.0, [Shard([])])
    assert r.requests == 0 and math.isnan(r.p99_ms)


def _result(target: str, c: int, rps: float, p50: float = 1.0, p99: float = 2.0) -> LevelResult:
    return LevelResult("identity_fp32", target, c, 1.0, int(rps), 0, rps, p50, p50, p99, p99, p50, 1, 0.1, 10.0,
                       {"MISS": int(rps)}, [], {"gateway": 0.5})  # fmt: skip


RESULTS = [
    _result("triton-http", 1, 1000, 0.4, 0.8),
    _result("triton-http", 64, 10000),
    _result("gateway-miss", 1, 500, 0.6, 1.5),
    _result("gateway-miss", 64, 6000),
]


def test_ratios() -> None:
    q = {(x["target"], x["concurrency"]): x for x in report.ratios(RESULTS)}
    assert q[("gateway-miss", 64)]["throughput_ratio"] == 0.6
    assert q[("gateway-miss", 1)]["added_p50_ms"] == 0.2
    assert q[("gateway-miss", 1)]["added_p99_ms"] == 0.7
    assert ("triton-http", 1) not in q
    assert math.isnan(ratio(1.0, 0.0))


def test_report_writers(tmp_path: Path) -> None:
    report.write_json(tmp_path / "r.json", RESULTS, {"machine": {"logical_cpus": 2}})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["machine"]["logical_cpus"] == 2 and len(doc["results"]) == 4 and doc["ratios"]
    assert doc["results"][0]["cache"] == {"MISS": 1000}
    report.write_csv(tmp_path / "r.csv", RESULTS)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["target"] for r in rows] == ["triton-http", "triton-http", "gateway-miss", "gateway-miss"]
    assert rows[3]["throughput_rps"] == "6000" and rows[3]["server_cpu_cores"] == "gateway=0.50"
    checks = [{"name": "x", "measured": "0.60x", "goal": ">= 0.5x", "met": True}]
    report.write_markdown(tmp_path / "r.md", RESULTS, {"targets_check": checks})
    md = (tmp_path / "r.md").read_text()
    assert (
        "| gateway-miss | 64 | 6,000 |" in md and "| 0.60 |" in md and "| x | 0.60x | >= 0.5x | yes |" in md
    )


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert report.write_plot(tmp_path / "r.png", RESULTS)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model", [TINY, TIMESERIES])
def test_http_bodies_unique_and_well_formed(model) -> None:  # type: ignore[no-untyped-def]
    targets = make_targets(model, ("h", 1), ("h", 2), ("h", 3), salt=12345)
    by_name = {t.name: t for t in targets}
    miss = http_request_factory(by_name["gateway-miss"], conn_id=7)
    bodies = [miss(i).partition(b"\r\n\r\n")[2] for i in range(3)]
    assert len(set(bodies)) == 3
    head, _, body = miss(1).partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    doc = orjson.loads(body)
    import numpy as np

    arr = np.asarray(doc["inputs"][model.input], dtype=np.float32)
    assert arr.shape == (1, *model.row_shape) and arr.reshape(-1)[:3].tolist() == [12345.0, 7.0, 1.0]
    v2 = orjson.loads(http_request_factory(by_name["triton-http"], 7)(1).partition(b"\r\n\r\n")[2])
    tensor = v2["inputs"][0]
    assert tensor["shape"] == [1, *model.row_shape] and tensor["data"] == arr.reshape(-1).tolist()
    hit = http_request_factory(by_name["gateway-hit"], conn_id=7)
    assert hit(1) == hit(1 + 32) and hit(1) != hit(2)
    assert hit(1) == http_request_factory(by_name["gateway-hit"], conn_id=9)(1)  # shared across connections


def test_grpc_request_is_a_valid_model_infer_request() -> None:
    import numpy as np
    from tritonclient.grpc import service_pb2

    t = make_targets(TINY, ("h", 1), ("h", 2), ("h", 3), salt=99, names=("triton-grpc",))[0]
    req = service_pb2.ModelInferRequest.FromString(grpc_request_factory(t, 5)(42))
    assert req.model_name == "identity_fp32" and list(req.inputs[0].shape) == [1, 16]
    values = np.frombuffer(req.raw_input_contents[0], dtype=np.float32)
    assert values.shape == (16,) and values[:3].tolist() == [99.0, 5.0, 42.0]


def test_gateway_grpc_targets_send_what_triton_grpc_sends() -> None:
    """gateway-grpc-miss: the same ModelInfer bytes as triton-grpc, to the gateway's gRPC port;
    gateway-grpc-hit: a small pool of repeated requests, shared across connections."""
    names = ("triton-grpc", "gateway-grpc-miss", "gateway-grpc-hit")
    direct, miss, hit = make_targets(TINY, ("h", 1), ("h", 2), ("h", 3), 99, names, ("g", 4))
    assert (miss.host, miss.port, miss.kind) == ("g", 4, "grpc") and miss.unique and not hit.unique
    assert grpc_request_factory(miss, 5)(42) == grpc_request_factory(direct, 5)(42)
    repeated = grpc_request_factory(hit, 5)
    assert repeated(1) == repeated(33) == grpc_request_factory(hit, 9)(1) and repeated(1) != repeated(2)


def test_stream_rounds_pool_their_samples_and_the_goals_read_the_pooled_levels() -> None:
    from app.bench.streams import StreamLevel, checks, pooled

    def level(target: str, firsts: list[float], replay: bool = False) -> StreamLevel:
        return StreamLevel(target, replay, 1, streams=len(firsts), first_ms=firsts, gap_ms=[0.1])

    # round 1: the machine fast; round 2: slow (a drift falls on Triton direct and the gateway alike)
    triton = pooled(level("triton-sse", [3.0, 3.0, 3.0]), level("triton-sse", [5.0, 5.0, 5.0]))
    gateway = pooled(level("gateway-sse", [3.5, 3.5, 3.5]), level("gateway-sse", [5.5, 5.5, 5.5]))
    assert pooled(None, triton) is triton
    assert triton.streams == 6 and sorted(triton.first_ms) == [3.0] * 3 + [5.0] * 3
    assert gateway.gap_ms == [0.1, 0.1]
    [goal] = checks([triton, gateway])
    assert goal["met"] and goal["measured"] == "0.500 ms"
