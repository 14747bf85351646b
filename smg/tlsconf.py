"""TLS material and SSL contexts: the listener (`--tls-cert-path`/`--tls-key-path`) and the
client side towards https:// workers (`--ca-cert-paths`, `--client-cert-path`/`--client-key-path`).

The files are read once, by the root supervisor before it forks (and again on SIGHUP for the
listener), into bytes that are validated by building a context from them. Children build
their own `ssl.SSLContext` from those bytes after the fork, so every process serves exactly
the certificate the supervisor checked, even if the file changes on disk meanwhile, and no
OpenSSL state is shared across a fork. `ssl` loads a certificate chain only from a path: the
bytes go through an anonymous in-memory file (memfd), never a file on disk.

No I/O besides reading the named files; no sockets. Tested directly in tests/test_tls.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from smg.config import GatewayConfig

# What both sides negotiate: HTTP/1.1 only (the data plane speaks nothing else).
ALPN = ["http/1.1"]


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the flag."""


class ServerTls(NamedTuple):
    """The listener's certificate chain and private key, as read from the files."""

    cert_pem: bytes
    key_pem: bytes
    description: str  # the leaf certificate, for the logs (never the key)


class WorkerTls(NamedTuple):
    """What the client side towards https:// workers trusts and presents."""

    ca_pem: str | None  # the --ca-cert-paths files concatenated, trusted besides the system
    cert_pem: bytes | None  # --client-cert-path (mutual TLS), with its key
    key_pem: bytes | None


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path that reads as `data`, without writing it to disk (the key stays in memory)."""
    fd = os.memfd_create("smg-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsError("the private key is encrypted; give an unencrypted PEM key")


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with _memory_file(cert_pem) as cert, _memory_file(key_pem) as key:
        ctx.load_cert_chain(cert, key, password=_refuse_password)


def _why(exc: Exception) -> str:
    """OpenSSL's reason in words a user can act on."""
    if isinstance(exc, TlsError):
        return str(exc)
    reason = getattr(exc, "reason", None) or ""
    words = {
        "KEY_VALUES_MISMATCH": "the private key does not match the certificate",
        "NO_START_LINE": "no PEM block found (expected -----BEGIN ...-----)",
        "PEM_LIB": "not a usable PEM certificate or key",
        "BAD_END_LINE": "a PEM block is cut short",
        "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate found",
    }
    text = words.get(reason)
    if text is None:
        text = str(exc)
    return text


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from exc


def _describe(cert_pem: bytes) -> str:
    """Subject, serial and expiry of the first certificate in `cert_pem` (for the logs)."""
    try:
        from cryptography import x509

        leaf = x509.load_pem_x509_certificate(cert_pem)
    except Exception as exc:  # only the log line suffers
        return f"(undescribed: {exc})"
    return (
        f"subject {leaf.subject.rfc4514_string() or '(empty)'}, serial {leaf.serial_number:x}, "
        f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


def _expired(cert_pem: bytes, now: dt.datetime | None = None) -> bool:
    try:
        from cryptography import x509

        leaf = x509.load_pem_x509_certificate(cert_pem)
    except Exception:
        return False
    return leaf.not_valid_after_utc < (now or dt.datetime.now(dt.UTC))


# --- the listener -------------------------------------------------------------------------


def server_context(material: ServerTls) -> ssl.SSLContext:
    """The listener's context: TLS 1.2+, ALPN http/1.1, no client certificate asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # as rustls, the Rust SMG's TLS stack
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(ALPN)
    _load_chain(ctx, material.cert_pem, material.key_pem)
    return ctx


def load_server_tls(cert_path: str, key_path: str) -> ServerTls:
    """Read and check the listener's pair; TlsError says what is wrong with which file."""
    cert_pem = _read(cert_path, "--tls-cert-path")
    key_pem = _read(key_path, "--tls-key-path")
    material = ServerTls(cert_pem, key_pem, _describe(cert_pem))
    try:
        server_context(material)
    except (ssl.SSLError, TlsError, ValueError) as exc:
        raise TlsError(
            f"--tls-cert-path {cert_path} / --tls-key-path {key_path}: {_why(exc)}"
        ) from exc
    if _expired(cert_pem):
        # Served anyway, as the Rust SMG does (rustls does not check its own certificate),
        # but the supervisor logs it: every client will refuse it.
        material = material._replace(description=f"{material.description} (EXPIRED)")
    return material


def server_tls_from(cfg: GatewayConfig) -> ServerTls | None:
    """The listener's material for `cfg`, None when TLS is off."""
    if cfg.tls_cert_path is None or cfg.tls_key_path is None:
        return None
    return load_server_tls(cfg.tls_cert_path, cfg.tls_key_path)


# --- towards https:// workers -------------------------------------------------------------


def worker_context(material: WorkerTls) -> ssl.SSLContext:
    """The client context for https:// workers: certificates verified and the host name
    checked; our certificate presented when one is configured (mutual TLS). The given CAs
    are trusted besides the system store, as the Rust SMG 1.13 does (its verifier adds them
    to the platform roots: a worker whose CA is only in SSL_CERT_FILE is still trusted
    with --ca-cert-paths naming another CA)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if material.ca_pem is not None:
        ctx.load_verify_locations(cadata=material.ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    if material.cert_pem is not None and material.key_pem is not None:
        _load_chain(ctx, material.cert_pem, material.key_pem)
    return ctx


def load_worker_tls(cfg: GatewayConfig) -> WorkerTls:
    """Read and check the worker-side files of `cfg`; TlsError names the flag and file."""
    ca_pem: str | None = None
    if cfg.ca_cert_paths:
        parts: list[str] = []
        for path in cfg.ca_cert_paths:
            data = _read(path, "--ca-cert-paths")
            try:
                text = data.decode("ascii")
                ssl.create_default_context(cadata=text)
            except (UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
                raise TlsError(
                    f"--ca-cert-paths {path}: not a PEM CA certificate ({_why(exc)})"
                ) from exc
            parts.append(text if text.endswith("\n") else text + "\n")
        ca_pem = "".join(parts)
    cert_pem = key_pem = None
    if cfg.client_cert_path is not None and cfg.client_key_path is not None:
        cert_pem = _read(cfg.client_cert_path, "--client-cert-path")
        key_pem = _read(cfg.client_key_path, "--client-key-path")
    material = WorkerTls(ca_pem, cert_pem, key_pem)
    if cert_pem is not None:
        try:
            worker_context(material)
        except (ssl.SSLError, TlsError, ValueError) as exc:
            raise TlsError(
                f"--client-cert-path {cfg.client_cert_path} / --client-key-path "
                f"{cfg.client_key_path}: {_why(exc)}"
            ) from exc
    return material


# The material the root supervisor read before forking; children inherit it with the fork
# and build their context from it. None in a process not forked by a supervisor (a test
# that builds a DataPlane directly): then it is read from the configuration on first use.
_inherited_worker_tls: WorkerTls | None = None


def set_inherited_worker_tls(material: WorkerTls | None) -> None:
    global _inherited_worker_tls
    _inherited_worker_tls = material


def worker_context_for(cfg: GatewayConfig) -> ssl.SSLContext:
    """A fresh client context for https:// workers in this process (call once, keep it)."""
    material = _inherited_worker_tls
    if material is None:
        material = load_worker_tls(cfg)
    return worker_context(material)
