"""The Compose file, the Kubernetes manifests and the alert rules: valid, and true to berth.

Valid: Compose against the compose-spec JSON schema (bundled by check-jsonschema),
Kubernetes objects against the API's JSON schemas (bundled by kubernetes-validate,
strict: an unknown field fails), KEDA's ScaledObject against the part of its CRD
schema we use. No cluster is needed. Kustomize overlays are rendered here by a small
renderer that knows only what the overlays use (resources, namespace, labels, images,
JSON 6902 patches, ``$patch: delete``): anything else fails the test instead of
going unchecked.

True to berth: every ``berth …`` command line they run parses with berth's own
parser, every ``BERTH_*`` variable is a settings field (and the values validate),
every image is the one deploy/Dockerfile builds or a known service image, every
metric an alert or the autoscaler reads is one berth exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import signal
import socket
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from shared.cli import build_parser
from shared.connections import connect_redis
from shared.metrics import Metrics, read_queue_depth, start_metrics_server
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "production", K8S / "overlays" / "host-docker"]
EXTRAS = sorted((K8S / "extras").glob("*.yaml"))
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
SERVICE_IMAGES = re.compile(r"^(redis|postgres):[\w.-]+$")
ENGINE_IMAGE = re.compile(r"^docker:[\w.-]*dind$")
BERTH_METRIC = re.compile(r"\bberth_[a-z_]+\b")

# What berth's manifests use of KEDA's ScaledObject CRD (keda.sh/v1alpha1), after
# config/crd/bases/keda.sh_scaledobjects.yaml in kedacore/keda (Apache-2.0).
KEDA_SCALED_OBJECT: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {"type": "string"},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"type": "object"},
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"type": "string"},
                                },
                            },
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "threshold"}


# --- loading ---------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def compose() -> dict[str, Any]:
    (document,) = load_yaml_documents(COMPOSE)
    return document


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment: the default."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def render(directory: Path) -> list[dict[str, Any]]:
    """A kustomization's objects, for the subset of kustomize berth's overlays use."""
    (k,) = load_yaml_documents(directory / "kustomization.yaml")
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
    unsupported = set(k) - known
    assert not unsupported, f"{directory}: the test renderer does not know {unsupported}"
    objects: list[dict[str, Any]] = []
    for resource in k["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}: resource {resource} does not exist"
        objects += render(path) if path.is_dir() else load_yaml_documents(path)
    for patch in k.get("patches", []):
        objects = apply_patch(directory, objects, patch)
    for image in k.get("images", []):
        for container in containers(objects):
            name = container["image"].split(":", 1)[0]
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for obj in objects:
        if "namespace" in k and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = k["namespace"]
        for label in k.get("labels", []):
            assert label.get("includeSelectors") is False
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    return objects


def apply_patch(
    directory: Path, objects: list[dict[str, Any]], patch: dict[str, Any]
) -> list[dict[str, Any]]:
    if "path" in patch:
        (delete,) = load_yaml_documents(directory / patch["path"])
        assert delete.get("$patch") == "delete", "only `$patch: delete` files are supported"
        kept = [o for o in objects if not same_object(o, delete)]
        assert len(kept) == len(objects) - 1, f"{patch['path']} matches no object"
        return kept
    target = patch["target"]
    matches = [o for o in objects if same_object(o, target)]
    assert len(matches) == 1, f"patch target {target} matches {len(matches)} objects"
    operations = yaml.safe_load(patch["patch"])
    patched = jsonpatch.apply_patch(matches[0], operations)  # raises if a `test` op fails
    return [patched if o is matches[0] else o for o in objects]


def same_object(obj: dict[str, Any], ref: dict[str, Any]) -> bool:
    name = ref.get("name") or ref["metadata"]["name"]
    return bool(obj["kind"] == ref["kind"] and obj["metadata"]["name"] == name)


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in objects:
        template = obj.get("spec", {}).get("template")
        if template is not None:
            yield obj, template["spec"]


def containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for _, spec in pod_specs(objects):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def is_berth_image(image: str) -> bool:
    """The image deploy/Dockerfile builds: repository `berth`, any registry and tag."""
    return image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "berth"


def by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def all_rendered() -> list[tuple[str, dict[str, Any]]]:
    rendered = [(k.relative_to(K8S).as_posix(), o) for k in KUSTOMIZATIONS for o in render(k)]
    extras = [(p.relative_to(K8S).as_posix(), o) for p in EXTRAS for o in load_yaml_documents(p)]
    return rendered + extras


def berth_command_lines() -> list[tuple[str, list[str]]]:
    """Every `berth …` argv the Compose file and the manifests run, with where it is."""
    lines: list[tuple[str, list[str]]] = []
    for name, service in compose()["services"].items():
        if is_berth_image(interpolate(service["image"])):
            lines.append((f"compose {name}", ["berth", *service["command"]]))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "berth"]:
            lines.append((f"compose {name} healthcheck", test[1:]))
    for where, obj in all_rendered():
        for _, spec in pod_specs([obj]):
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                label = f"{where} {obj['metadata']['name']}/{c['name']}"
                if is_berth_image(c["image"]):
                    lines.append((label, [*c.get("command", ["berth"]), *c.get("args", [])]))
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    command = c.get(probe, {}).get("exec", {}).get("command", [])
                    if command[:1] == ["berth"]:
                        lines.append((f"{label} {probe}", command))
    return lines


def exported_metric_names() -> set[str]:
    """Every series name a worker or the scheduler can export."""
    names: set[str] = set()
    for role in ("worker", "scheduler"):
        for family in Metrics(role).registry.collect():
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "info": ["_info"],
            }.get(family.type, [""])
            names.update(family.name + s for s in suffixes)
    return names


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def keda_desired_replicas(
    depth: float, *, threshold: float, activation: float, min_replicas: int, max_replicas: int
) -> int:
    """KEDA's decision for one AverageValue trigger.

    At or under the activation threshold the target is inactive: KEDA scales it to
    minReplicaCount. Otherwise the HPA it manages wants ceil(value / threshold),
    clamped to [max(min, 1), max].
    """
    if depth <= activation:
        return min_replicas
    return max(max(min_replicas, 1), min(max_replicas, math.ceil(depth / threshold)))


# --- Compose -----------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    """deploy/compose.yaml validates against the compose-spec JSON schema."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    jsonschema.validate(compose(), schema, cls=jsonschema.Draft202012Validator)


def test_compose_builds_berth_from_the_dockerfile_and_names_only_known_images() -> None:
    """berth services use the image deploy/Dockerfile builds; the others are Redis, Postgres."""
    for name, service in compose()["services"].items():
        image = interpolate(service["image"])
        if is_berth_image(image):
            build = service["build"]
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
                DEPLOY / "Dockerfile"
            )
            assert interpolate(build["args"]["BASE_IMAGE"]) == "python:3.11-slim"
        else:
            assert SERVICE_IMAGES.match(image), f"{name}: unexpected image {image}"


def test_compose_start_order_one_shots_and_scaling() -> None:
    """migrate, then warm, then workers; one-shots never restart; workers can be scaled."""
    services = compose()["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["warm"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["worker"]["depends_on"]["warm"]["condition"] == (
        "service_completed_successfully"
    )
    for one_shot in ("migrate", "warm"):
        assert services[one_shot]["restart"] == "no"
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed name forbids --scale worker=N"
    assert "ports" not in worker, "a published port forbids --scale worker=N"
    assert services["scheduler"]["deploy"]["replicas"] == 1
    for name in ("redis", "postgres", "worker", "scheduler"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    volumes = compose()["volumes"]
    assert any(v.split(":")[0] in volumes for v in services["postgres"]["volumes"])
    assert any(v.split(":")[0] in volumes for v in services["redis"]["volumes"])


def test_compose_redis_is_append_only_and_never_evicts() -> None:
    """Redis runs with appendonly yes and noeviction: the queue is data, not a cache."""
    command = compose()["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"


def test_compose_settings_are_settings_fields_and_validate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every BERTH_* variable Compose sets is a Settings field, and the values validate."""
    fields = set(Settings.model_fields)
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if key.startswith("BERTH_"):
                assert key.removeprefix("BERTH_").lower() in fields, f"{name}: {key}"
                monkeypatch.setenv(key, interpolate(str(value)))
        Settings()
        for key in environment:
            monkeypatch.delenv(key, raising=False)


async def test_compose_redis_keeps_a_queued_job_across_a_restart(tmp_path: Path) -> None:
    """With Compose's Redis options (RDB off: the AOF alone), a queued job survives a restart."""
    redis_server = shutil.which("redis-server")
    assert redis_server is not None, "deploy/bootstrap.sh installs redis-server"
    command = compose()["services"]["redis"]["command"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    argv = [redis_server, *command[1:], "--save", "", *local, "--daemonize", "no"]
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", queue_name="berth:queue")

    async def started() -> ArqRedis:
        for _ in range(100):
            with contextlib.suppress(Exception):
                return await connect_redis(settings)
            await asyncio.sleep(0.05)
        raise AssertionError("redis-server did not start")

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)

    server = await start()
    try:
        redis = await started()
        await redis.enqueue_job("run_job", {"script": "print(1)"}, _job_id="survivor")
        await redis.aclose()
        server.send_signal(signal.SIGTERM)  # what `docker compose restart redis` sends
        assert await asyncio.wait_for(server.wait(), 30) == 0
        server = await start()
        redis = await started()
        try:
            assert await read_queue_depth(redis, "berth:queue") == 1
            assert await redis.exists("arq:job:survivor") == 1
        finally:
            await redis.aclose()
    finally:
        if server.returncode is None:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)


# --- Kubernetes ----------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_objects_are_valid_against_the_kubernetes_schemas(version: str) -> None:
    """Base, overlays and extras validate (strictly) against the Kubernetes API schemas."""
    checked = 0
    for where, obj in all_rendered():
        if obj["kind"] == "ScaledObject":
            continue  # a KEDA CRD: next test
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where} {obj['kind']}/{obj['metadata']['name']}: {e.message}")
        checked += 1
    assert checked >= 20


def test_keda_scaled_objects_are_valid_and_scale_the_worker_deployment() -> None:
    """Each ScaledObject fits KEDA's schema, targets berth-worker and has a Prometheus query."""
    for kustomization in KUSTOMIZATIONS:
        objects = render(kustomization)
        (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
        jsonschema.validate(scaled, KEDA_SCALED_OBJECT, cls=jsonschema.Draft202012Validator)
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert by_kind(objects, "Deployment", target)["metadata"]["name"] == "berth-worker"
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert set(trigger["metadata"]) >= PROMETHEUS_TRIGGER_KEYS


def test_keda_query_reads_the_exported_gauge_at_one_worker_per_concurrency() -> None:
    """The trigger queries berth_queue_depth, with a threshold of BERTH_WORKER_CONCURRENCY."""
    objects = render(K8S / "base")
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    assert BERTH_METRIC.findall(metadata["query"]) == ["berth_queue_depth"]
    assert "berth_queue_depth" in exported_metric_names()
    config = by_kind(objects, "ConfigMap", "berth-config")["data"]
    assert float(metadata["threshold"]) == float(config["BERTH_WORKER_CONCURRENCY"])


async def test_keda_desired_replicas_follow_arqs_queue(redis: ArqRedis, settings: Settings) -> None:
    """Jobs enqueued with arq move the scraped gauge, and KEDA's rule turns it into workers."""
    (scaled,) = [o for o in render(K8S / "base") if o["kind"] == "ScaledObject"]
    spec, metadata = scaled["spec"], scaled["spec"]["triggers"][0]["metadata"]
    metrics = Metrics("scheduler")
    server = start_metrics_server(0, metrics, addr="127.0.0.1")
    decisions: dict[int, int] = {}
    try:
        enqueued = 0
        for total in (0, 1, 4, 9, 100):
            for _ in range(total - enqueued):
                await redis.enqueue_job("run_job", {}, _queue_name=settings.queue_name)
            enqueued = total
            metrics.set_queue_depth(await read_queue_depth(redis, settings.queue_name))
            text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/metrics")
            (depth,) = [
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "berth_queue_depth"
            ]
            decisions[total] = keda_desired_replicas(
                depth,
                threshold=float(metadata["threshold"]),
                activation=float(metadata["activationThreshold"]),
                min_replicas=spec["minReplicaCount"],
                max_replicas=spec["maxReplicaCount"],
            )
    finally:
        server.stop()
    assert decisions == {0: 1, 1: 1, 4: 1, 9: 3, 100: 10}


def test_k8s_and_compose_run_only_berth_commands_that_exist() -> None:
    """Every `berth …` line (containers, init containers, probes) parses with berth's CLI."""
    parser = build_parser()
    lines = berth_command_lines()
    assert {argv[1] for _, argv in lines} >= {"migrate", "warm", "worker", "scheduler", "health"}
    for where, argv in lines:
        assert argv[0] == "berth", f"{where}: {argv}"
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` is not a valid berth command")


def test_k8s_settings_are_settings_fields_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    """ConfigMap and Secret keys are Settings fields, and together they validate."""
    fields = set(Settings.model_fields)
    for kustomization in KUSTOMIZATIONS:
        objects = render(kustomization)
        data: dict[str, str] = {}
        for obj in objects:
            if obj["kind"] in ("ConfigMap", "Secret"):
                data |= obj.get("data", {}) | obj.get("stringData", {})
        for c in containers(objects):
            data |= {e["name"]: e.get("value", "") for e in c.get("env", [])}
        for key, value in data.items():
            if key.startswith("BERTH_"):
                assert key.removeprefix("BERTH_").lower() in fields, f"{kustomization}: {key}"
                monkeypatch.setenv(key, value)
        try:
            Settings()
        except ValidationError as e:
            pytest.fail(f"{kustomization}: {e}")
        for key in data:
            monkeypatch.delenv(key, raising=False)


def test_k8s_images_are_the_berth_image_or_the_engine() -> None:
    """Pods run the image deploy/Dockerfile builds, or docker:dind for the node engine."""
    for where, obj in all_rendered():
        for c in containers([obj]):
            assert is_berth_image(c["image"]) or ENGINE_IMAGE.match(c["image"]), (
                f"{where} {obj['metadata']['name']}: {c['image']}"
            )
    production = render(K8S / "overlays" / "production")
    assert {c["image"] for c in containers(production) if is_berth_image(c["image"])} == {
        "registry.example.com/platform/berth:0.1.0"
    }


def test_k8s_workloads_have_probes_resources_and_the_right_shape() -> None:
    """Workers warm first; one scheduler; probes on every berth service; limits everywhere."""
    for kustomization in KUSTOMIZATIONS:
        objects = render(kustomization)
        worker = by_kind(objects, "Deployment", "berth-worker")["spec"]["template"]["spec"]
        init_args = [c.get("args", []) for c in worker["initContainers"]]
        assert ["warm"] in init_args
        scheduler = by_kind(objects, "Deployment", "berth-scheduler")
        assert scheduler["spec"]["replicas"] == 1
        assert scheduler["spec"]["strategy"]["type"] == "Recreate"
        assert by_kind(objects, "Job", "berth-migrate")["spec"]["template"]["spec"]["containers"][
            0
        ]["args"] == ["migrate"]
        for obj, spec in pod_specs(objects):
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][bound]), (
                        f"{obj['metadata']['name']}/{c['name']}: {bound}"
                    )
            if obj["kind"] == "Deployment":
                (main,) = spec["containers"]
                assert main["readinessProbe"]["exec"]["command"][:2] == ["berth", "health"]
                assert main["livenessProbe"]["exec"]["command"] == [
                    "berth",
                    "health",
                    "--only",
                    "heartbeat",
                ]
                assert spec["securityContext"]["runAsNonRoot"] is True


def test_metrics_port_agrees_across_config_annotations_and_ports() -> None:
    """BERTH_METRICS_PORT, the scrape annotations and the container ports say the same port."""
    objects = render(K8S / "base")
    port = by_kind(objects, "ConfigMap", "berth-config")["data"]["BERTH_METRICS_PORT"]
    for name in ("berth-worker", "berth-scheduler"):
        template = by_kind(objects, "Deployment", name)["spec"]["template"]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == port
        (container,) = template["spec"]["containers"]
        assert container["ports"][0]["containerPort"] == int(port)
    assert "EXPOSE 9100" in (DEPLOY / "Dockerfile").read_text()
    assert port == "9100"


def test_every_namespaced_object_lands_in_the_berth_namespace() -> None:
    """Base and overlays put every object (overlay additions too) in namespace berth."""
    for kustomization in KUSTOMIZATIONS:
        for obj in render(kustomization):
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == "berth", (kustomization, obj["kind"])


def test_k8s_manifests_use_no_yaml_anchors() -> None:
    """No anchors or aliases: older kustomize versions mangle them."""
    for path in K8S.rglob("*.yaml"):
        events = yaml.parse(path.read_text())
        assert not any(getattr(e, "anchor", None) for e in events), f"{path} uses an anchor"


# --- alert rules, docs, image inputs ------------------------------------------------


def test_alert_rules_read_exported_metrics_and_are_documented() -> None:
    """Each alert is well formed, reads only metrics berth exports, and has a docs section."""
    (rules_file,) = load_yaml_documents(ALERTS)
    exported = exported_metric_names()
    docs = OPERATIONS.read_text()
    alerts = [rule for group in rules_file["groups"] for rule in group["rules"]]
    assert len(alerts) >= 8
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{rule['alert'].lower()}"
        unknown = set(BERTH_METRIC.findall(rule["expr"])) - exported
        assert not unknown, f"{rule['alert']} reads {unknown}"
        assert f"### {rule['alert']}\n" in docs, f"{rule['alert']} is not in operations.md"


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    """Every COPY source of the build stage is re-included by the .dockerignore allow-list."""
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources: set[str] = set()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources.update(re.sub(r"\[(\w)\]$", r"\1", w) for w in words[1:-1])
    assert sources
    assert sources <= allowed, f"copied but ignored: {sources - allowed}"


def test_an_unknown_kustomize_feature_fails_the_renderer(tmp_path: Path) -> None:
    """The renderer refuses kustomize features it lacks, so nothing goes unchecked."""
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: []\n")
    with pytest.raises(AssertionError, match="replicas"):
        render(tmp_path)
