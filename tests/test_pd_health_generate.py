"""GET /health_generate on the HTTP PD router asks a pair, as 1.13's does (a prefill and a
decode at once): 200 text naming the pair, 503 health_generate_failed naming the leg that
failed. smg.dataplane.pd_health's wording directly, then through `smg launch --processes
2` with the PD mocks, and the same steps on the Rust SMG 1.13 binary."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from smg.dataplane.pd_health import NO_ANSWER, rust_debug, status_text, verdict
from tests import pdutil
from tests.gatewayutil import running_gateway

P, D = "http://127.0.0.1:1", "http://127.0.0.1:2"


def test_verdict_words_are_1_13s() -> None:
    assert verdict(P, 200, D, 200) == (
        200,
        f"Health generate passed on selected pair: prefill={P}, decode={D}",
    )
    assert verdict(P, 200, D, NO_ANSWER) == (
        503,
        "Health generate failed: "
        f'["Decode {D} error: error sending request for url ({D}/health_generate)"]',
    )
    assert verdict(P, 500, D, 503) == (
        503,
        "Health generate failed: "
        f'["Prefill {P} returned status 500 Internal Server Error", '
        f'"Decode {D} returned status 503 Service Unavailable"]',
    )


def test_status_text_and_rust_debug() -> None:
    assert status_text(599) == "599 <unknown status code>"
    assert rust_debug(['a "b"', "c\\d"]) == '["a \\"b\\"", "c\\\\d"]'
    assert rust_debug([]) == "[]"


# --- end to end ------------------------------------------------------------------------------

Answer = tuple[int, str, str, str]  # status, content type, x-smg-error-code, body


def _get(url: str) -> Answer:
    r = httpx.get(url + "/health_generate", timeout=30.0)
    return r.status_code, r.headers["content-type"], r.headers.get("x-smg-error-code", ""), r.text


def _scenario(
    gateway: Callable[[list[str]], contextlib.AbstractContextManager[str]], down: str
) -> list[Answer]:
    """/health_generate with the pair up, then with the `down` side's mock stopped; the
    mocks' URLs in the bodies read P and D."""
    with pdutil.start_prefill() as prefill, pdutil.start_decode(wait_s=5) as decode:
        with gateway([*prefill.prefill_args(), *decode.decode_args()]) as url:
            answers = [_get(url)]
            (decode if down == "decode" else prefill).stop()
            answers.append(_get(url))
        swap = ((prefill.urls[0], P), (decode.urls[0], D))
    out = []
    for status, ctype, code, body in answers:
        for real, alias in swap:
            body = body.replace(real, alias)
        out.append((status, ctype, code, body))
    return out


# The health checker and the breaker would take the stopped worker out of selection: off,
# so the probe reaches it (both gateways).
QUIET = ("--disable-health-check", "--disable-circuit-breaker", "--disable-retries")


@contextlib.contextmanager
def _smg(pd_args: list[str]) -> Iterator[str]:
    with running_gateway(["--pd-disaggregation", *pd_args, *QUIET], processes=2) as gateway:
        gateway.wait_ready(timeout=30)
        yield gateway.url


@contextlib.contextmanager
def _rust(pd_args: list[str]) -> Iterator[str]:
    with pdutil.rust_gateway(pd_args, *QUIET) as url:
        yield url


def _expected(down: str) -> list[Answer]:
    p_status, d_status = (NO_ANSWER, 200) if down == "prefill" else (200, NO_ANSWER)
    failed = verdict(P, p_status, D, d_status)[1]
    body = (
        '{"error":{"type":"server_error","code":"health_generate_failed","message":'
        + json.dumps(failed)
        + ',"param":null}}'
    )
    return [
        (200, "text/plain; charset=utf-8", "", verdict(P, 200, D, 200)[1]),
        (503, "application/json", "health_generate_failed", body),
    ]


@pytest.mark.parametrize("down", ["decode", "prefill"])
def test_smg_asks_the_pair(down: str) -> None:
    """Before this, smg relayed /health_generate to the first prefill only: its answer
    (the mock's) and a 200 with the decode down."""
    assert _scenario(_smg, down) == _expected(down)


@pytest.mark.skipif(not pdutil.RUST_SMG.exists(), reason="no Rust SMG 1.13 binary")
@pytest.mark.parametrize("down", ["decode", "prefill"])
def test_rust_answers_the_same(down: str) -> None:
    assert _scenario(_rust, down) == _expected(down)
