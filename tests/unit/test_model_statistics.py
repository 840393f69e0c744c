"""Pure logic of the statistics answer (app.services.statistics) and of Triton's JSON (proto_json); the real
comparisons against Triton are in tests/integration/test_model_answers.py."""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import model_config_pb2

from app.clients.triton import UNKNOWN_TO_2_51, proto_json
from app.services.statistics import ServedStatistics, merge_model_stats


def _entry(count: int, last: int, endpoint: str, batch: int = 1) -> dict[str, Any]:
    part = {"count": count, "ns": count * 10}
    return {
        "name": "m", "version": "1", "last_inference": last, "inference_count": count, "execution_count": count,
        "inference_stats": {k: dict(part) for k in ("success", "fail", "queue", "compute_input",
                                                     "compute_infer", "compute_output", "cache_hit", "cache_miss")},
        "batch_stats": [{"batch_size": batch, **{k: dict(part) for k in ("compute_input", "compute_infer",
                                                                          "compute_output")}}],
        "memory_usage": [], "endpoint": endpoint,
    }  # fmt: skip


def test_one_entry_per_model_version_summed_over_the_endpoints() -> None:
    merged = merge_model_stats([_entry(2, 100, "a"), _entry(3, 50, "b"), _entry(1, 7, "a", batch=4)])
    assert len(merged) == 1
    m = merged[0]
    assert "endpoint" not in m and m["last_inference"] == 100
    assert m["inference_count"] == m["execution_count"] == 6
    assert m["inference_stats"]["queue"] == {"count": 6, "ns": 60}
    assert [b["batch_size"] for b in m["batch_stats"]] == [1, 4]
    assert m["batch_stats"][0]["compute_infer"] == {"count": 5, "ns": 50}


async def test_the_gateways_answers_count_as_cache_hits() -> None:
    class Admin:
        async def model_statistics(self, model: str = "", version: str = "") -> dict[str, Any]:
            return {"model_stats": [_entry(2, 100, "a")]}

    class Redis:
        def __init__(self) -> None:
            self.hash: dict[str, int] = {}

        def register_script(self, script: str) -> Any:
            async def run(keys: list[str], args: list[Any]) -> int:
                for i in range(0, len(args), 4):
                    field, count, ns, last = args[i : i + 4]
                    self.hash[f"{field}|count"] = self.hash.get(f"{field}|count", 0) + count
                    self.hash[f"{field}|ns"] = self.hash.get(f"{field}|ns", 0) + ns
                    self.hash[f"{field}|last"] = max(self.hash.get(f"{field}|last", 0), last)
                return len(args) // 4

            return run

        async def hgetall(self, key: str) -> dict[bytes, bytes]:
            return {k.encode(): str(v).encode() for k, v in self.hash.items()}

    served = ServedStatistics(Admin(), Redis(), "ns")  # type: ignore[arg-type]
    for _ in range(3):
        served.hit("m", "1", 5)
    served.hit("other", "1", 5)
    before = (await served.answer("m"))["model_stats"][0]
    assert before["inference_stats"]["success"]["count"] == 2  # not flushed yet: not counted anywhere
    await served.flush()
    m = (await served.answer("m"))["model_stats"][0]
    assert m["inference_stats"]["success"] == {"count": 5, "ns": 35}
    assert m["inference_stats"]["queue"] == {"count": 5, "ns": 20}
    assert m["inference_stats"]["cache_hit"] == {"count": 5, "ns": 35}
    assert m["inference_count"] == m["execution_count"] == 2  # as Triton counts its own cache hits
    assert m["last_inference"] > 100


def test_config_json_has_every_field_numbers_and_sorted_maps() -> None:
    config = model_config_pb2.ModelConfig(name="e", platform="ensemble")
    step = config.ensemble_scheduling.step.add(model_name="a", model_version=-1)
    for k in ("z", "b", "m"):
        step.input_map[k] = k
    out = proto_json(config, UNKNOWN_TO_2_51)
    assert out["max_batch_size"] == 0 and out["backend"] == "" and out["input"] == []
    assert list(out["ensemble_scheduling"]["step"][0]["input_map"]) == ["b", "m", "z"]
    assert out["ensemble_scheduling"]["step"][0]["model_version"] == -1
    assert "max_inflight_requests" not in out["ensemble_scheduling"]  # Triton 2.51 does not know it
    assert proto_json(config)["ensemble_scheduling"]["max_inflight_requests"] == 0
