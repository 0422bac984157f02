"""deploy/k8s: every manifest validates against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail) and the ScaledObject against KEDA's vendored CRD schema; the
manifests agree with the code (settings names, health routes, stream and group names,
grace periods longer than the drain timeouts)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.app import create_app
from shared.keys import LANES, WORKER_GROUP, Keys
from shared.settings import DEFAULT_MODEL, Settings
from worker.http_server import HEALTH_PATHS

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KEDA_CRD = K8S / "schemas" / "keda.sh_scaledobjects.yaml"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest still commonly run, newest known to the tool
SETTING_NAMES = {f"TOKENFLEET_{name.upper()}" for name in Settings.model_fields}
# Metadata the redis-streams scaler reads (KEDA 2.20 pkg/scalers/redis_streams_scaler.go and
# the shared Redis connection fields); a misspelt key would be ignored silently by KEDA.
REDIS_STREAMS_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "passwordFromEnv", "usernameFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "databaseIndex", "enableTLS",
    "unsafeSsl",
}


def load_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


DOCS = load_documents()


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]["containers"][0]


def config_env() -> dict[str, str]:
    return dict(find("ConfigMap", "tokenfleet-config")["data"])


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields refused (the API server prunes them;
    we would rather fail), except where the schema preserves them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def keda_schema(version: str) -> dict[str, Any]:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    found = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return strict(copy.deepcopy(found["schema"]["openAPIV3Schema"]))


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_resources_validate(version: str) -> None:
    builtin = [d for d in DOCS if d["apiVersion"] != "keda.sh/v1alpha1"]
    assert {d["kind"] for d in builtin} >= {
        "StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for doc in builtin:
        kubernetes_validate.validate(doc, version, strict=True)


def test_builtin_validation_catches_a_typo() -> None:
    gateway = copy.deepcopy(find("Deployment", "gateway"))
    gateway["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSIONS[-1], strict=True)


def test_scaled_object_validates_against_keda_crd() -> None:
    scaled = find("ScaledObject", "worker")
    schema = keda_schema(scaled["apiVersion"].split("/")[1])
    jsonschema.validate(scaled, schema)
    broken = copy.deepcopy(scaled)
    broken["spec"]["minReplicas"] = 0  # HPA spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_scaled_object_scales_workers_from_zero_on_every_lane() -> None:
    scaled = find("ScaledObject", "worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == find("Deployment", "worker")["metadata"]["name"]
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    keys = Keys(Settings().key_prefix)
    by_stream: dict[str, set[str]] = {}
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert set(meta) <= REDIS_STREAMS_KEYS, set(meta) - REDIS_STREAMS_KEYS
        assert meta["consumerGroup"] == WORKER_GROUP
        assert meta["activationLagCount"] == "0"
        assert all(isinstance(v, str) for v in meta.values())  # metadata is map[string]string
        kind = "lag" if "lagCount" in meta else "pending"
        assert int(meta.get("lagCount") or meta["pendingEntriesCount"]) > 0
        by_stream.setdefault(meta["stream"], set()).add(kind)
        env_name = meta["addressFromEnv"]
        worker_env = {e["name"]: e.get("value") for e in container(
            find("Deployment", "worker"))["env"]}
        assert worker_env[env_name].split(":")[0] == find("Service", "redis")["metadata"]["name"]
    expected = {keys.requests_stream(DEFAULT_MODEL, lane) for lane in LANES}
    assert set(by_stream) == expected
    assert all(kinds == {"lag", "pending"} for kinds in by_stream.values())


def test_every_tokenfleet_variable_is_a_setting() -> None:
    names = set(config_env())
    names |= set(find("Secret", "tokenfleet-api-keys")["stringData"])
    for doc in DOCS:
        if doc["kind"] == "Deployment":
            names |= {e["name"] for e in container(doc).get("env", [])}
    tokenfleet = {n for n in names if n.startswith("TOKENFLEET_")}
    assert tokenfleet, "no TOKENFLEET_* variable found"
    assert tokenfleet <= SETTING_NAMES, tokenfleet - SETTING_NAMES


def test_grace_periods_outlast_the_drains() -> None:
    env = config_env()
    settings = Settings(**{k.removeprefix("TOKENFLEET_").lower(): v for k, v in env.items()
                           if k.startswith("TOKENFLEET_")})
    gateway = find("Deployment", "gateway")["spec"]["template"]["spec"]
    worker = find("Deployment", "worker")["spec"]["template"]["spec"]
    gateway_drain = settings.gateway_shutdown_delay_s + settings.gateway_drain_timeout_s
    assert gateway["terminationGracePeriodSeconds"] > gateway_drain
    assert worker["terminationGracePeriodSeconds"] > settings.drain_timeout_s


def test_gateway_probes_use_its_health_routes() -> None:
    paths = set(create_app(Settings()).openapi()["paths"])
    gateway = container(find("Deployment", "gateway"))
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz"} <= paths


def test_worker_probes_use_the_metrics_port_routes() -> None:
    worker = container(find("Deployment", "worker"))
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert int(env["TOKENFLEET_METRICS_PORT"]) == ports["metrics"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert worker[probe]["httpGet"]["path"] in HEALTH_PATHS
        assert worker[probe]["httpGet"]["port"] == "metrics"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_prometheus_annotations_point_at_a_container_port() -> None:
    for name in ("gateway", "worker"):
        doc = find("Deployment", name)
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        ports = {p["containerPort"] for p in container(doc)["ports"]}
        assert int(annotations["prometheus.io/port"]) in ports


def test_redis_persists_with_aof_on_a_volume_claim() -> None:
    redis = find("StatefulSet", "redis")
    spec = redis["spec"]
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container(redis)["volumeMounts"]}
    assert mounts[claim] == args[args.index("--dir") + 1]
    assert container(redis)["image"].split(":")[1] >= "7"  # XINFO GROUPS lag
    assert config_env()["TOKENFLEET_REDIS_URL"].startswith(
        f"redis://{find('Service', 'redis')['metadata']['name']}:6379")


def test_services_select_their_pods() -> None:
    for name, port in (("gateway", "http"), ("redis", "redis")):
        service = find("Service", name)
        workload = next(d for d in DOCS if d["kind"] in ("Deployment", "StatefulSet")
                        and d["metadata"]["name"] == name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == port
        assert port in {p["name"] for p in container(workload)["ports"]}
    hpa = find("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
