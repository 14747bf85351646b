"""Follow-ups of the PD path's review (tests/test_pd_review.py).

1. A gRPC PD attempt's decode leg held by the decode's running window (smg.dataplane.pd_window)
carries a gate claim taken by PdPlan.choose; every claim is recorded once (an unused one
as CLIENT_LEFT), so a half-open breaker's trial is accounted for in the process that took
it. Driven directly on PdClient / PdPlan with recording stand-ins for the gate and the PD
router: the paths are an attempt's ends, which `smg launch` cannot show apart (the
half-open's shared trial count is the same either way).

2. A batched completion under gRPC PD: one PdClient runs every prompt's legs (one
attempt: one claim and in-flight count per worker, as without PD), so its per-prompt state
(the prefill's answer, its outcome) is kept per prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from smg.dataplane.gate import CLIENT_LEFT
from smg.grpc.pd import LegError, PdClient, PdPlan, _outcome, batch_outcome
from smg.grpc.prepare import Defaults, prepare_generate
from smg.grpc.types import EngineError, GenerateInput
from tests import pdutil
from tests.gatewayutil import in_flight_total, wait_until
from tests.grpcmockutil import llama3_dir

PREFILL_ROW, DECODE_ROW, GENERATION = 3, 5, 7


class _Gate:
    def __init__(self) -> None:
        self.records: list[tuple[int, int, int]] = []

    def record(self, row: int, generation: int, status: int) -> None:
        self.records.append((row, generation, status))


class _Router:
    def __init__(self) -> None:
        self.legs: list[tuple[int, int, int]] = []

    def leg_done(self, row: int, generation: int, outcome: int, dispatched: bool = False) -> None:
        self.legs.append((row, generation, outcome))


class _FailingEngine:
    """A gRPC engine whose Generate fails before its first output."""

    backend = "vllm"

    def generate_batches(self, _req: GenerateInput, *, timeout: float | None) -> AsyncIterator[Any]:
        async def fail() -> AsyncIterator[Any]:
            raise EngineError("INVALID_ARGUMENT", "bad prompt")
            yield  # (an async generator)

        return fail()


def _client(backend: str = "vllm") -> tuple[PdClient, PdPlan, _Gate, _Router]:
    gate, router = _Gate(), _Router()
    app = SimpleNamespace(gate=gate, pd=router)
    exchange: Any = SimpleNamespace(app=app, pd=None)
    plan = exchange.pd = PdPlan(exchange)
    p_entry: Any = SimpleNamespace(
        row=PREFILL_ROW,
        generation=GENERATION,
        url="grpc://127.0.0.1:50051",
        grpc=None,
        dp_rank=None,
        spec=SimpleNamespace(labels={}, bootstrap_port=None),
    )
    decode = SimpleNamespace(backend=backend)
    client = PdClient(exchange, _FailingEngine(), decode, p_entry)
    client.held = (DECODE_ROW, GENERATION)  # PdPlan.choose found the decode window full
    plan.clients.append(client)
    return client, plan, gate, router


def _request() -> GenerateInput:
    sampling = prepare_generate({"input_ids": [1, 2, 3]}, Defaults()).sampling
    return GenerateInput(request_id="r", input_ids=[1, 2, 3], sampling=sampling)


async def _drive(client: PdClient) -> None:
    async for _ in client.generate_batches(_request(), timeout=5.0):
        raise AssertionError("a failed prefill yields nothing")


def test_vllm_held_decode_claim_is_recorded_when_the_prefill_fails() -> None:
    # vLLM PD runs the prefill first and asks for the decode's slot after it: a prefill
    # that fails leaves the held decode leg unasked. Before the fix its claim was never
    # recorded (the attempt's error raised past _admit_decode, and PdPlan.ended only
    # closed the prefill leg).
    client, plan, gate, router = _client()
    try:
        asyncio.run(_drive(client))
    except LegError as error:
        assert error.pd_answer[0] == 400
    else:
        raise AssertionError("the prefill's failure is the attempt's answer")
    plan.ended(None)
    assert router.legs == [(PREFILL_ROW, GENERATION, 400)]
    assert gate.records == [(DECODE_ROW, GENERATION, CLIENT_LEFT)]  # once, not twice


def test_a_held_attempt_that_never_started_records_its_decode_claim() -> None:
    # The exchange ended before the attempt's legs ran (the client left, a failure in
    # between): the prefill leg closes as CLIENT_LEFT and the held decode claim too.
    # Before the fix only the prefill leg was closed.
    for backend in ("vllm", "sglang"):
        _, plan, gate, router = _client(backend)
        plan.ended(None)
        assert router.legs == [(PREFILL_ROW, GENERATION, CLIENT_LEFT)]
        assert gate.records == [(DECODE_ROW, GENERATION, CLIENT_LEFT)]


def test_a_held_decode_chosen_but_never_handed_to_a_client_is_recorded() -> None:
    # PdPlan.choose set `held`; the attempt failed before PdPlan.client took it over.
    _, plan, gate, _ = _client()
    plan.clients.clear()
    plan.held = (DECODE_ROW + 1, GENERATION)
    plan.ended(None)
    assert gate.records == [(DECODE_ROW + 1, GENERATION, CLIENT_LEFT)]


# --- 2: a batch's prompts on one PdClient -----------------------------------------------------


class _PrefillByPrompt:
    """An SGLang prefill engine: prompt `p0` answers at once with its prompt logprobs;
    `p1` answers after 50 ms with its own, or fails (UNAVAILABLE) when `fail` is set."""

    backend = "sglang"

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def generate_batches(self, req: GenerateInput, *, timeout: float | None) -> AsyncIterator[Any]:
        async def answer() -> AsyncIterator[Any]:
            if req.request_id == "p1":
                await asyncio.sleep(0.05)
                if self.fail:
                    raise EngineError("UNAVAILABLE", "prefill gone")
            yield [SimpleNamespace(finished=True, input_logprobs=f"prompt of {req.request_id}")]

        return answer()

    async def abort(self, _rids: list[str]) -> None:
        return None


class _Decode:
    """An SGLang decode engine: one finished output per request after 100 ms (no prompt
    logprobs: its prefill computed them)."""

    backend = "sglang"

    def generate_batches(self, req: GenerateInput, *, timeout: float | None) -> AsyncIterator[Any]:
        async def answer() -> AsyncIterator[Any]:
            await asyncio.sleep(0.1)
            yield [SimpleNamespace(finished=True, input_logprobs=None, rid=req.request_id)]

        return answer()

    async def abort(self, _rids: list[str]) -> None:
        return None


def _batch_client(fail: bool) -> tuple[PdClient, _Gate, _Router]:
    client, _plan, gate, router = _client()
    batch = PdClient(client.exchange, _PrefillByPrompt(fail), _Decode(), client.p_entry, 2)
    return batch, gate, router


async def _prompts(client: PdClient) -> list[Any]:
    sampling = prepare_generate(
        {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 0}, Defaults()
    ).sampling

    async def collect(rid: str) -> list[Any]:
        req = GenerateInput(request_id=rid, input_ids=[1, 2, 3], sampling=sampling, stream=False)
        got: list[Any] = []
        async for outs in client.generate_batches(req, timeout=5.0):
            got.extend(outs)
        return got

    return list(await asyncio.gather(collect("p0"), collect("p1"), return_exceptions=True))


def test_each_prompt_of_a_batch_gets_its_own_prefills_logprobs() -> None:
    # Before the fix the first prefill answer was kept for the whole PdClient: p1's
    # answer carried p0's prompt logprobs.
    client, _gate, router = _batch_client(fail=False)
    p0, p1 = asyncio.run(_prompts(client))
    assert [o.input_logprobs for o in p0] == ["prompt of p0"]
    assert [o.input_logprobs for o in p1] == ["prompt of p1"]
    assert router.legs == [(PREFILL_ROW, GENERATION, 200)]  # the one claim, once


def test_a_batch_prompts_prefill_failure_reaches_the_prefill_breaker() -> None:
    # p0's prefill answers, p1's fails: the batch's one prefill claim is recorded with
    # the failure, as p1 alone would be (and as a batch's failure is without PD). Before
    # the fix p0's 200 closed the leg first and the failure was dropped.
    client, _gate, router = _batch_client(fail=True)
    _, p1 = asyncio.run(_prompts(client))
    assert isinstance(p1, LegError) and p1.pd_answer[:2] == (503, "prefill_worker_failed_to_start")
    assert router.legs == [(PREFILL_ROW, GENERATION, _outcome(EngineError("UNAVAILABLE", "")))]


def test_batch_outcome_failure_then_answer_then_client_left() -> None:
    assert batch_outcome(CLIENT_LEFT, 200) == 200
    assert batch_outcome(200, CLIENT_LEFT) == 200
    assert batch_outcome(200, 0) == 0
    assert batch_outcome(0, 200) == 0
    assert batch_outcome(0, 503) == 0  # the first failure
    assert batch_outcome(CLIENT_LEFT, CLIENT_LEFT) == CLIENT_LEFT


def test_a_batched_completion_through_grpc_pd_closes_its_prefill_leg_once(
    tmp_path: Path,
) -> None:
    # End to end (`smg launch --processes 2`, SGLang gRPC PD mocks): a two-prompt
    # completion is answered in full, and the attempt's one prefill claim is recorded
    # once, a success, after both prompts' prefills ended (nothing left in flight).
    llama = llama3_dir(tmp_path / "llama3")
    with (
        pdutil.start_grpc_prefill(llama, "sglang") as prefill,
        pdutil.start_grpc_decode(llama, "sglang", wait_s=3.0) as decode,
        pdutil.grpc_pd_gateway(prefill, decode, llama) as gateway,
    ):
        body = {"model": "llama3", "prompt": ["hello", "hi there"], "max_tokens": 3}
        answer = httpx.post(gateway.url + "/v1/completions", json=body, timeout=30.0)
        assert answer.status_code == 200, answer.text
        assert sorted(c["index"] for c in answer.json()["choices"]) == [0, 1]
        wait_until(lambda: in_flight_total(gateway) == 0, 10, "the batch's legs ended")
        metrics = gateway.metrics()
        successes = pdutil.metric_sum(
            metrics, "smg_worker_cb_outcomes_total{", f'worker="{prefill.url}"', 'outcome="success"'
        )
        assert successes == 1
