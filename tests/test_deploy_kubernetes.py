"""deploy/helm/smg, deploy/kubernetes and deploy/docker: the chart renders, lints and
validates against the Kubernetes API schemas; its objects reference each other
consistently; smg's own validator accepts the config and command line it renders; and a
real `smg launch` started from that rendering answers the kubelet's probes and a chat.

Rendered offline by Helm's Go SDK (helm-python-sdk: no cluster, no helm binary);
validated by kubernetes-validate (strict: unknown fields fail).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml
from gatewayutil import Gateway, free_port, secret, wait_until

import smg
from smg.config import (
    _FIELDS,
    DEFAULTS,
    ConfigError,
    discovery_provider,
    is_secret_key,
    load_config,
    remove_unhealthy,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (test extra) renders the chart")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (test extra) holds the API schemas"
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "smg"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
RENDERER = REPO / "tools" / "render_kubernetes.py"


def _renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_kubernetes", RENDERER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = _renderer()
NAMESPACE = RENDER.NAMESPACE
API_KEY = secret("sk-chart-e2e-key-0123456789abcdef")

# Values variants: the defaults, and the optional parts switched the other way.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "monitored_keyed_locked": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "secretEnv": {"SMG_API_KEY": API_KEY},
        "networkPolicy": {
            "apiFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
            "egress": {
                "allowAll": False,
                "rules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
            },
        },
        "config": {"worker_urls": ["http://sglang-0.sglang:30000"], "log_json": True},
    },
    "existing_secret_hpa": {
        "existingSecret": "smg-keys",
        "autoscaling": {"enabled": True},
        "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
        "config": {"shutdown_grace_period_secs": 30},
        "preStopSleepSeconds": 0,
    },
    # Pod discovery in the release's namespace (the Role stays there).
    "discovery": {
        "discovery": {
            "enabled": True,
            "selector": {"app": "sglang", "app.kubernetes.io/part-of": "llm"},
            "port": 30000,
            "modelIdFrom": "label:model",
        },
    },
    # Prefill-decode pods in another namespace: the Role and its binding go there.
    "discovery_pd_elsewhere": {
        "discovery": {
            "enabled": True,
            "namespace": "engines",
            "prefillSelector": {"app": "llm", "role": "prefill"},
            "decodeSelector": {"app": "llm", "role": "decode"},
        },
    },
    # Every namespace: a ClusterRole and ClusterRoleBinding, no namespace in the config.
    "discovery_cluster_wide": {
        "discovery": {"enabled": True, "clusterWide": True, "selector": {"app": "vllm"}},
        "rbac": {"create": False},  # discovery makes them anyway (as the Rust SMG's chart)
    },
}
BUILT_IN = {"v1", "apps/v1", "policy/v1", "rbac.authorization.k8s.io/v1"} | {
    "networking.k8s.io/v1",
    "autoscaling/v2",
}


def render(values: dict[str, Any], name: str = RENDER.RELEASE) -> dict[str, list[dict[str, Any]]]:
    """{kind: [object, ...]} of the chart rendered with `values`."""
    chart = helm.Chart.load(str(CHART))
    try:
        rendered = chart.render(values, name=name, namespace=NAMESPACE)
    finally:
        chart.close()
    objects: dict[str, list[dict[str, Any]]] = {}
    for _path, text in RENDER.split_documents(rendered):
        obj = yaml.safe_load(text)
        objects.setdefault(obj["kind"], []).append(obj)
    return objects


def one(objects: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (obj,) = objects[kind]
    return obj


def container(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def kube_versions() -> tuple[str, str]:
    """(the chart's kubeVersion floor, the newest Kubernetes kubernetes-validate ships)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    floor = re.match(r">=\s*(\d+\.\d+\.\d+)", chart["kubeVersion"])
    assert floor, chart["kubeVersion"]
    return floor.group(1), kubernetes_validate.latest_version()


def subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return all(big.get(k) == v for k, v in small.items())


# --- the chart as Helm sees it --------------------------------------------------------------


def test_chart_app_version_is_smgs_version() -> None:
    """The default image tag (appVersion) names the smg release the image holds."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == smg.__version__
    image = container(render({}))["image"]
    assert image == f"{chart_values()['image']['repository']}:{smg.__version__}"


def test_chart_lints_clean_at_its_oldest_and_newest_kubernetes() -> None:
    for version in kube_versions():
        report = helm.lint(str(CHART), strict=True, namespace=NAMESPACE, kube_version=version)
        assert report["errors"] == [], report
        # Severity 2 = warning, 3 = error; the only info is "icon is recommended".
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_built_in_manifest_validates_strictly(variant: str) -> None:
    objects = render(VARIANTS[variant])
    expected = {
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    }
    expected |= {
        "default": set(),
        "monitored_keyed_locked": {"Secret", "ServiceMonitor"},
        "existing_secret_hpa": {"HorizontalPodAutoscaler"},
        "discovery": set(),
        "discovery_pd_elsewhere": set(),
        "discovery_cluster_wide": {"ClusterRole", "ClusterRoleBinding"},
    }[variant]
    if variant == "discovery_cluster_wide":
        expected -= {"Role", "RoleBinding"}
    assert set(objects) == expected
    checked = 0
    for kind, items in objects.items():
        for obj in items:
            if kind.startswith("Cluster"):
                assert "namespace" not in obj["metadata"], kind
            elif kind in ("Role", "RoleBinding") and variant == "discovery_pd_elsewhere":
                assert obj["metadata"]["namespace"] == "engines", kind
            else:
                assert obj["metadata"]["namespace"] == NAMESPACE, kind
            if obj["apiVersion"] not in BUILT_IN:
                assert kind == "ServiceMonitor"  # a CRD: checked structurally below
                continue
            for version in kube_versions():
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{kind} at {version}: {str(exc).splitlines()[0]}")
            checked += 1
    assert checked == sum(len(v) for v in objects.values()) - (variant == "monitored_keyed_locked")


def test_service_monitor_scrapes_the_services_metrics_port() -> None:
    assert "ServiceMonitor" not in render({})  # off by default: the CRD may be absent
    objects = render(VARIANTS["monitored_keyed_locked"])
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert service_ports["metrics"]["targetPort"] == "metrics"
    assert subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    metrics_port = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}["metrics"]
    assert metrics_port == chart_values()["config"]["prometheus_port"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_selectors_and_references_match(variant: str) -> None:
    objects = render(VARIANTS[variant])
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert subset(one(objects, "Service")["spec"]["selector"], pod_labels)
    assert subset(
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels
    )
    assert subset(one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert pod_labels["app.kubernetes.io/name"] == "smg"
    assert pod_labels["app.kubernetes.io/instance"] == RENDER.RELEASE
    # RBAC: list+watch pods (the namespace discovery watches, else every namespace), bound
    # to the pod's account.
    kind = "ClusterRole" if variant == "discovery_cluster_wide" else "Role"
    role, binding = one(objects, kind), one(objects, kind + "Binding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["spec"]["serviceAccountName"] == account
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": kind,
        "name": role["metadata"]["name"],
    }
    # The token is mounted exactly when something in the pod reads the API.
    token = variant.startswith("discovery")
    assert pod["spec"]["automountServiceAccountToken"] is token
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is token
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    if "HorizontalPodAutoscaler" in objects:
        target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert target == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    else:
        assert deployment["spec"]["replicas"] == chart_values()["replicaCount"]


def test_probes_and_ports_name_the_containers_ports() -> None:
    objects = render({})
    c = container(objects)
    config = chart_values()["config"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "http": config["port"],
        "metrics": config["prometheus_port"],
        "probes": config["health_check_port"],
    }
    assert c["startupProbe"]["httpGet"] == {"path": "/liveness", "port": "probes"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "probes"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "probes"}
    service = one(objects, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (config["port"], "http"),
        "metrics": (config["prometheus_port"], "metrics"),
    }
    policy = one(objects, "NetworkPolicy")["spec"]
    assert [rule["ports"][0]["port"] for rule in policy["ingress"]] == ["http", "metrics"]
    assert "from" not in policy["ingress"][0]  # the API: from anywhere by default
    assert policy["ingress"][1]["from"] == chart_values()["networkPolicy"]["metricsFrom"]
    assert policy["egress"] == [{}]  # engines may be anywhere


def test_locked_down_egress_keeps_dns_and_adds_the_rules() -> None:
    policy = one(render(VARIANTS["monitored_keyed_locked"]), "NetworkPolicy")["spec"]
    dns, engines = policy["egress"]
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert engines == {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    assert policy["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "apps"}}}
    ]


def test_termination_grace_covers_the_drain() -> None:
    """preStop sleep + shutdown grace + margin; the supervisor itself waits up to grace +
    5 s for the data plane, then 5 s more, after a 1 s listener hold."""
    values = chart_values()
    margin = values["terminationGracePeriodMarginSeconds"]
    cases = [
        ({}, values["preStopSleepSeconds"], DEFAULTS["shutdown_grace_period_secs"]),
        (VARIANTS["existing_secret_hpa"], 0, 30),
    ]
    for variant, pre_stop, grace in cases:
        deployment = one(render(variant), "Deployment")
        period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period == pre_stop + grace + margin
        assert period > pre_stop + grace + 5 + 5 + 1
        hook = container({"Deployment": [deployment]}).get("lifecycle")
        if pre_stop:
            assert hook == {"preStop": {"exec": {"command": ["sleep", str(pre_stop)]}}}
        else:
            assert hook is None
    assert (
        one(render({}), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 200
    )


def test_processes_come_from_the_cpu_limit() -> None:
    (env,) = container(render({}))["env"]
    assert env == {
        "name": "SMG_PROCESSES",
        "valueFrom": {
            "resourceFieldRef": {"containerName": "smg", "resource": "limits.cpu", "divisor": "1"}
        },
    }
    # smg reads it as --processes (the environment layer overrides the file).
    assert load_config([], env={"SMG_PROCESSES": "2"}).processes == 2
    # No CPU limit: the downward API would give the node's CPUs; smg counts its own instead.
    assert "env" not in container(render({"resources": {"limits": None}}))
    # config.processes, when set, is what runs: the variable would override it.
    assert "env" not in container(render({"config": {"processes": 3}}))


def test_service_links_are_off_because_smg_reads_every_smg_variable() -> None:
    spec = one(render({}), "Deployment")["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False
    # What the kubelet would inject for this Service (named smg) with links on.
    service = one(render({}), "Service")
    injected = {"SMG_SERVICE_HOST": "10.96.0.10", "SMG_PORT": "tcp://10.96.0.10:30000"}
    assert service["metadata"]["name"].upper() + "_SERVICE_HOST" in injected
    with pytest.raises(ConfigError) as exc:
        load_config([], env={"SMG_SERVICE_HOST": injected["SMG_SERVICE_HOST"]})
    assert (exc.value.key, exc.value.reason.split(" (")[0]) == (
        "SMG_SERVICE_HOST",
        "unknown setting",
    )
    with pytest.raises(ConfigError) as exc:
        load_config([], env={"SMG_PORT": injected["SMG_PORT"]})
    assert (exc.value.key, exc.value.source) == ("port", "environment variable SMG_PORT")


def test_secret_wiring() -> None:
    assert "envFrom" not in container(render({}))
    made = render(VARIANTS["monitored_keyed_locked"])
    secret_obj = one(made, "Secret")
    assert secret_obj["stringData"] == {"SMG_API_KEY": API_KEY}
    assert container(made)["envFrom"] == [{"secretRef": {"name": secret_obj["metadata"]["name"]}}]
    annotations = one(made, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/config", "checksum/secret"}
    existing = render(VARIANTS["existing_secret_hpa"])
    assert "Secret" not in existing
    assert container(existing)["envFrom"] == [{"secretRef": {"name": "smg-keys"}}]
    annotations = one(existing, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/config"}


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        meta = one(render(values), "Deployment")["spec"]["template"]["metadata"]
        return meta["annotations"]["checksum/config"]

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({}) == base
    assert checksum({"config": {"policy": "round_robin"}}) != base
    assert checksum({"replicaCount": 5}) == base


def test_pod_and_image_security() -> None:
    objects = render({})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    # The image runs as the pod's user, and `smg` is its entry point.
    docker = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", docker, re.M)
    assert froms == ["python:3.12-slim", "python:3.12-slim"]
    (user,) = re.findall(r"^USER (\d+):(\d+)$", docker, re.M)
    assert (int(user[0]), int(user[1])) == (
        pod["securityContext"]["runAsUser"],
        pod["securityContext"]["runAsGroup"],
    )
    assert re.findall(r"^ENTRYPOINT (.+)$", docker, re.M) == ['["smg"]']
    assert c["command"] == ["smg"]
    # Read-only root: every directory the image points writes at is an emptyDir mount.
    writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tmp"}
    assert writable == {"/tmp"}
    assert {v["name"]: "emptyDir" in v for v in pod["volumes"]}["tmp"] is True
    for var in ("HOME", "XDG_CACHE_HOME"):
        (value,) = re.findall(rf"^\s+{var}=(\S+)", docker, re.M)
        assert any(value == w or value.startswith(w + "/") for w in writable), (var, value)
    # The config file: `--config` names a key of the ConfigMap in its read-only mount.
    config_path = Path(c["args"][c["args"].index("--config") + 1])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert (mount["mountPath"], mount["readOnly"]) == (str(config_path.parent), True)
    assert list(one(objects, "ConfigMap")["data"]) == [config_path.name]


BAD_VALUES = [
    ({"config": {"port": "abc"}}, "at '/config/port': got string, want integer"),
    ({"config": {"api_key": "sk-x"}}, "at '/config/api_key': 'not' failed"),
    ({"config": {"health-check-port": 1}}, "'health-check-port' does not match pattern"),
    ({"config": {"health_check_port": None}}, "missing property 'health_check_port'"),
    ({"secretEnv": {"API_KEY": "x"}}, "'API_KEY' does not match pattern '^SMG_[A-Z0-9_]+$'"),
    ({"existingSecret": "s", "secretEnv": {"SMG_API_KEY": "x"}}, "maxProperties: got 1, want 0"),
    ({"replicaCounts": 2}, "additional properties 'replicaCounts' not allowed"),
    ({"terminationGracePeriodMarginSeconds": 5}, "minimum: got 5, want 12"),
    ({"discovery": {"enabled": True}}, "at '/discovery/selector': minProperties: got 0, want 1"),
    (
        {"discovery": {"enabled": True, "selector": {}}},
        "at '/discovery/selector': minProperties: got 0, want 1",
    ),
    (
        {"discovery": {"enabled": True, "selector": {"app=x": "y"}}},
        "invalid propertyName 'app=x'",
    ),
    (
        {"discovery": {"enabled": True, "selector": {"app": "a b"}}},
        "at '/discovery/selector/app': 'a b' does not match pattern",
    ),
    (
        {"discovery": {"enabled": True, "selector": {"app": "x"}, "port": 0}},
        "at '/discovery/port': minimum: got 0, want 1",
    ),
    (
        {"discovery": {"enabled": True, "selector": {"app": "x"}, "modelIdFrom": "pod"}},
        "at '/discovery/modelIdFrom': 'pod' does not match pattern",
    ),
    (
        {"discovery": {"enabled": True, "selector": {"app": "x"}, "namespace": "Engines"}},
        "at '/discovery/namespace': 'Engines' does not match pattern",
    ),
    (
        {"discovery": {"clusterWide": True, "namespace": "engines"}},
        "at '/discovery/namespace': maxLength: got 7, want 0",
    ),
    (
        {"discovery": {"enabled": True, "selector": {"app": "x"}}, "config": {"selector": ["a=b"]}},
        "invalid propertyName 'selector'",
    ),
    ({"discovery": {"enabled": True, "selectors": {}}}, "additional properties 'selectors'"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_bad_values_fail_at_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as exc:
        render(values)
    assert message in str(exc.value)


def test_the_schema_keeps_exactly_smgs_credentials_out_of_the_configmap() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    (pattern,) = schema["properties"]["config"]["patternProperties"]
    refused = {f for f in _FIELDS if re.search(pattern, f)}
    assert refused == {f for f in _FIELDS if is_secret_key(f)}
    assert refused == {"api_key", "tenant_api_key", "control_plane_api_keys"}


# --- smg accepts what the chart renders -----------------------------------------------------


def pod_env(objects: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """The SMG_* environment the kubelet would give the container: the downward API's
    SMG_PROCESSES (the CPU limit divided by 1, rounded up) and a chart-made Secret's keys."""
    env: dict[str, str] = {}
    c = container(objects)
    limits = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]
    for var in c.get("env", []):
        assert var["name"] == "SMG_PROCESSES"
        cpu = str(limits["cpu"])
        cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        env["SMG_PROCESSES"] = str(math.ceil(cores))
    for ref in c.get("envFrom", []):
        secrets = {s["metadata"]["name"]: s for s in objects.get("Secret", [])}
        name = ref["secretRef"]["name"]
        # An existing Secret is the operator's: stand in one key, as they would set it.
        env.update(secrets[name]["stringData"] if name in secrets else {"SMG_API_KEY": API_KEY})
    return env


def write_config(objects: dict[str, list[dict[str, Any]]], directory: Path) -> list[str]:
    """Write the ConfigMap's files into `directory`; the container's argv with the mount
    directory replaced by it."""
    for name, text in one(objects, "ConfigMap")["data"].items():
        (directory / name).write_text(text)
    c = container(objects)
    (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config"]
    return [*c["command"], *(a.replace(mount, str(directory)) for a in c["args"])]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_smg_accepts_the_rendered_config_and_command_line(variant: str, tmp_path: Path) -> None:
    objects = render(VARIANTS[variant])
    argv = write_config(objects, tmp_path)
    assert argv[:2] == ["smg", "launch"]
    cfg = load_config(argv[2:], env=pod_env(objects))
    config = chart_values()["config"]
    assert (cfg.host, cfg.port, cfg.health_check_port) == (
        config["host"],
        config["port"],
        config["health_check_port"],
    )
    assert (cfg.prometheus_host, cfg.prometheus_port) == (
        config["prometheus_host"],
        config["prometheus_port"],
    )
    expected = {
        "default": (2, None, DEFAULTS["shutdown_grace_period_secs"], []),
        "monitored_keyed_locked": (
            2,
            API_KEY,
            DEFAULTS["shutdown_grace_period_secs"],
            ["http://sglang-0.sglang:30000"],
        ),
        "existing_secret_hpa": (2, API_KEY, 30, []),  # 1500m rounds up to 2
        "discovery": (2, None, DEFAULTS["shutdown_grace_period_secs"], []),
        "discovery_pd_elsewhere": (2, None, DEFAULTS["shutdown_grace_period_secs"], []),
        "discovery_cluster_wide": (2, None, DEFAULTS["shutdown_grace_period_secs"], []),
    }[variant]
    assert (cfg.processes, cfg.api_key, cfg.shutdown_grace_period_secs, cfg.worker_urls) == expected
    found = (
        discovery_provider(cfg),
        cfg.selector,
        cfg.service_discovery_namespace,
        cfg.service_discovery_port,
        cfg.prefill_selector,
        cfg.decode_selector,
        cfg.pd_disaggregation,
        cfg.model_id_from,
        remove_unhealthy(cfg),
    )
    assert found == {
        "discovery": (
            "kubernetes",
            ["app=sglang", "app.kubernetes.io/part-of=llm"],
            NAMESPACE,  # the release's
            30000,
            None,
            None,
            False,
            "label:model",
            True,  # on by default under discovery, as in 1.13
        ),
        "discovery_pd_elsewhere": (
            "kubernetes",
            None,
            "engines",
            80,
            ["app=llm", "role=prefill"],
            ["app=llm", "role=decode"],
            True,
            None,
            True,
        ),
        "discovery_cluster_wide": (
            "kubernetes",
            ["app=vllm"],
            None,  # every namespace
            80,
            None,
            None,
            False,
            None,
            True,
        ),
    }.get(variant, (None, None, None, 80, None, None, False, None, False))


# --- deploy/kubernetes ----------------------------------------------------------------------


def test_plain_manifests_are_the_charts_default_rendering() -> None:
    committed = (REPO / "deploy" / "kubernetes" / "smg.yaml").read_text()
    assert committed == RENDER.render_plain(RENDER.render_chart()), (
        "deploy/kubernetes/smg.yaml is stale: run python tools/render_kubernetes.py"
    )
    kinds = [yaml.safe_load(doc)["kind"] for doc in committed.split("\n---\n")[1:]]
    assert kinds == [
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceAccount",
        "ConfigMap",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
    ]


# --- end to end: the rendered pod, run on loopback -----------------------------------------


def test_rendered_pod_answers_the_kubelets_probes_and_serves_a_chat(tmp_path: Path) -> None:
    """The chart's config and command line (API key from its Secret, SMG_PROCESSES from
    the CPU limit), with the listeners moved to 127.0.0.1 and free ports and the engines
    replaced by `--mock-workers 2`; probed as the kubelet would, then drained by SIGTERM."""
    objects = render(VARIANTS["monitored_keyed_locked"])
    argv = write_config(objects, tmp_path)
    config_file = tmp_path / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    c = container(objects)
    port_names = {p["containerPort"]: p["name"] for p in c["ports"]}
    ports = {name: free_port() for name in port_names.values()}
    for key in ("port", "health_check_port", "prometheus_port"):
        config[key] = ports[port_names[config[key]]]
    config["host"] = config["prometheus_host"] = "127.0.0.1"
    del config["worker_urls"]
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "smg", *argv[1:], "--mock-workers", "2"]
    env = {**os.environ, **pod_env(objects)}
    assert env["SMG_PROCESSES"] == "2"

    gw = Gateway([])
    gw.process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=gw.log, env=env, start_new_session=True
    )
    try:
        assert gw._read_ready(60.0) == f"http://127.0.0.1:{ports['http']}", gw.logs()[-3000:]
        probe = f"http://127.0.0.1:{ports[c['readinessProbe']['httpGet']['port']]}"
        live = httpx.get(probe + c["livenessProbe"]["httpGet"]["path"], timeout=5)
        assert (live.status_code, live.text) == (200, "OK")
        ready = wait_until(
            lambda: (
                (
                    r := httpx.get(probe + c["readinessProbe"]["httpGet"]["path"], timeout=5)
                ).status_code
                == 200
                and r
            ),
            30.0,
            "readiness 200 on the probe port",
        )
        assert ready.json() == {"status": "ready", "healthy_workers": 2, "total_workers": 2}
        api = f"http://127.0.0.1:{ports['http']}/v1/chat/completions"
        (model,) = [
            m["id"] for m in httpx.get(api.replace("chat/completions", "models")).json()["data"]
        ]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(api, json=body, timeout=30).status_code == 401  # the Secret's key
        answer = httpx.post(
            api, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "chat.completion"
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
        # SMG_PROCESSES (the CPU limit) set the data-plane processes: 0 and 1 report.
        assert set(re.findall(r'process="(\d+)"', metrics)) == {"0", "1"}
        # SIGTERM (after the preStop sleep): readiness turns 503 at once, then a clean exit.
        started = time.monotonic()
        gw.signal(signal.SIGTERM)

        def not_ready() -> httpx.Response | None:
            r = httpx.get(probe + "/readiness", timeout=5)
            return r if r.status_code == 503 else None

        drained = wait_until(not_ready, 10.0, "readiness 503 after SIGTERM")
        assert drained.json() == {"status": "not ready", "reason": "shutting down"}
        assert gw.wait(60) == 0
        grace = one(objects, "Deployment")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        assert time.monotonic() - started < grace
    finally:
        gw.stop()
        gw.close_log()
