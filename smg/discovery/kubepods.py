"""Kubernetes pods -> the workers they serve: pure code, the rules of the Rust SMG 1.13.

A pod is the API's JSON object (a dict, camelCase keys, as `kubectl get pod -o json`
prints it); `desired_workers` maps a snapshot of pods to `{id: WorkerSpec}`, the set
`Reconciler.apply("kubernetes", ...)` is given. No I/O here: smg.discovery.kubernetes
lists and watches the pods and calls this.

1.13's rules (model_gateway/src/service_discovery.rs and the 1.13 binary):
- A pod is considered when its labels carry every `key=value` of `--selector` (an empty
  selector matches nothing), or in PD mode of `--prefill-selector` or `--decode-selector`
  (a pod matching the prefill selector is a prefill, else the decode one a decode).
- A pod with `metadata.deletionTimestamp` leaves the set at once, so its workers are
  drained from the start of its grace period, not its end.
- A worker exists only while its pod is `Running` with the condition `Ready=True`, has
  a pod IP and a uid: a pod turning unready leaves the set (its workers drain), as the
  1.13 binary does (the newer source keeps them; the binary wins).
- One worker per port: the ports of the `smg.ai/worker-ports` annotation ("8000,8001",
  deduplicated in order; junk or 0 falls back to `--service-discovery-port`), else that
  port alone. URL: the bare `<pod IP>:<port>` (as 1.13; its mode is detected when added).
- A prefill's bootstrap port: the `sglang.ai/bootstrap-port` annotation, one value for
  every worker of the pod or one per worker port; anything else is ignored (no port).
- Keyed by 1.13's discovery id `<pod uid>:<port>` (its `smg.ai/discovery-id` label), with
  the labels `smg.ai/pod-name` and `smg.ai/pod-uid`: a pod replaced on the same IP is a
  new id, so the old worker drains and the new one is added once the URL is free.
- `--model-id-from namespace|label:<key>|annotation:<key>`: the worker's model id from
  the pod's metadata; a pod lacking the key keeps the model its worker reports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from smg.workers_spec import WorkerSpec

log = logging.getLogger("smg.discovery.kubernetes")

POD_NAME_LABEL = "smg.ai/pod-name"
POD_UID_LABEL = "smg.ai/pod-uid"
WORKER_PORTS_ANNOTATION = "smg.ai/worker-ports"
BOOTSTRAP_PORT_ANNOTATION = "sglang.ai/bootstrap-port"

Pod = Mapping[str, Any]


class SelectorError(ValueError):
    """A bad `--model-id-from` value (smg.config checks the flag; this parses it)."""


@dataclass(frozen=True)
class ModelIdFrom:
    """Where `--model-id-from` reads a worker's model id: "namespace", "label", "annotation"."""

    kind: str
    key: str = ""

    @classmethod
    def parse(cls, raw: str) -> ModelIdFrom:
        if raw.lower() == "namespace":
            return cls("namespace")
        for kind in ("label", "annotation"):
            prefix = kind + ":"
            if raw.startswith(prefix):
                if not raw[len(prefix) :]:
                    raise SelectorError(f"{prefix} requires a key name")
                return cls(kind, raw[len(prefix) :])
        raise SelectorError(
            f"Invalid model-id-from value '{raw}'. "
            "Expected: namespace, label:<key>, or annotation:<key>"
        )

    def extract(self, pod: Pod) -> str | None:
        meta = pod.get("metadata") or {}
        if self.kind == "namespace":
            value = meta.get("namespace")
        else:
            value = (meta.get("labels" if self.kind == "label" else "annotations") or {}).get(
                self.key
            )
        return value if isinstance(value, str) and value.strip() == value and value else None


@dataclass(frozen=True)
class KubeRules:
    """What decides which pods are workers (from the discovery flags)."""

    selector: Mapping[str, str] = field(default_factory=dict)
    port: int = 80
    namespace: str | None = None
    pd: bool = False
    prefill_selector: Mapping[str, str] = field(default_factory=dict)
    decode_selector: Mapping[str, str] = field(default_factory=dict)
    model_id_from: ModelIdFrom | None = None
    worker_ports_annotation: str = WORKER_PORTS_ANNOTATION
    bootstrap_port_annotation: str = BOOTSTRAP_PORT_ANNOTATION

    def role_selectors(self) -> list[Mapping[str, str]]:
        return [s for s in (self.prefill_selector, self.decode_selector) if s]

    def list_label_selector(self) -> str:
        """The labelSelector sent to the API: the selector, or in PD mode the labels every
        role selector shares (none shared: "", no server-side filtering), as 1.13."""
        if not self.pd:
            return ",".join(f"{k}={v}" for k, v in self.selector.items())
        roles = self.role_selectors()
        if not roles:
            return ""
        first, rest = roles[0], roles[1:]
        return ",".join(f"{k}={v}" for k, v in first.items() if all(r.get(k) == v for r in rest))


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_role(pod: Pod, rules: KubeRules) -> str | None:
    """ "regular", "prefill", "decode", or None when the pod is not selected."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if not rules.pd:
        return "regular" if _matches(labels, rules.selector) else None
    if _matches(labels, rules.prefill_selector):
        return "prefill"
    if _matches(labels, rules.decode_selector):
        return "decode"
    return None


def pod_ready(pod: Pod) -> bool:
    """Running with the condition Ready=True (1.13's PodInfo::is_healthy)."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def _port_list(raw: str) -> list[int] | None:
    ports = []
    for part in raw.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) <= 65535:
            return None
        ports.append(int(part))
    return ports


def worker_ports(pod: Pod, rules: KubeRules) -> list[int]:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(rules.worker_ports_annotation)
    if raw is None:
        return [rules.port]
    ports = _port_list(str(raw))
    if ports is None:
        log.warning(
            "pod %s: invalid %s annotation %r, falling back to port %d",
            _name(pod),
            rules.worker_ports_annotation,
            raw,
            rules.port,
        )
        return [rules.port]
    return list(dict.fromkeys(ports))


def bootstrap_ports(pod: Pod, rules: KubeRules, count: int) -> list[int | None]:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(
        rules.bootstrap_port_annotation
    )
    if raw is None:
        return [None] * count
    ports = _port_list(str(raw))
    if ports is not None and len(ports) == 1:
        return [ports[0]] * count
    if ports is not None and len(ports) == count:
        return list(ports)
    log.warning(
        "pod %s: %s annotation %r does not align with %d worker port(s), ignoring",
        _name(pod),
        rules.bootstrap_port_annotation,
        raw,
        count,
    )
    return [None] * count


def _name(pod: Pod) -> str:
    return str((pod.get("metadata") or {}).get("name"))


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def pod_workers(pod: Pod, rules: KubeRules) -> dict[str, WorkerSpec]:
    """{discovery id: spec} for a selected, Running and Ready pod with an IP and a uid that
    is not terminating; {} for any other. The id is 1.13's: `<pod uid>:<port>`."""
    role = pod_role(pod, rules)
    meta = pod.get("metadata") or {}
    if role is None or meta.get("deletionTimestamp") or not pod_ready(pod):
        return {}
    name, uid = meta.get("name"), meta.get("uid")
    ip = (pod.get("status") or {}).get("podIP")
    if not name or not uid or not ip:
        return {}
    ports = worker_ports(pod, rules)
    boots = bootstrap_ports(pod, rules, len(ports)) if role == "prefill" else [None] * len(ports)
    model_id = rules.model_id_from.extract(pod) if rules.model_id_from else None
    return {
        f"{uid}:{port}": WorkerSpec(
            # Bare, as 1.13's: the reconciler probes HTTP and gRPC (smg.discovery.detect).
            url=f"{_url_host(ip)}:{port}",
            model_id=model_id,
            worker_type=role,
            bootstrap_port=boot,
            labels={POD_NAME_LABEL: name, POD_UID_LABEL: uid},
        )
        for port, boot in zip(ports, boots, strict=True)
    }


def desired_workers(pods: Iterable[Pod], rules: KubeRules) -> dict[str, WorkerSpec]:
    """The workers the pods call for, by discovery id. Two pods claiming one URL (an IP
    reused while the old pod is still listed): the first listed keeps it."""
    out: dict[str, WorkerSpec] = {}
    urls: set[str] = set()
    for pod in pods:
        for key, spec in pod_workers(pod, rules).items():
            if spec.url not in urls:
                urls.add(spec.url)
                out[key] = spec
    return out
