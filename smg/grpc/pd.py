"""Prefill/decode disaggregation over gRPC workers (issue 17), smg being the full server.

In PD mode `PDRouter.proxy` (smg.dataplane.pd) hands a request whose PD fleet is gRPC to
`handle`: a `GrpcExchange` (smg.grpc.frontend) runs it as any gRPC request (template,
tokenizer, parsers, writers), except that its attempt picks a prefill AND a decode worker
(`PdPlan.choose`: --prefill-policy / --decode-policy, PH's ready rows and gate) and talks
to them through a `PdClient`, which looks like one engine client to the exchange:

- SGLang (1.13 `execute_parallel_pd` + helpers.rs `inject_sglang_bootstrap_metadata`):
  the same GenerateRequest goes to both legs at once with `disaggregated_params`
  {bootstrap_host: the prefill's host, bootstrap_port: its bootstrap port (8998 when
  none), bootstrap_room: random in [0, i32::MAX) (the proto field is int32)}; the decode's
  stream is the answer. A prefill failing before the decode's first output aborts the
  decode (Abort RPC + stream cancelled) and the client gets the prefill's error; a decode
  failing aborts the prefill. A retryable failure before any output retries the whole
  pair (1.13: the binary answers 200 after one prefill or decode UNAVAILABLE), preferring
  rows no earlier attempt failed on.
- vLLM (1.13 `execute_sequential_pd`): the prefill first, sanitized (max_tokens 1,
  min_tokens 0, n 1, no stops, ignore_eos, stream false) and tagged by connector: NIXL
  `{"do_remote_decode":true,"do_remote_prefill":false}`, Mooncake (with the engine id
  known) `{..., "transfer_id": "xfer-<uuid>"}`; then the decode with the params it needs:
  NIXL (and an unknown connector) the prefill's `kv_transfer_params_json` relayed as is,
  Mooncake {do_remote_prefill, transfer_id, remote_engine_id, remote_bootstrap_addr}.
  With n > 1 nothing is relayed (1.13: the KV handoff is single-consumer). Same
  request_id on both legs (1.13: load-bearing for NIXL on vLLM < 0.13).

Errors are 1.13's (LegError: tried on the binary with the same mocks): the gRPC code's
status, `prefill_worker_failed_to_start` / `decode_worker_failed_to_start`, "Prefill worker failed
to start: <engine message>"; a stream already started fails as the single-worker path.

Pure parts (rooms, connector mode, params, the prefill request) are functions tested
directly (tests/test_pd_grpc.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any

from smg.dataplane.gate import CLIENT_LEFT
from smg.grpc.types import EngineError, GenerateInput
from smg.worker_url import worker_address

if TYPE_CHECKING:
    from smg.dataplane.server import ClientConnection, Request
    from smg.grpc.frontend import GrpcExchange, GrpcFront
    from smg.shm.directory import DirectoryEntry

log = logging.getLogger("smg.grpc.pd")

ROOM_LIMIT = 2**31 - 1  # 1.13: rand::rng().random_range(0..i32::MAX) (int32 proto field)
DEFAULT_BOOTSTRAP_PORT = 8998  # 1.13's DEFAULT_BOOTSTRAP_PORT, SGLang's default
NIXL = "NixlConnector"
MOONCAKE = "MooncakeConnector"
NIXL_PREFILL_PARAMS = '{"do_remote_decode":true,"do_remote_prefill":false}'  # 1.13's bytes
PREFILL_DRAIN_S = 1.0  # after the decode's end, how long a still-open prefill may finish

# --- pure parts ------------------------------------------------------------------------------


def new_room(rng: random.Random | None = None) -> int:
    """A bootstrap room for SGLang's int32 DisaggregatedParams.bootstrap_room: uniform in
    [0, 2**31 - 1), as 1.13 (the HTTP path's rooms, smg.dataplane.pd.new_rooms, are 63-bit
    and would not fit the proto field)."""
    return (rng or _RNG).randrange(ROOM_LIMIT)


_RNG = random.SystemRandom()


@dataclasses.dataclass(frozen=True)
class KvMode:
    """1.13's KvConnectorMode from the prefill worker's metadata: "mooncake" (with
    bootstrap host/port and the engine id, None when unknown), "nixl" or "passthrough"."""

    kind: str
    host: str = ""
    port: int = 0
    engine_id: str | None = None


def kv_mode(connector: str, host: str, port: int | None, engine_id: str) -> KvMode:
    if connector == MOONCAKE:
        return KvMode("mooncake", host, port or DEFAULT_BOOTSTRAP_PORT, engine_id or None)
    if connector == NIXL:
        return KvMode("nixl")
    return KvMode("passthrough")


def mooncake_prefill_params(transfer_id: str) -> str:
    return json.dumps(
        {"do_remote_decode": True, "do_remote_prefill": False, "transfer_id": transfer_id},
        separators=(",", ":"),
    )


def mooncake_decode_params(transfer_id: str, engine_id: str, host: str, port: int) -> str:
    return json.dumps(
        {
            "do_remote_decode": False,
            "do_remote_prefill": True,
            "transfer_id": transfer_id,
            "remote_engine_id": engine_id,
            "remote_bootstrap_addr": f"http://{host}:{port}",
        },
        separators=(",", ":"),
    )


def transfer_id_for(mode: KvMode, n: int) -> str | None:
    """Mooncake mints the transfer id (push-based: the engine returns nothing); only with
    the engine id known and one choice."""
    if mode.kind == "mooncake" and mode.engine_id is not None and n <= 1:
        return f"xfer-{uuid.uuid4()}"
    return None


def vllm_prefill_input(req: GenerateInput, mode: KvMode, transfer_id: str | None) -> GenerateInput:
    """The prefill leg's request: 1.13's sanitize_sampling_for_prefill(1), stream off, the
    connector's tag."""
    sampling = dataclasses.replace(
        req.sampling, max_tokens=1, min_tokens=0, n=1, stop=[], stop_token_ids=[], ignore_eos=True
    )
    params = None
    if transfer_id is not None:
        params = mooncake_prefill_params(transfer_id)
    elif mode.kind == "nixl" and req.sampling.n <= 1:
        params = NIXL_PREFILL_PARAMS
    return dataclasses.replace(req, sampling=sampling, stream=False, kv_transfer_params_json=params)


def vllm_decode_params(
    mode: KvMode, returned: str | None, transfer_id: str | None, n: int
) -> str | None:
    """What the decode leg carries: Mooncake's synthesized params, else (NIXL or unknown
    connector, one choice) the prefill's returned params as is; None: nothing (1.13's
    legacy Mooncake typed host/port field is not sent: the JSON field supersedes it)."""
    if mode.kind == "mooncake" and transfer_id is not None and mode.engine_id is not None:
        return mooncake_decode_params(transfer_id, mode.engine_id, mode.host, mode.port)
    if mode.kind != "mooncake" and returned and n <= 1:
        return returned
    return None


class LegError(EngineError):
    """A PD leg's failure as 1.13 answers it (tried on the binary with the gRPC PD
    mocks): the gRPC code's status (INTERNAL 500, INVALID_ARGUMENT 400, UNAVAILABLE 503,
    RESOURCE_EXHAUSTED 429), code `prefill_worker_failed_to_start` / `decode_worker_failed_to_start`
    (`prefill_stream_error` once the vLLM prefill's stream had started), message
    "<Leg> worker failed to start: <engine message>". `pd_answer`: (status, code, the
    decode row's gate outcome: a prefill's failure is not the decode's, CLIENT_LEFT)."""

    def __init__(self, error: EngineError, leg: str) -> None:
        started = not error.before_first_token
        if leg == "prefill" and started:
            code, words = "prefill_stream_error", "Prefill stream error"
        else:
            code, words = f"{leg}_worker_failed_to_start", f"{leg.title()} worker failed to start"
        super().__init__(error.code, f"{words}: {error.message}", before_first_token=True)
        outcome = CLIENT_LEFT if leg == "prefill" else _outcome(error)
        self.pd_answer = (_status(error), code, outcome)


def batch_outcome(so_far: int, outcome: int) -> int:
    """The prefill leg's gate outcome over a batch's prompts, one more ended with
    `outcome`: a failure wins (the first one: the batch fails as that prompt would
    alone), then an answer (200), then CLIENT_LEFT (the start: the leg said nothing)."""
    if so_far not in (200, CLIENT_LEFT):
        return so_far
    if outcome == CLIENT_LEFT:
        return so_far
    return outcome


def leg_error(error: EngineError, leg: str) -> EngineError:
    """`error` of the `leg` ("prefill" / "decode") as 1.13 answers it (LegError); a
    decode error after its first output stays as is (the stream's own error path)."""
    if leg == "decode" and not error.before_first_token:
        return error
    return LegError(error, leg)


# --- routing: PDRouter's rows, gRPC's exchange ----------------------------------------------


def handle(
    front: GrpcFront,
    conn: ClientConnection,
    request: Request,
    body: dict[str, Any],
    model: Any,
    started: float = 0.0,
    queued: bool = False,
) -> bool | None:
    """Take a PD request whose prefill/decode workers are gRPC (True); None leaves it to
    the HTTP PD path. Called by PDRouter.proxy once the body parsed and the rows are fresh.

    With prefill admission on (1.13 gates gRPC PD's prefill selection too), a request
    that finds every gRPC prefill worker at its cap waits in the PD router's gateway-wide
    queue (PrefillAdmission.wait: size, timeout, 429s, metrics), and False is what a
    request from that queue (`queued`) gets while there is still no slot. Otherwise a
    slot is reserved here on a free prefill row (so the tokenization in between cannot
    lose it to another request) and PdPlan.choose trades it for the policy's pick."""
    from smg.grpc.frontend import GENERATE_KINDS, GrpcExchange

    app = front.app
    router = app.pd
    kind = GENERATE_KINDS.get(request.path)
    if router is None or kind is None:
        return None
    entries = app.state.entries
    rows = [row for row in sorted(front.pd_rows) if row in entries]
    if not rows:
        return None
    reserved: tuple[int, int] | None = None
    admission = router.admission
    if admission is not None:
        grpc_rows = front.pd_rows
        prefill_rows = [r for r in router._rows("prefill", model) if r in grpc_rows]
        if prefill_rows:  # none ready: choose's 503, as without admission
            for row in admission.free(prefill_rows):
                generation = entries[row].generation
                if admission.take(row, generation):
                    reserved = (row, generation)
                    break
            if reserved is None:
                if queued:
                    return False
                admission.wait(conn, request, started, body)
                return True
    rows.sort(key=lambda row: entries[row].spec.worker_type != "decode")  # decode first
    exchange = GrpcExchange(front, conn, request, kind, body, model, rows)
    plan = exchange.pd = PdPlan(exchange)
    plan.reserved = reserved
    conn.exchange = exchange  # type: ignore[assignment]
    app.active.add(exchange)  # type: ignore[arg-type]
    exchange.task = app.loop.create_task(exchange.run())
    app.tasks.add(exchange.task)
    exchange.task.add_done_callback(app.tasks.discard)
    exchange.task.add_done_callback(plan.ended)
    return True


class PdPlan:
    """One exchange's PD attempts: which prefill goes with its decode worker."""

    def __init__(self, exchange: GrpcExchange) -> None:
        self.exchange = exchange
        self.prefill: DirectoryEntry | None = None
        self.clients: list[PdClient] = []
        self.failed: list[int] = []  # prefill rows a retried attempt's prefill leg failed on
        # An admission slot taken by `handle` (row, generation), until choose uses it.
        self.reserved: tuple[int, int] | None = None
        # The decode row (row, generation) the chosen attempt waits on for a slot in its
        # running window (smg.dataplane.pd_window), until `client` hands it to the PdClient.
        self.held: tuple[int, int] | None = None

    def ended(self, _task: object) -> None:
        """The exchange's task ended: a prefill chosen (and counted in flight) whose leg
        never started (the attempt failed before its Generate) is released, and a
        reserved admission slot never used (the request failed before its attempt)."""
        for client in self.clients:
            client._unstarted_end()
            client._unhold()
        held, self.held = self.held, None
        if held is not None:  # chosen, never handed to a client
            self.exchange.app.gate.record(*held, CLIENT_LEFT)  # the claim, unused
        self._release()

    def _release(self) -> None:
        reserved = self.reserved
        if reserved is None:
            return
        self.reserved = None
        app = self.exchange.app
        app._in_flight_done(*reserved)
        router = app.pd
        if router is not None and router.admission is not None:
            router.admission.freed()

    def _admit(self, router: Any, rows: list[int], route: Any) -> int:
        """The prefill row under admission, counted by PrefillAdmission.take: the policy's
        pick among the rows with a free slot (and the reserved one); the reservation
        when the pick's slot is gone meanwhile; -1 when none (a retry: 503, as HTTP's)."""
        app = self.exchange.app
        admission = router.admission
        entries = app.state.entries
        reserved = self.reserved
        candidates = admission.free(rows)
        if reserved is not None and reserved[0] in rows and reserved[0] not in candidates:
            candidates.append(reserved[0])
        if reserved is not None and reserved[0] not in rows:
            self._release()  # its worker left the ready rows meanwhile
            reserved = None
        if not candidates:
            return -1
        row = router._choose(router.prefill_policy, candidates, route)
        if row < 0:
            return -1
        if reserved is not None and row == reserved[0]:
            self.reserved = None  # the slot is the leg's now
            return row
        generation = entries[row].generation
        if admission.take(row, generation):
            self._release()
            return row
        app.gate.record(row, generation, CLIENT_LEFT)  # the claim, unused
        if reserved is not None and app.gate.claim(reserved[0]):  # through the gate too
            self.reserved = None
            return reserved[0]
        return -1  # (a reservation left is released when the exchange ends)

    def choose(self) -> DirectoryEntry:
        """A prefill and a decode row for the next attempt; the decode is the exchange's
        attempt (its accounting as _next_worker's), the prefill a leg of its own."""
        from smg.grpc.frontend import _Refused

        ex = self.exchange
        app = ex.app
        router = app.pd
        assert router is not None and ex.route is not None
        route = ex.route
        state = app.refresh()
        if router.routing_generation != state.routing_generation:
            router._rebuild(state)
        grpc_rows = ex.front.pd_rows
        prefill_rows = _prefer(
            [r for r in router._rows("prefill", route.model) if r in grpc_rows], self.failed
        )
        decode_rows = _prefer(
            [r for r in router._rows("decode", route.model) if r in grpc_rows], ex.failed_rows
        )
        refusal = router._no_pair(prefill_rows, decode_rows)
        if refusal is not None:
            raise _Refused(*_refusal(router, route.model, prefill_rows, decode_rows, refusal), b"")
        admission = router.admission
        if admission is None:
            prefill = router._choose(router.prefill_policy, prefill_rows, route)
        else:
            prefill = self._admit(router, prefill_rows, route)
        if prefill < 0:
            raise _Refused(
                503,
                "server_selection_failed",
                "No available servers: No available prefill workers "
                "(all circuits open or unhealthy)",
                b"",
            )
        p_entry = state.entries[prefill]
        window = router.window
        decode, admitted = window.pick(
            partial(router._choose, app.policy, route=route), decode_rows
        )
        if decode >= 0 and not admitted and window.wait <= 0:
            # --pd-admission-wait-secs 0: shed at once, nothing dispatched.
            router.leg_done(prefill, p_entry.generation, CLIENT_LEFT)
            app.gate.record(decode, state.entries[decode].generation, CLIENT_LEFT)
            raise _Refused(*window.shed(decode, route.model))
        if decode < 0:
            if admission is None:
                app.gate.record(prefill, p_entry.generation, CLIENT_LEFT)  # the claim, unused
            else:  # the slot goes back (leg_done: in flight, gate, the queue's turn)
                router.leg_done(prefill, p_entry.generation, CLIENT_LEFT)
            raise _Refused(
                503,
                "server_selection_failed",
                "No available servers: No available decode workers "
                "(all circuits open or unhealthy)",
                b"",
            )
        entry = state.entries[decode]
        ex.row = decode
        ex.generation = entry.generation
        ex.attempts += 1
        # The decode's in flight was counted by DecodeWindow.take when admitted; a held
        # leg counts nothing until PdClient._admit_decode takes its slot.
        ex.attempting = admitted
        if admitted:
            app.policy.on_dispatch(decode)
        else:
            self.held = (decode, entry.generation)
        if admission is None:  # else counted by PrefillAdmission.take
            app._in_flight_add(prefill, p_entry.generation)
        router.prefill_policy.on_dispatch(prefill)
        router.dispatched += 1
        self.prefill = p_entry
        if ex.trace is not None:  # one span for the pair's attempt, as on HTTP PD
            ex.trace.begin_attempt(entry.url)
            ex.trace.second_leg(p_entry.url)
        return entry

    def client(self, workers: Any, decode: DirectoryEntry) -> PdClient:
        p_entry = self.prefill
        assert p_entry is not None
        self.prefill = None
        ex = self.exchange
        prompts = len(ex.batch_rids or ()) or 1  # a batched completion's prompts share it
        client = PdClient(ex, workers.client(p_entry), workers.client(decode), p_entry, prompts)
        client.held, self.held = self.held, None
        self.clients.append(client)
        return client


class PdClient:
    """The engine client the exchange sees for one PD attempt: `generate_batches` runs
    both legs (SGLang: at once; vLLM: one after the other) and yields the decode's
    outputs; `abort` aborts both engines."""

    def __init__(
        self,
        exchange: GrpcExchange,
        prefill: Any,
        decode: Any,
        p_entry: DirectoryEntry,
        prompts: int = 1,
    ) -> None:
        self.exchange = exchange
        self.prefill = prefill
        self.decode = decode
        self.p_entry = p_entry
        self.backend: str = decode.backend
        self.runtime = "vllm" if self.backend == "vllm" else "sglang"  # 1.13's runtime label
        self.sent_at = 0.0  # the prefill's dispatch (smg_pd_* histograms start there)
        self.decode_sent_at = 0.0  # the decode's (smg_pd_decode_ttft_seconds starts there)
        self._leg_open = True  # the prefill leg's accounting is still to be done
        self.started = 0  # generate_batches calls that ran (their legs account themselves)
        # A batched completion runs one prefill per prompt (`prompts`) under the attempt's
        # one claim and in-flight count: the leg is done when the last of them ended, with
        # `_prefill_outcome` (batch_outcome) of them all.
        self._prefills = self._prefills_left = prompts
        self._prefill_outcome = CLIENT_LEFT
        self._prefills_running = 0
        # SGLang, by request id: the prefill's first GenerateComplete (its prompt
        # logprobs, merged into that prompt's decode answer as 1.13's merge_prefill_logprobs)
        self._prefill_first: dict[str, Any] = {}
        # The decode row (row, generation) whose running window this attempt's decode
        # leg waits on (PdPlan.choose found no slot); None: admitted.
        self.held: tuple[int, int] | None = None

    def _leg_done(self, outcome: int) -> None:
        if not self._leg_open:
            return
        self._leg_open = False
        plan = self.exchange.pd
        if outcome != 200 and outcome != CLIENT_LEFT and plan is not None:
            plan.failed.append(self.p_entry.row)
        app = self.exchange.app
        router = app.pd
        if router is not None:
            router.leg_done(self.p_entry.row, self.p_entry.generation, outcome, dispatched=True)

    def _prefill_ended(self, outcome: int) -> None:
        """One prompt's prefill leg ended with `outcome`."""
        self._prefill_outcome = batch_outcome(self._prefill_outcome, outcome)
        self._prefills_left -= 1
        if self._prefills_left <= 0:
            self._leg_done(self._prefill_outcome)

    def _unstarted_end(self) -> None:
        """The exchange ended: the prompts whose prefill leg never started end as
        CLIENT_LEFT (a started one ends itself, maybe later: a prefill let finish)."""
        unstarted, self.started = self._prefills - self.started, self._prefills
        for _ in range(unstarted):
            self._prefill_ended(CLIENT_LEFT)

    def _unhold(self) -> None:
        """The attempt ended before its held decode leg asked for a slot (vLLM: the
        prefill failed first; or it never started): the decode's gate claim, unused, is
        recorded (every claim once: a half-open breaker's trial is accounted)."""
        held, self.held = self.held, None
        if held is not None:
            self.exchange.app.gate.record(*held, CLIENT_LEFT)

    async def _admit_decode(self, prefill: asyncio.Future[None] | None) -> bool:
        """Wait (DecodeWindow.hold) until the held decode leg has a slot: True once taken
        (accounted as PdPlan.choose does for an admitted one); False when the prefill leg
        failed meanwhile (its error is the answer); the shed's 503 raised as _Refused."""
        held = self.held
        if held is None:
            return True
        self.held = None
        from smg.grpc.frontend import _Refused

        ex = self.exchange
        app = ex.app
        router = app.pd
        assert router is not None
        window = router.window
        row, generation = held
        verdict: asyncio.Future[bool] = app.loop.create_future()

        def settle(admitted: bool) -> None:
            if not verdict.done():
                verdict.set_result(admitted)

        hold = window.hold(row, generation, partial(settle, True), partial(settle, False))
        try:
            waiting: set[asyncio.Future[Any]] = {verdict}
            if prefill is not None:
                waiting.add(prefill)
            while not verdict.done():
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if prefill is not None and prefill.done() and not verdict.done():
                    if prefill.cancelled() or prefill.exception() is not None:
                        return False
                    waiting = {verdict}  # the prefill ended well: the decode still waits
            if verdict.result():
                ex.attempting = True
                app.policy.on_dispatch(row)
                return True
        finally:
            if not verdict.done():  # ended while held (prefill failed, client gone)
                window.release(hold)
                app.gate.record(row, generation, CLIENT_LEFT)  # the claim, unused
            elif verdict.result() and not ex.attempting:
                # Admitted (its slot counted), then cancelled before this task resumed:
                # the slot goes back.
                app._in_flight_done(row, generation)
                app.gate.record(row, generation, CLIENT_LEFT)
        app.gate.record(row, generation, CLIENT_LEFT)
        raise _Refused(*window.shed(row, ex.route_model))

    async def abort(self, request_ids: list[str]) -> None:
        calls = [self.decode.abort(request_ids)]
        if self._prefills_running:
            calls.append(self.prefill.abort(request_ids))
        await asyncio.gather(*calls, return_exceptions=True)

    def _prefill_ranked(self, req: GenerateInput) -> GenerateInput:
        """The prefill leg's request: with --dp-aware its own rank worker's rank (the
        decode's request carries the decode's), as 1.13's execute_parallel_pd sets
        data_parallel_rank on each leg."""
        return dataclasses.replace(req, dp_rank=self.p_entry.dp_rank)

    def generate_batches(
        self, req: GenerateInput, *, timeout: float | None
    ) -> AsyncIterator[list[Any]]:
        if self.backend == "vllm":
            return self._sequential(req, timeout)
        return self._parallel(req, timeout)

    # --- vLLM: prefill, then decode --------------------------------------------------------

    async def _sequential(
        self, req: GenerateInput, timeout: float | None
    ) -> AsyncIterator[list[Any]]:
        from smg.grpc.frontend import _batches

        self.started += 1
        info = self.p_entry.grpc
        labels = self.p_entry.spec.labels
        host = worker_address(self.p_entry.url).host
        # 1.13 (create_worker.rs): the worker's kv_connector / kv_engine_id labels take
        # precedence over what GetServerInfo discovered.
        mode = kv_mode(
            labels.get("kv_connector") or (info.kv_connector if info else ""),
            host,
            self.p_entry.spec.bootstrap_port,
            labels.get("kv_engine_id") or (info.kv_engine_id if info else ""),
        )
        n = req.sampling.n
        transfer_id = transfer_id_for(mode, n)
        returned: str | None = None
        self._prefills_running += 1
        self.sent_at = time.monotonic()
        try:
            preq = self._prefill_ranked(vllm_prefill_input(req, mode, transfer_id))
            outputs = _batches(self.prefill, preq, timeout)
            try:
                async for outs in outputs:
                    for out in outs:
                        if out.kv_transfer_params_json:
                            returned = out.kv_transfer_params_json
            finally:
                with contextlib.suppress(Exception):
                    await outputs.aclose()  # type: ignore[attr-defined]
        except EngineError as error:
            self._prefill_ended(_outcome(error))
            self._unhold()  # the decode leg will not go
            raise leg_error(error, "prefill") from None
        except BaseException:
            self._prefill_ended(CLIENT_LEFT)
            self._unhold()
            raise
        finally:
            self._prefills_running -= 1
        self._prefill_ended(200)
        prefill_s = time.monotonic() - self.sent_at
        if mode.kind == "nixl" and returned is None and n <= 1:
            log.warning(
                "vLLM PD (NIXL): prefill %s returned no kv_transfer_params; the decode "
                "recomputes the prompt",
                self.p_entry.url,
            )
        await self._admit_decode(None)
        dreq = dataclasses.replace(
            req, kv_transfer_params_json=vllm_decode_params(mode, returned, transfer_id, n)
        )
        decode = _batches(self.decode, dreq, timeout)
        # The decode call goes out on the first read below; 1.13's relay window ends at its
        # send, so it is the gateway's own work between the legs (the engines' KV transfer
        # falls in the decode phase, which starts here).
        self.decode_sent_at = time.monotonic()
        relay_s = self.decode_sent_at - self.sent_at - prefill_s
        first = True
        try:
            async for outs in decode:
                if first:  # decode established: 1.13 records its success-only PD metrics
                    first = False
                    router = self.exchange.app.pd
                    if router is not None:
                        router.kv_modes[mode.kind] = router.kv_modes.get(mode.kind, 0) + 1
                    self._observe("prefill", prefill_s)
                    self._observe("relay", relay_s)
                    self._first_token(req.stream)
                yield outs
        except EngineError as error:
            raise leg_error(error, "decode") from None
        finally:
            with contextlib.suppress(Exception):
                await decode.aclose()  # type: ignore[attr-defined]

    # --- SGLang: both at once ----------------------------------------------------------------

    async def _parallel(
        self, req: GenerateInput, timeout: float | None
    ) -> AsyncIterator[list[Any]]:
        from smg.grpc.frontend import _batches

        self.started += 1
        port = self.p_entry.spec.bootstrap_port or DEFAULT_BOOTSTRAP_PORT
        host = worker_address(self.p_entry.url).host
        sreq = dataclasses.replace(req, disaggregated=(host, port, new_room()))
        self._prefills_running += 1
        self.sent_at = self.decode_sent_at = time.monotonic()  # both legs at once
        preq = self._prefill_ranked(sreq)
        prefill = asyncio.ensure_future(
            self._drain(_batches(self.prefill, preq, timeout), req.request_id)
        )
        decode = _batches(self.decode, sreq, timeout)
        if req.stream:  # the 1.13 binary: TTFT for streamed answers only
            decode = _ttft(self, decode)
        ok = False
        try:
            # A held decode leg waits here, the prefill running (False: it failed meanwhile,
            # and the loop below is skipped for its error).
            await self._admit_decode(prefill)
            while not prefill.done():
                # Until the prefill ends, each decode read races it: a prefill that fails
                # ends the request at once instead of leaving the decode waiting for KV.
                step = asyncio.ensure_future(decode.__anext__())
                await asyncio.wait((step, prefill), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    if prefill.exception() is None:  # the prefill ended well: keep reading
                        try:
                            outs = await step
                        except StopAsyncIteration:
                            ok = True
                            return
                        yield await self._merged(req, outs, prefill)
                        break
                    step.cancel()
                    with contextlib.suppress(BaseException):
                        await step
                    break
                try:
                    outs = step.result()
                except StopAsyncIteration:
                    ok = True
                    return
                yield await self._merged(req, outs, prefill)
            error = prefill.exception() if prefill.done() else None
            if error is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.decode.abort([req.request_id]), 5.0)
                if isinstance(error, EngineError):
                    raise leg_error(error, "prefill")
                raise error
            async for outs in decode:
                yield await self._merged(req, outs, prefill)
            ok = True
        except LegError:
            raise
        except EngineError as error:
            raise leg_error(error, "decode") from None
        finally:
            with contextlib.suppress(Exception):
                await decode.aclose()  # type: ignore[attr-defined]
            if not prefill.done():
                if ok:  # answered: a prefill still open gets a moment, off the answer's path
                    self.exchange.app.spawn(self._stop_prefill(prefill, req.request_id, True))
                else:  # the decode failed or the client left: the prefill goes now
                    await self._stop_prefill(prefill, req.request_id, False)

    async def _merged(
        self, req: GenerateInput, outs: list[Any], prefill: asyncio.Future[None]
    ) -> list[Any]:
        """The decode's outputs with the prefill's prompt logprobs when the client asked
        for logprobs (1.13: the prefill's Complete's input_logprobs, when it has some,
        replace the decode's): on the finished ones, and when streaming on every one
        (1.13 reads the prefill's Complete before it streams the decode, so each chunk
        carries them). The decode's output may come before the prefill's Complete was
        read: wait for it (bounded)."""
        if req.sampling.logprobs is None or not (req.stream or any(o.finished for o in outs)):
            return outs
        if not prefill.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(prefill), PREFILL_DRAIN_S)
        first = self._prefill_first.get(req.request_id)
        if first is not None and first.input_logprobs is not None:
            for o in outs:
                if o.finished or req.stream:
                    o.input_logprobs = first.input_logprobs
        return outs

    def _observe(self, which: str, seconds: float) -> None:
        """One of the PD router's histograms (prefill, relay, decode_ttft, ttft: the
        smg_pd_* families) with this runtime's label, keyed (model, runtime); summed over
        processes by the reader."""
        router = self.exchange.app.pd
        if router is None:
            return
        hists = {
            "prefill": router.prefill_durations,
            "relay": router.kv_transfers,
            "decode_ttft": router.decode_ttfts,
            "ttft": router.ttfts,
        }[which]
        asked = self.exchange.body.get("model")
        model = asked if isinstance(asked, str) and asked else self.exchange.route_model
        router.observe(hists, (model or "unknown", self.runtime), seconds)

    def _first_token(self, stream: bool) -> None:
        """The decode's first output: 1.13 observes the TTFTs for streamed answers only."""
        if stream:
            now = time.monotonic()
            self._observe("ttft", now - self.sent_at)
            self._observe("decode_ttft", now - self.decode_sent_at)

    async def _stop_prefill(self, prefill: asyncio.Future[None], rid: str, grace: bool) -> None:
        if grace:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(prefill), PREFILL_DRAIN_S)
        if prefill.done():
            return
        prefill.cancel()
        with contextlib.suppress(BaseException):
            await prefill
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.prefill.abort([rid]), 5.0)

    async def _drain(self, outputs: AsyncIterator[list[Any]], rid: str) -> None:
        """The SGLang prefill leg: read to its end (its outputs are not the answer)."""
        try:
            async for outs in outputs:
                if self._prefill_first.get(rid) is None:
                    self._prefill_first[rid] = next((o for o in outs if o.finished), None)
        except EngineError as error:
            self._prefill_ended(_outcome(error))
            raise
        except BaseException:
            self._prefill_ended(CLIENT_LEFT)
            raise
        finally:
            self._prefills_running -= 1
            with contextlib.suppress(Exception):
                await outputs.aclose()  # type: ignore[attr-defined]
        self._prefill_ended(200)


async def _ttft(client: PdClient, outputs: AsyncIterator[list[Any]]) -> AsyncIterator[list[Any]]:
    """The SGLang decode's outputs; the first one observes smg_pd_ttft_seconds and
    smg_pd_decode_ttft_seconds (1.13: from the prefill's / decode's dispatch, the same
    moment here, to the first decode token, streamed answers only; the parallel path has
    no prefill duration, relay window or connector mode: 1.13 records none there)."""
    first = True
    try:
        async for outs in outputs:
            if first:
                first = False
                client._first_token(True)
            yield outs
    finally:
        with contextlib.suppress(Exception):
            await outputs.aclose()  # type: ignore[attr-defined]


def _refusal(
    router: Any, model: str | None, prefill_rows: list[int], decode_rows: list[int], refusal: str
) -> tuple[int, str, str]:
    """The 503 when a side has no ready gRPC worker. When that side's ready workers all
    speak HTTP (a mixed fleet: 1.13 pairs gRPC legs only with gRPC legs and HTTP with HTTP,
    router_manager.rs; smg does the same), 1.13's no_available_workers words, with the
    mismatch named (1.13's message stops at "the pair is incomplete")."""
    for kind, rows in (("prefill", prefill_rows), ("decode", decode_rows)):
        if not rows and router._rows(kind, model):
            other = "decode" if kind == "prefill" else "prefill"
            return (
                503,
                "no_available_workers",
                f"No {kind} worker is registered for model '{model or 'unknown'}' at the "
                "moment (its other leg is): the pair is incomplete; the ready "
                f"{kind} workers speak HTTP and a gRPC {other} pairs only with a gRPC {kind} "
                "(mixed HTTP/gRPC prefill-decode pairs are not supported)",
            )
    return 503, "server_selection_failed", refusal


def _prefer(rows: list[int], failed: list[int] | None) -> list[int]:
    """A retry's rows: those no earlier attempt failed on, else all of them (1.13 runs the
    whole pipeline again and may pick the same pair: with one prefill and one decode, a
    503 retried succeeds on the binary)."""
    if not failed:
        return rows
    return [row for row in rows if row not in failed] or rows


def _status(error: EngineError) -> int:
    """The HTTP status of a leg's gRPC code (1.13's tonic_ext http_status: INVALID_ARGUMENT
    400, UNAVAILABLE 503, RESOURCE_EXHAUSTED 429, INTERNAL 500, ...)."""
    from smg.grpc.protos import http_status_for

    return http_status_for(error.code)[0]


def _outcome(error: EngineError) -> int:
    """The gate's outcome for a failed leg: 0 (transport) for UNAVAILABLE, else the status."""
    return 0 if error.code == "UNAVAILABLE" else _status(error)
