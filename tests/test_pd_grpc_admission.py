"""PD over gRPC workers (smg.grpc.pd): prefill admission through the PD router's
gateway-wide queue (smg.dataplane.pd.PrefillAdmission: 1.13 gates gRPC PD's prefill
selection too, with the same 429s), and smg_pd_prefill_duration_seconds /
smg_pd_ttft_seconds with 1.13's runtime label ("sglang": parallel dispatch, TTFT only;
"vllm": sequential, prefill duration and TTFT). Through `smg launch --processes 2` with
the gRPC PD mocks (tests/pdutil.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import pdutil
from tests.gatewayutil import Gateway, in_flight_total, wait_until

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.grpcmockutil import llama3_dir

    return llama3_dir(tmp_path_factory.mktemp("pdga-llama3"))


@contextlib.contextmanager
def grpc_pd(
    llama_dir: Path, backend: str, *extra: str, prefill_args: tuple[str, ...] = ()
) -> Iterator[tuple[pdutil.GrpcPdMock, pdutil.GrpcPdMock, Gateway]]:
    with (
        pdutil.start_grpc_prefill(llama_dir, backend, *prefill_args) as prefill,
        pdutil.start_grpc_decode(llama_dir, backend, wait_s=10) as decode,
        pdutil.grpc_pd_gateway(prefill, decode, llama_dir, *extra) as gateway,
    ):
        with gateway.client() as client:  # warm up (tokenizer, channels) off the clock
            answer = client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200, answer.text
        yield prefill, decode, gateway


def _chats(url: str, delays: tuple[float, ...]) -> list[httpx.Response]:
    return pdutil.staggered_posts(url, "/v1/chat/completions", CHAT, delays)


def test_grpc_prefill_admission_queue_timeout_and_full_as_1_13(llama_dir: Path) -> None:
    """Cap 1, queue 1, timeout 1 s, a prefill taking 2.5 s: the first request is served,
    the second waits 1 s in the queue and gets 1.13's 429 pd_prefill_queue_timeout, the
    third finds the queue full (or, in the other process, times out too)."""
    admission = pdutil.admission_args(1, queue_size=1)
    with grpc_pd(llama_dir, "sglang", *admission, prefill_args=("--ttft-ms", "2500")) as (
        _prefill,
        _decode,
        gateway,
    ):
        answers = _chats(gateway.url, (0.0, 0.3, 0.6))
        pdutil.assert_queue_timeout_and_full(answers, gateway.metrics())
        wait_until(lambda: in_flight_total(gateway) == 0, 5.0, "in-flight back to 0")


def test_grpc_prefill_admission_queues_the_second_until_the_first_is_done(
    llama_dir: Path,
) -> None:
    """Cap 1 with a queue: two requests 0.3 s apart both succeed, the second only after
    the first's 1.5 s prefill freed the slot (without the gate both run at once); the
    slot (and the reservation taken before tokenization) is released every time."""
    admission = pdutil.admission_args(20)
    with grpc_pd(llama_dir, "sglang", *admission, prefill_args=("--ttft-ms", "1500")) as (
        _prefill,
        _decode,
        gateway,
    ):
        answers = _chats(gateway.url, (0.0, 0.3))
        assert [a.status_code for a in answers] == [200, 200], answers[-1].text
        assert answers[0].elapsed.total_seconds() < 2.9
        # Its own 1.5 s prefill after waiting ~1.2 s for the first's.
        assert answers[1].elapsed.total_seconds() >= 2.4, answers[1].elapsed
        wait_until(lambda: in_flight_total(gateway) == 0, 5.0, "in-flight back to 0")
        metrics = gateway.metrics()
        # The warm-up request did not wait: only the second here waited.
        assert pdutil.metric_sum(metrics, "smg_pd_prefill_admission_wait_seconds_count") == 1
        assert pdutil.metric_sum(metrics, "smg_pd_prefill_admission_rejections_total{") == 0


def test_grpc_pd_histograms_carry_1_13s_runtime_label(llama_dir: Path) -> None:
    """What the 1.13 binary records on the same gRPC PD mocks (one non-streamed and one
    streamed chat each): SGLang, smg_pd_ttft_seconds for the streamed one only, no
    prefill duration; vLLM, the prefill duration for both and TTFT for the streamed one;
    labels backend_type="pd", the model, runtime="sglang" / "vllm"."""
    for backend in ("sglang", "vllm"):
        with grpc_pd(llama_dir, backend) as (_prefill, _decode, gateway):
            with gateway.client() as client:
                answer = client.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200, answer.text
                with client.stream(
                    "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
                ) as s:
                    assert s.status_code == 200
                    s.read()
            metrics = gateway.metrics()
            labels = ('backend_type="pd"', 'model="llama3"', f'runtime="{backend}"')
            assert pdutil.metric_sum(metrics, "smg_pd_ttft_seconds_count{", *labels) == 1, metrics
            assert pdutil.metric_sum(metrics, "smg_pd_ttft_seconds_count{") == 1  # no other labels
            prefill = pdutil.metric_sum(metrics, "smg_pd_prefill_duration_seconds_count{", *labels)
            # the warm-up request + 2 here
            assert prefill == (3 if backend == "vllm" else 0), metrics
            assert pdutil.metric_sum(metrics, "smg_pd_prefill_duration_seconds_count{") == prefill


@pytest.mark.skipif(not pdutil.RUST_SMG.exists(), reason="no Rust SMG 1.13 binary")
def test_rust_answers_grpc_prefill_admission_as_smg(llama_dir: Path) -> None:
    """The same gRPC PD mocks, flags and requests behind the 1.13 binary: one served, a
    429 pd_prefill_queue_timeout after ~1 s, a 429 pd_prefill_queue_full at once, with
    the bodies and x-smg-error-code headers smg answers (the test above)."""
    import tempfile

    with (
        pdutil.start_grpc_prefill(llama_dir, "sglang", "--ttft-ms", "2500") as prefill,
        pdutil.start_grpc_decode(llama_dir, "sglang", wait_s=10) as decode,
        tempfile.TemporaryDirectory() as cache,
    ):
        args = ["--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url]
        extra = ("--model-path", str(llama_dir), *pdutil.ONE_SHOT)
        admission = pdutil.admission_args(1, queue_size=1)
        with pdutil.rust_gateway(args, *extra, *admission, env={"XDG_CACHE_HOME": cache}) as url:
            with httpx.Client(base_url=url, timeout=30.0) as client:
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            answers = _chats(url, (0.0, 0.3, 0.6))
    assert [a.status_code for a in answers] == [200, 429, 429]
    for answer, (code, message) in zip(
        answers[1:], (pdutil.QUEUE_TIMEOUT, pdutil.QUEUE_FULL), strict=True
    ):
        assert answer.headers["x-smg-error-code"] == code
        assert answer.json() == {
            "error": {"type": "rate_limit_error", "code": code, "message": message, "param": None}
        }
    assert 0.9 <= answers[1].elapsed.total_seconds() < 2.4


# --- the reservation traded for the policy's pick (PdPlan._admit), with fakes ---------------


class _Admission:
    def __init__(self, full: set[int]) -> None:
        self.full = full
        self.taken: list[int] = []
        self.freed_calls = 0

    def free(self, rows: list[int]) -> list[int]:
        return [row for row in rows if row not in self.full]

    def take(self, row: int, generation: int) -> bool:
        if row in self.full:
            return False
        self.taken.append(row)
        return True

    def freed(self) -> None:
        self.freed_calls += 1


class _Gate:
    def __init__(self) -> None:
        self.records: list[tuple[int, int]] = []
        self.deny: set[int] = set()  # rows whose circuit refuses a claim

    def claim(self, row: int) -> bool:
        return row not in self.deny

    def record(self, row: int, generation: int, outcome: int) -> None:
        self.records.append((row, outcome))


def _plan(pick: int, full: set[int]) -> tuple[object, object, object]:
    from types import SimpleNamespace

    from smg.grpc.pd import PdPlan

    admission = _Admission(full)
    done: list[tuple[int, int]] = []
    router = SimpleNamespace(
        admission=admission, prefill_policy=None, _choose=lambda _p, rows, _r: pick
    )
    app = SimpleNamespace(
        pd=router,
        gate=_Gate(),
        state=SimpleNamespace(entries={r: SimpleNamespace(generation=7) for r in (1, 2, 3)}),
        _in_flight_done=lambda row, gen: done.append((row, gen)),
    )
    plan = PdPlan(SimpleNamespace(app=app))  # type: ignore[arg-type]
    plan.reserved = (1, 7)
    return plan, router, (admission, done, app.gate)


def test_admit_keeps_the_reservation_when_the_policy_picks_it() -> None:
    plan, router, (admission, done, _gate) = _plan(1, full={1})  # 1 full: by our own slot
    assert plan._admit(router, [1, 2], None) == 1  # type: ignore[attr-defined]
    assert plan.reserved is None and done == [] and admission.taken == []  # type: ignore[attr-defined]


def test_admit_trades_the_reservation_for_the_policys_pick() -> None:
    plan, router, (admission, done, _gate) = _plan(2, full={1})
    assert plan._admit(router, [1, 2], None) == 2  # type: ignore[attr-defined]
    assert admission.taken == [2] and done == [(1, 7)] and admission.freed_calls == 1
    assert plan.reserved is None  # type: ignore[attr-defined]


def test_admit_falls_back_to_the_reservation_when_the_picks_slot_is_gone() -> None:
    plan, router, (admission, done, gate) = _plan(3, full={1})
    admission.full.add(3)  # free() saw it, take() loses it (another process won)
    admission.free = lambda rows: [r for r in rows if r != 1]  # type: ignore[method-assign]
    assert plan._admit(router, [1, 2, 3], None) == 1  # type: ignore[attr-defined]
    from smg.dataplane.gate import CLIENT_LEFT

    assert admission.taken == [] and done == [] and gate.records == [(3, CLIENT_LEFT)]
    assert plan.reserved is None  # type: ignore[attr-defined]


def test_admit_falls_back_only_through_the_gate() -> None:
    """The reservation's row is used only if its circuit still takes a request; else no
    prefill (503) and the reservation is released when the exchange ends."""
    plan, router, (admission, done, gate) = _plan(3, full={1, 3})
    admission.free = lambda rows: [r for r in rows if r != 1]  # type: ignore[method-assign]
    gate.deny.add(1)
    assert plan._admit(router, [1, 2, 3], None) == -1  # type: ignore[attr-defined]
    assert plan.reserved == (1, 7)  # type: ignore[attr-defined]
    plan.ended(None)  # type: ignore[attr-defined]
    assert done == [(1, 7)] and admission.freed_calls == 1
