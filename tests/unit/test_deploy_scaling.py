"""Many Tritons on Kubernetes: the gateway resolves a headless Service selecting the Triton pods, a PDB
keeps voluntary disruptions to one Triton at a time, and the ConfigMap's TGW_TRITON_URLS is accepted by
Settings and names that Service's ports. (Read from the base manifests; test_deploy_files.py renders
the overlays.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.clients.endpoints import parse_triton_urls
from app.settings import Settings

BASE = Path(__file__).resolve().parents[2] / "k8s" / "base"


def _objects(name: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all((BASE / name).read_text()) if o]


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_headless_service_and_pdb_for_triton() -> None:
    objs = _objects("triton.yaml")
    pods = _one(objs, "Deployment", "triton")
    labels = pods["spec"]["template"]["metadata"]["labels"]
    assert pods["spec"]["replicas"] >= 2
    headless = _one(objs, "Service", "triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)  # only ready pods resolve
    assert headless["spec"]["selector"].items() <= labels.items()
    named = {p["name"] for p in pods["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in headless["spec"]["ports"]} <= named
    pdb = _one(objs, "PodDisruptionBudget", "triton")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_configmap_routes_over_the_headless_service() -> None:
    data = _one(_objects("configmap.yaml"), "ConfigMap", "tgw-config")["data"]
    settings = Settings(triton_urls=data["TGW_TRITON_URLS"])
    (target,) = parse_triton_urls(str(settings.triton.triton_urls))
    headless = _one(_objects("triton.yaml"), "Service", "triton-headless")
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    assert target.dns_host == headless["metadata"]["name"]
    assert (target.grpc_port, target.http_port) == (ports["grpc"], ports["http"])
