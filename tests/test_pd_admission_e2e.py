"""Issue 17 leftovers through `smg launch --processes 2 --pd-disaggregation` with the PD mocks
(tests/pdutil.py): the prefill queue bound held gateway-wide, --dp-aware with PD, the decode
running-window gauge, WASM modules on PD requests and answers."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests import mockutil, pdutil
from tests.gatewayutil import interleaved, pinned_clients, wait_until
from tests.test_pd_e2e import GENERATE


def test_prefill_queue_bound_holds_across_processes() -> None:
    # One prefill slot (held 4 s by the first request) and a queue of ONE for the whole
    # gateway: of eight requests behind it, on their own connections (taking turns by
    # process), exactly one waits and is served; seven are refused at once. With a
    # per-process bound each process would queue one (two served, six refused). The hold
    # is long so that on a loaded box every one of the eight arrives while the first still
    # holds the slot (at 1.5 s a late one found the queue empty again and was served).
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=10) as decode,
        pdutil.pd_gateway(prefill, decode, *pdutil.admission_args(10, queue_size=1)) as gateway,
        pinned_clients(gateway.url, 5) as pinned,
    ):
        pdutil.set_faults(prefill.url, ttft_ms=4000)
        delays = [0.0] + [0.4] * 8
        clients = interleaved(pinned)[: len(delays)]
        answers = pdutil.staggered_posts(gateway.url, "/generate", GENERATE, delays, clients)
        assert answers[0].status_code == 200
        behind = answers[1:]
        # The refusals came from both processes: the bound is not one process's.
        assert {a.headers.get("x-smg-process", "") for a in behind} == {"0", "1"}
        assert sorted(a.status_code for a in behind) == [200] + [429] * 7
        refused = [a for a in behind if a.status_code == 429]
        assert {a.json()["error"]["code"] for a in refused} == {pdutil.QUEUE_FULL[0]}
        assert all(a.elapsed.total_seconds() < 1.0 for a in refused)
        assert mockutil.stats(prefill.url)["peak_in_flight"] == 1


def _ready_workers(base: str, count: int) -> list[dict[str, Any]] | None:
    workers = httpx.get(base + "/workers", timeout=5).json()["workers"]
    ready = [w for w in workers if w["status"] == "ready"]
    return workers if len(ready) == count == len(workers) else None


def test_dp_aware_pd_legs_carry_1_13s_rank_fields() -> None:
    # A prefill and a decode engine of dp_size 2 each: four url@rank workers; the prefill
    # leg carries `routed_dp_rank`, the decode leg `routed_dp_rank` and
    # `disagg_prefill_dp_rank` (the 1.13 binary's fields; the mocks count the routed rank
    # and answer 400 for one outside [0, 2)).
    with (
        pdutil.start_prefill(1, "--dp-size", "2") as prefill,
        pdutil.start_decode(1, "--dp-size", "2", wait_s=5) as decode,
        pdutil.pd_gateway(prefill, decode, "--dp-aware", "--policy", "round_robin") as gateway,
    ):
        workers = wait_until(lambda: _ready_workers(gateway.url, 4), 20, "four rank workers")
        view = sorted((w["url"], w["worker_type"], w.get("dp_rank")) for w in workers)
        assert view == sorted(
            [(f"{prefill.url}@{r}", "prefill", r) for r in range(2)]
            + [(f"{decode.url}@{r}", "decode", r) for r in range(2)]
        )
        with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
            statuses = [client.post("/generate", json=GENERATE).status_code for _ in range(8)]
        assert statuses == [200] * 8
        # round_robin in one process: each side's two ranks took turns.
        assert mockutil.stats(prefill.url)["requests_by_dp_rank"] == {"0": 4, "1": 4}
        assert mockutil.stats(decode.url)["requests_by_dp_rank"] == {"0": 4, "1": 4}
        sent = mockutil.stats(decode.url)["last_request"]
        body = orjson.loads(base64.b64decode(sent["body_b64"]))
        assert body["disagg_prefill_dp_rank"] in (0, 1)
        assert body["routed_dp_rank"] in (0, 1)
        assert "data_parallel_rank" not in body
        last_prefill = mockutil.stats(prefill.url)["last_request"]
        p_body = orjson.loads(base64.b64decode(last_prefill["body_b64"]))
        assert p_body["bootstrap_room"] == body["bootstrap_room"]
        assert p_body["routed_dp_rank"] == body["disagg_prefill_dp_rank"]
        assert "disagg_prefill_dp_rank" not in p_body


def test_decode_running_window_gauge_as_1_13() -> None:
    # 1.13 announces each decode worker's running window (/server_info
    # max_running_requests) as smg_pd_admission_window{worker}; the prefill has none.
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(1, "--max-running-requests", "7") as decode,
        pdutil.pd_gateway(prefill, decode) as gateway,
    ):
        wanted = f'smg_pd_admission_window{{worker="{decode.url}"}} 7'

        def gauge() -> str | None:
            text = gateway.metrics()
            return text if wanted in text else None

        text = wait_until(gauge, 10, "the window gauge")
        lines = [line for line in text.splitlines() if line.startswith("smg_pd_admission_window")]
        assert lines == [wanted]


def test_wasm_modules_run_on_pd_requests_and_answers(tmp_path: Path) -> None:
    # An OnRequest module tags the request (both legs carry the header: the mocks keep
    # the last request's headers) and an OnResponse module tags the decode's answer.
    from tests.test_wasm_e2e import _add, _guest, _set_header

    tagger = tmp_path / "tagger.wasm"
    tagger.write_text(_guest("x-wasm-tag", "on", on_request=_set_header("x-wasm-tag", "on")))
    logger = tmp_path / "logger.wasm"
    logger.write_text(
        _guest("x-smg-wasm-logged", "1", on_response=_set_header("x-smg-wasm-logged", "1"))
    )
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=5) as decode,
        pdutil.pd_gateway(prefill, decode, "--enable-wasm") as gateway,
        pinned_clients(gateway.url, 2) as pinned,
    ):
        added = _add(
            gateway, [("tagger", tagger, ("OnRequest",)), ("logger", logger, ("OnResponse",))]
        )
        assert added.status_code == 200, added.text

        def tagged() -> httpx.Response | None:
            # Two connections on each process: both must have loaded the modules.
            answers = [client.post("/generate", json=GENERATE) for client in interleaved(pinned)]
            served = [a.headers.get("x-smg-process") for a in answers]
            done = all(a.headers.get("x-smg-wasm-logged") == "1" for a in answers)
            assert served == ["0", "1"] * 2, served
            return answers[-1] if done else None

        answer = wait_until(tagged, 10, "the OnResponse module on PD answers")
        assert answer.status_code == 200
        assert answer.json()["text"] == "The quick brown"
        for mock in (prefill, decode):
            assert mockutil.stats(mock.url)["last_request"]["header_map"]["x-wasm-tag"] == "on"
