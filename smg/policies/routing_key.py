"""Routing keys and target workers from request headers (pure).

Rust SMG 1.13 (routers/header_utils.rs): `X-SMG-Routing-Key` is the routing key,
`X-SMG-Target-Worker` names a worker; a value counts only when it is non-empty UTF-8
(an empty or undecodable header is as if absent). --routing-key-headers adds more
header names, checked in order after X-SMG-Routing-Key; the first valid value wins.
consistent_hashing without any routing key falls back to an implicit key from the
stable client headers (authorization, x-forwarded-for, cookie), then to random.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ROUTING_KEY_HEADER = b"x-smg-routing-key"
TARGET_WORKER_HEADER = b"x-smg-target-worker"
# consistent_hashing's implicit session key, in Rust's order.
IMPLICIT_KEY_HEADERS = (b"authorization", b"x-forwarded-for", b"cookie")
# Longer values are ignored (not an error): a key is an identifier, not a payload.
MAX_KEY_BYTES = 1024

HeaderGetter = Callable[[bytes], "bytes | None"]


def valid_value(raw: bytes | None) -> str | None:
    """A header value usable as a key: non-empty, at most MAX_KEY_BYTES, UTF-8."""
    if not raw or len(raw) > MAX_KEY_BYTES:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def key_headers(extra: Sequence[str] | None) -> tuple[bytes, ...]:
    """X-SMG-Routing-Key, then --routing-key-headers in order (lower-cased, no repeats)."""
    names = [ROUTING_KEY_HEADER]
    for name in extra or ():
        encoded = name.strip().lower().encode("latin-1")
        if encoded and encoded not in names:
            names.append(encoded)
    return tuple(names)


def routing_key(header: HeaderGetter, names: Sequence[bytes]) -> str | None:
    """The first valid value among `names`, or None."""
    for name in names:
        value = valid_value(header(name))
        if value is not None:
            return value
    return None


def implicit_key(header: HeaderGetter) -> str | None:
    """consistent_hashing's fallback session key (never logged or forwarded as a key)."""
    return routing_key(header, IMPLICIT_KEY_HEADERS)
