"""Routes for end-to-end tests only, installed when `SMG__TEST_HOOKS=1` is set.

Absent otherwise: `install` is never called, and `DataPlane.handle` stays the plain
method (no check on the request path costs anything). `SMG__*` is smg's plumbing
namespace, never read as a setting.

- `POST /__smg_test/block_loop?seconds=N` blocks this process's event loop for N seconds
  (`time.sleep`), as a stuck handler would: its heartbeat stops and the supervisor dumps
  and replaces it. No answer is sent before the block ends.
- `SMG__TEST_FAIL_START_FILE=PATH`: a data-plane process fails at start-up while PATH
  exists (a live reload whose new processes cannot start).
- `SMG__TEST_RAISE_AFTER_CONNECT_FILE=PATH`: while PATH exists, a proxied request's
  connect task raises RuntimeError after the connect, just before the request is written
  (where a closed uvloop handle raised in the CI hang): the guard's 500 end to end.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from smg.dataplane.app import DataPlane
    from smg.dataplane.server import ClientConnection, Request

PREFIX = "/__smg_test/"
FAIL_START_ENV = "SMG__TEST_FAIL_START_FILE"
RAISE_AFTER_CONNECT_ENV = "SMG__TEST_RAISE_AFTER_CONNECT_FILE"


def fail_start_if_asked() -> None:
    marker = os.environ.get(FAIL_START_ENV)
    if marker and os.path.exists(marker):
        raise RuntimeError(f"test hook: {marker} exists")


def install(app: DataPlane) -> None:
    plain = app.handle

    def handle(conn: ClientConnection, request: Request) -> None:
        if request.path.startswith(PREFIX):
            _test_route(app, conn, request)
            return
        plain(conn, request)

    app.handle = handle  # type: ignore[method-assign]
    marker = os.environ.get(RAISE_AFTER_CONNECT_ENV)
    if marker:
        _raise_after_connect(marker)


def _raise_after_connect(marker: str) -> None:
    """Wrap this process's UpstreamConnection.bind (called by the connect task right
    before the write) to raise while `marker` exists."""
    from smg.dataplane.upstream import UpstreamConnection

    bind = UpstreamConnection.bind

    def bind_or_raise(self: UpstreamConnection, exchange: Any) -> None:
        if os.path.exists(marker):
            raise RuntimeError(f"test hook: {marker} exists")
        bind(self, exchange)

    UpstreamConnection.bind = bind_or_raise  # type: ignore[method-assign]


def _test_route(app: DataPlane, conn: ClientConnection, request: Request) -> None:
    app._request_id(request)
    if request.path == PREFIX + "block_loop" and request.method == b"POST":
        try:
            seconds = float(parse_qs(request.query).get("seconds", ["1"])[0])
        except ValueError:
            app._send_error(conn, request, 400, "invalid_request", "seconds must be a number")
            return
        time.sleep(min(max(seconds, 0.0), 600.0))
        app._send(conn, request, 200, b'{"blocked":true}')
        return
    app._send_error(conn, request, 404, "unknown_url", f"no test route {request.path}")
