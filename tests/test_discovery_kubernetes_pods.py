"""smg.discovery.kubepods: pods -> workers, 1.13's rules, exact values (pure)."""

from __future__ import annotations

import pytest

from smg.discovery.kubepods import (
    KubeRules,
    ModelIdFrom,
    SelectorError,
    desired_workers,
)
from smg.workers_spec import WorkerSpec
from tests.kmockutil import pod

RULES = KubeRules(selector={"app": "llm"}, port=8000)
LBL = {"app": "llm"}


def urls(desired: dict[str, WorkerSpec]) -> list[str]:
    return [spec.url for spec in desired.values()]


def test_a_ready_running_selected_pod_is_one_worker_with_its_name_and_uid() -> None:
    desired = desired_workers([pod("w0", "10.0.0.5", LBL)], RULES)
    assert list(desired) == ["uid-w0:8000"]  # 1.13's discovery id: <pod uid>:<port>
    spec = desired["uid-w0:8000"]
    assert spec.url == "10.0.0.5:8000"
    assert spec.worker_type == "regular"
    assert spec.model_id is None
    assert spec.bootstrap_port is None
    assert spec.labels == {"smg.ai/pod-name": "w0", "smg.ai/pod-uid": "uid-w0"}


def test_pods_not_selected_not_ready_without_ip_or_terminating_are_not_workers() -> None:
    pods = [
        pod("other", "10.0.0.1", {"app": "web"}),
        pod("partial", "10.0.0.2", {"tier": "gpu"}),
        pod("pending", "10.0.0.3", LBL, ready=False),
        pod("no-ip", None, LBL),
        pod("ok", "10.0.0.6", {"app": "llm", "extra": "x"}),
    ]
    gone = pod("leaving", "10.0.0.4", LBL)
    gone["metadata"]["deletionTimestamp"] = "2026-11-28T22:00:00Z"
    pods.append(gone)
    running_not_ready = pod("flap", "10.0.0.7", LBL)
    running_not_ready["status"]["conditions"][0]["status"] = "False"
    pods.append(running_not_ready)
    ready_not_running = pod("odd", "10.0.0.8", LBL)
    ready_not_running["status"]["phase"] = "Succeeded"
    pods.append(ready_not_running)
    no_uid = pod("nouid", "10.0.0.9", LBL)
    del no_uid["metadata"]["uid"]
    pods.append(no_uid)
    assert urls(desired_workers(pods, RULES)) == ["10.0.0.6:8000"]


def test_an_empty_selector_selects_nothing_as_in_1_13() -> None:
    assert desired_workers([pod("w0", "10.0.0.5", {})], KubeRules(port=8000)) == {}
    assert desired_workers([pod("w0", "10.0.0.5", LBL)], KubeRules(port=8000)) == {}


def test_worker_ports_annotation_makes_one_worker_per_port_deduplicated_in_order() -> None:
    p = pod("w0", "10.0.0.5", LBL, annotations={"smg.ai/worker-ports": "8001, 8002,8001"})
    desired = desired_workers([p], RULES)
    assert list(desired) == ["uid-w0:8001", "uid-w0:8002"]
    assert urls(desired) == ["10.0.0.5:8001", "10.0.0.5:8002"]


@pytest.mark.parametrize("raw", ["", "80,x", "0", "70000", "8001,,8002"])
def test_a_bad_worker_ports_annotation_falls_back_to_the_discovery_port(raw: str) -> None:
    p = pod("w0", "10.0.0.5", LBL, annotations={"smg.ai/worker-ports": raw})
    assert urls(desired_workers([p], RULES)) == ["10.0.0.5:8000"]


def test_an_ipv6_pod_ip_is_bracketed() -> None:
    assert urls(desired_workers([pod("w0", "fd00::5", LBL)], RULES)) == ["[fd00::5]:8000"]


PD = KubeRules(
    pd=True,
    port=8000,
    prefill_selector={"app": "llm", "role": "prefill"},
    decode_selector={"app": "llm", "role": "decode"},
)


def test_pd_roles_come_from_the_selectors_and_the_bootstrap_annotation() -> None:
    pods = [
        pod("p0", "10.0.0.1", {"app": "llm", "role": "prefill"},
            annotations={"sglang.ai/bootstrap-port": "8998"}),
        pod("d0", "10.0.0.2", {"app": "llm", "role": "decode"},
            annotations={"sglang.ai/bootstrap-port": "8998"}),
        pod("x0", "10.0.0.3", {"app": "llm"}),
    ]  # fmt: skip
    desired = desired_workers(pods, PD)
    assert urls(desired) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    prefill, decode = desired["uid-p0:8000"], desired["uid-d0:8000"]
    assert (prefill.worker_type, prefill.bootstrap_port) == ("prefill", 8998)
    assert (decode.worker_type, decode.bootstrap_port) == ("decode", None)  # prefill only


def test_bootstrap_ports_one_for_all_or_one_per_worker_port_else_none() -> None:
    lbl = {"app": "llm", "role": "prefill"}
    ann = {"smg.ai/worker-ports": "8000,8001"}

    def boots(raw: str) -> list[int | None]:
        p = pod("p0", "10.0.0.1", lbl, annotations={**ann, "sglang.ai/bootstrap-port": raw})
        return [s.bootstrap_port for s in desired_workers([p], PD).values()]

    assert boots("9000") == [9000, 9000]
    assert boots("9000,9001") == [9000, 9001]
    assert boots("9000,9001,9002") == [None, None]
    assert boots("nine") == [None, None]


def test_list_label_selector_is_the_selector_or_the_labels_the_roles_share() -> None:
    assert KubeRules(selector={"app": "llm", "tier": "gpu"}).list_label_selector() == (
        "app=llm,tier=gpu"
    )
    assert PD.list_label_selector() == "app=llm"
    disjoint = KubeRules(pd=True, prefill_selector={"a": "1"}, decode_selector={"b": "2"})
    assert disjoint.list_label_selector() == ""


def test_model_id_from_namespace_label_annotation() -> None:
    p = pod("w0", "10.0.0.5", {"app": "llm", "model": "llama-8b"},
            annotations={"smg.ai/model": "qwen-7b"}, namespace="team-a")  # fmt: skip

    def model(raw: str) -> str | None:
        rules = KubeRules(selector=LBL, port=8000, model_id_from=ModelIdFrom.parse(raw))
        return desired_workers([p], rules)["uid-w0:8000"].model_id

    assert model("namespace") == "team-a"
    assert model("NAMESPACE") == "team-a"
    assert model("label:model") == "llama-8b"
    assert model("annotation:smg.ai/model") == "qwen-7b"
    assert model("label:missing") is None  # the worker's own model then


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("label:", "label: requires a key name"),
        ("annotation:", "annotation: requires a key name"),
        ("pod", "Invalid model-id-from value 'pod'. Expected: namespace, label:<key>, or annotation:<key>"),
    ],
)  # fmt: skip
def test_model_id_from_refuses_what_1_13_refuses(raw: str, message: str) -> None:
    with pytest.raises(SelectorError) as info:
        ModelIdFrom.parse(raw)
    assert str(info.value) == message


def test_a_pod_turning_unready_leaves_the_set_as_the_1_13_binary_does() -> None:
    assert list(desired_workers([pod("w0", "10.0.0.5", LBL)], RULES)) == ["uid-w0:8000"]
    assert desired_workers([pod("w0", "10.0.0.5", LBL, ready=False)], RULES) == {}


def test_a_pod_replaced_on_the_same_ip_is_a_new_worker_and_the_first_listed_keeps_a_url() -> None:
    new = desired_workers([pod("w1", "10.0.0.5", LBL)], RULES)
    assert list(new) == ["uid-w1:8000"]  # a new id: the old one's worker drains
    pods = [pod("a", "10.0.0.5", LBL), pod("b", "10.0.0.5", LBL)]
    assert list(desired_workers(pods, RULES)) == ["uid-a:8000"]
    assert list(desired_workers(list(reversed(pods)), RULES)) == ["uid-b:8000"]
    pods[0] = pod("a", "10.0.0.5", LBL, ready=False)  # an unready one claims nothing
    assert list(desired_workers(pods, RULES)) == ["uid-b:8000"]
