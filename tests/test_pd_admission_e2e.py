"""PD admission held for the whole gateway (issue 17 leftovers) through `smg launch
--processes 2 --pd-disaggregation` with the PD mocks (tests/pdutil.py)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx

from tests import mockutil, pdutil
from tests.test_pd_e2e import GENERATE, pd_gateway


def test_prefill_queue_bound_holds_across_processes() -> None:
    # One prefill slot (held 1.5 s by the first request) and a queue of ONE for the whole
    # gateway: of eight requests behind it, on their own connections (spread over both
    # processes), exactly one waits and is served; seven are refused at once. With a
    # per-process bound each process would queue one (two served, six refused).
    with (
        pdutil.start_prefill() as prefill,
        pdutil.start_decode(wait_s=10) as decode,
        pd_gateway(
            prefill,
            decode,
            "--prefill-max-inflight-requests-per-worker",
            "1",
            "--prefill-queue-size",
            "1",
            "--prefill-queue-timeout-secs",
            "10",
        ) as gateway,
    ):
        pdutil.set_faults(prefill.url, ttft_ms=1500)

        def one(delay: float) -> tuple[int, str, str, float]:
            time.sleep(delay)
            with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
                began = time.monotonic()
                answer = client.post("/generate", json=GENERATE)
                code = answer.json()["error"]["code"] if answer.status_code != 200 else ""
                process = answer.headers.get("x-smg-process", "")
                return answer.status_code, code, process, time.monotonic() - began

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            results = list(pool.map(one, [0.0] + [0.4] * 8))
        assert results[0][0] == 200
        behind = results[1:]
        # The refusals came from both processes: the bound is not one process's.
        assert {process for _, _, process, _ in behind} == {"0", "1"}
        assert sorted(status for status, _, _, _ in behind) == [200] + [429] * 7
        refused = [r for r in behind if r[0] == 429]
        assert {code for _, code, _, _ in refused} == {"pd_prefill_queue_full"}
        assert all(seconds < 1.0 for _, _, _, seconds in refused)
        assert mockutil.stats(prefill.url)["peak_in_flight"] == 1
