"""Worker URLs: the one validator and the one parsed form (scheme, host, port).

Every way a worker enters smg (`--worker-urls`, a config file, `SMG_WORKER_URLS`,
`POST /workers`) goes through `parse_worker_url`; the health checks, the load monitor and
the data plane all address a worker through its `WorkerAddress`, so they cannot disagree
on where the worker is.

A path is a prefix of every route, as in the Rust SMG 1.13 (which concatenates the URL
with each route): `http://host:8000/prefix` gets its health checks at `/prefix/health` and
its requests at `/prefix/v1/...`, from the probes and the data plane alike. A trailing `/`
is dropped (the Rust SMG would send `//v1/...`).

Pure code: strings in, `WorkerAddress` or `WorkerUrlError` out.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

__all__ = [
    "WORKER_URL_SCHEMES",
    "WorkerAddress",
    "WorkerUrlError",
    "parse_worker_url",
    "valid_host",
    "worker_address",
]

WORKER_URL_SCHEMES: tuple[str, ...] = ("http", "https", "grpc", "grpcs")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TLS_SCHEMES = frozenset({"https", "grpcs"})


class WorkerUrlError(ValueError):
    """A refused worker URL; the message says why (callers add the setting's name)."""


class WorkerAddress(NamedTuple):
    """Where a worker is: what every component that talks to it uses."""

    url: str  # canonical form: as given, less a trailing "/"
    scheme: str  # http | https | grpc | grpcs
    host: str  # hostname or IP, IPv6 without brackets (what connect() takes)
    port: int  # explicit, or the scheme's default
    path: str = ""  # prefix of every route ("" or "/a/b", no trailing "/")

    @property
    def tls(self) -> bool:
        return self.scheme in _TLS_SCHEMES

    @property
    def host_header(self) -> str:
        """The `Host` header value: host, bracketed when IPv6, and the port unless default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if _DEFAULT_PORTS.get(self.scheme) == self.port:
            return host
        return f"{host}:{self.port}"


def parse_worker_url(url: object) -> WorkerAddress:
    """Validate a worker URL and return its parsed form, or raise WorkerUrlError.

    Scheme must be a lowercase http/https/grpc/grpcs (as in the Rust SMG); the host is
    required; gRPC URLs need an explicit port (no default); a trailing `/` is dropped;
    a path is kept as the prefix of every route; userinfo, a query and a fragment are
    refused (credentials belong in api_key).
    """
    if not isinstance(url, str) or not url:
        raise WorkerUrlError("worker URL must be a non-empty string")
    if url != url.strip() or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise WorkerUrlError(f"worker URL {url!r} contains whitespace or control characters")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in WORKER_URL_SCHEMES:
        if sep and scheme == "ipc":
            reason = "ipc:// (ZMQ) workers are not supported by smg"
        else:
            reason = "must start with a lowercase " + ", ".join(
                f"{s}://" for s in WORKER_URL_SCHEMES
            )
        raise WorkerUrlError(f"worker URL {url!r}: {reason}")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise WorkerUrlError(
            f"worker URL for host {parts.hostname!r}: credentials in the URL are not "
            "supported; pass the key as api_key"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise WorkerUrlError(f"worker URL {url!r} must not have a query or fragment")
    path = parts.path.rstrip("/")
    if path and not _PATH_RE.match(path):
        raise WorkerUrlError(
            f"worker URL {url!r} has a path with characters a request target cannot carry"
        )
    if path and scheme.startswith("grpc"):
        raise WorkerUrlError(f"worker URL {url!r}: a gRPC worker URL cannot have a path")
    host = parts.hostname
    if not host:
        raise WorkerUrlError(f"worker URL {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise WorkerUrlError(f"worker URL {url!r} has an invalid port") from None
    if port is None:
        default = _DEFAULT_PORTS.get(scheme)
        if default is None:
            raise WorkerUrlError(f"worker URL {url!r} needs an explicit port (host:port)")
        port = default
    if port == 0:
        raise WorkerUrlError(f"worker URL {url!r}: port must be 1-65535")
    if not valid_host(host):
        raise WorkerUrlError(f"worker URL {url!r} has an invalid host {host!r}")
    return WorkerAddress(url.rstrip("/"), scheme, host, port, path)


_address_cache: dict[str, WorkerAddress] = {}
_CACHE_MAX = 4096


def worker_address(url: str) -> WorkerAddress:
    """The parsed form of an already validated URL (as stored in the worker table), cached.

    Bounded: past _CACHE_MAX distinct URLs (workers come and go) the cache starts over.
    """
    address = _address_cache.get(url)
    if address is None:
        if len(_address_cache) >= _CACHE_MAX:
            _address_cache.clear()
        address = _address_cache[url] = parse_worker_url(url)
    return address


# RFC 3986 path characters (pchar and "/"), percent-encodings included.
_PATH_RE = re.compile(r"^(/([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)+$")
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def valid_host(host: str) -> bool:
    """An IP address (v4 or v6) or a DNS hostname (labels of letters, digits, `-`, `_`)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and bool(_HOSTNAME_RE.match(host))
