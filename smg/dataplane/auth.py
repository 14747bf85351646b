"""Client authentication on the data plane (`--api-key`): pure code, tested directly.

As in the Rust SMG 1.13, a client presents the key as `Authorization: Bearer <key>` (scheme
case-insensitive); smg also takes `x-api-key: <key>`, which the anthropic SDK sends (1.13
ignores that header). A Bearer credential, when there is one, is the one judged. Keys are
compared in constant time.
"""

from __future__ import annotations

import enum
import hmac


class Verdict(enum.IntEnum):
    OK = 0
    MISSING = 1  # no credential in a form the gateway reads
    INVALID = 2  # a credential, not the gateway's key


# The Rust SMG 1.13's answers (status 401, error code invalid_api_key), byte for byte.
MISSING_MESSAGE = "Missing API key: send it as `Authorization: Bearer <key>`"
INVALID_MESSAGE = "Invalid API key"
MISSING_CHALLENGE = b'www-authenticate: Bearer realm="data-plane"\r\n'
INVALID_CHALLENGE = b'www-authenticate: Bearer realm="data-plane", error="invalid_token"\r\n'


def presented_key(authorization: bytes | None, x_api_key: bytes | None) -> bytes | None:
    """The credential a request presents, or None."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer" and token:
            return token
    if x_api_key is not None:
        key = x_api_key.strip()
        if key:
            return key
    return None


def judge(accepted: tuple[bytes, ...], presented: bytes | None) -> Verdict:
    """OK when `presented` is one of the `accepted` keys (every key is compared, so the
    time taken does not tell which one matched)."""
    if presented is None:
        return Verdict.MISSING
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(key, presented)
    return Verdict.OK if matched else Verdict.INVALID
