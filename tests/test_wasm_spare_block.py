"""smg.wasm._fastcall keeps one argument block between calls (no malloc and free of a few KiB
per call): a module must still see exactly its own request, whatever the sizes before it (a
block kept from a smaller or larger request, one over the kept size) and with calls on other
threads running while one is in wasm (they must not share the block)."""

from __future__ import annotations

import threading
from typing import Any

from test_wasm_fastcall import _pair
from test_wasm_runtime import ECHO_REQUEST, guest

from smg.wasm.types import Limits, Modify

LIMITS = Limits(max_body_bytes=2 * 1024 * 1024)


def _expected(slow: Any, args: tuple[Any, ...]) -> Any:
    """The ctypes path's answer: no C block at all."""
    return slow.on_request_raw(*args)


def test_every_size_order_sees_its_own_request() -> None:
    fast, slow = _pair(guest(on_request=ECHO_REQUEST), LIMITS)
    # Under, at and over the kept block's bounds (16 KiB first, 256 KiB most), growing and
    # shrinking, each body and header set different, so a stale byte would show.
    sizes = [0, 10, 16 * 1024, 300 * 1024, 100, 20 * 1024, 5, 256 * 1024, 40 * 1024, 1, 0]
    for i, size in enumerate(sizes):
        body = bytes((i * 7 + k) % 251 for k in range(size))
        headers = [(b"x-call", str(i).encode())] * (1 + i % 5)
        args = (b"POST", f"/c{i}", f"n={size}", headers, body, f"r{i}".encode(), i)
        got = fast.on_request_raw(*args)
        assert isinstance(got, Modify) and got.body_replace == body, i
        assert got == _expected(slow, args), i


def test_calls_on_threads_never_share_a_block() -> None:
    """Four threads on one runner: while one runs wasm (GIL released) the others lower their
    own requests; every answer echoes exactly its own."""
    fast, _ = _pair(guest(on_request=ECHO_REQUEST), LIMITS)
    errors: list[str] = []

    def work(t: int) -> None:
        for i in range(60):
            body = f"thread {t} call {i} ".encode() * (1 + (i * 37) % 900)
            headers = [(b"x-t", str(t).encode()), (b"x-i", str(i).encode())]
            got = fast.on_request_raw(
                b"POST", f"/t{t}", f"i={i}", headers, body, f"r{t}-{i}".encode(), i
            )
            if (
                not isinstance(got, Modify)
                or got.body_replace != body
                or got.headers_add != [("x-t", str(t)), ("x-i", str(i))]
                or ("x-path", f"/t{t}") not in got.headers_set
            ):
                errors.append(f"{t}/{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    assert errors == []
