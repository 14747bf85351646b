"""`smg.dataplane.app._answer_head`: the rule the admin answers use for turning a
(name, value) header list into `_send`'s content-type and extra lines."""

from smg.dataplane.app import _ADMIN_DROPPED, _answer_head


def test_admin_rule_keeps_framing_drops_request_id_and_reads_error_code() -> None:
    headers = [
        ("Content-Type", "text/plain"),
        ("X-Request-Id", "abc"),
        ("x-smg-error-code", "worker_not_found"),
        ("Content-Length", "5"),
        ("X-Extra", "v"),
    ]
    assert _answer_head(headers, _ADMIN_DROPPED) == (
        b"text/plain",
        b"x-smg-error-code: worker_not_found\r\nContent-Length: 5\r\nX-Extra: v\r\n",
        "worker_not_found",
    )


def test_no_headers_is_json_and_nothing_else() -> None:
    assert _answer_head([], _ADMIN_DROPPED) == (b"application/json", b"", "")
