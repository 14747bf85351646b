"""Follow-ups of the PD path's review (tests/test_pd_review.py).

A gRPC PD attempt's decode leg held by the decode's running window (smg.dataplane.pd_window)
carries a gate claim taken by PdPlan.choose; every claim is recorded once (an unused one
as CLIENT_LEFT), so a half-open breaker's trial is accounted for in the process that took
it. Driven directly on PdClient / PdPlan with recording stand-ins for the gate and the PD
router: the paths are an attempt's ends, which `smg launch` cannot show apart (the
half-open's shared trial count is the same either way)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from smg.dataplane.gate import CLIENT_LEFT
from smg.grpc.pd import LegError, PdClient, PdPlan
from smg.grpc.prepare import Defaults, prepare_generate
from smg.grpc.types import EngineError, GenerateInput

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
