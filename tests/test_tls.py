"""TLS: the listener (--tls-cert-path/--tls-key-path), https:// workers (--ca-cert-paths,
mutual TLS with --client-cert-path/--client-key-path) and the mock worker's --ssl-* flags.

Pure parts (`smg.tlsconf`, the reload plan, the mock's options) are tested directly; the rest
through a real `smg launch` on loopback. Every certificate is made here with trustme.

What the Rust SMG 1.13 does with the same inputs (run by hand, see the report of issue 8):
plain HTTP bytes on its TLS port get a fatal TLS alert (decode_error) and the connection
closed, never an HTTP answer; a worker whose certificate does not verify is never used
(readiness 503).
"""

from __future__ import annotations

import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme
from gatewayutil import Gateway, free_port, run_launch, running_gateway, wait_until
from mockutil import start_mock_workers

from smg import tlsconf
from smg.config import GatewayConfig
from smg.mock_worker.options import parse_options
from smg.reload import plan_reload

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


# --- certificates --------------------------------------------------------------------------


class Pair:
    """A CA and one certificate it issued, written to `directory`."""

    def __init__(self, directory: Path, name: str, *identities: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*(identities or ("127.0.0.1", "localhost")))
        self.cert_path = directory / f"{name}-chain.pem"
        self.key_path = directory / f"{name}-key.pem"
        self.ca_path = directory / f"{name}-ca.pem"
        self.write(self.cert_path, self.key_path)
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(b"".join(blob.bytes() for blob in self.cert.cert_chain_pems))
        self.cert.private_key_pem.write_to_path(str(key_path))

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts this CA uses."""
        return ssl.create_default_context(cadata=self.ca.cert_pem.bytes().decode())


def handshake(port: int, ctx: ssl.SSLContext, alpn: list[str] | None = None) -> ssl.SSLSocket:
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def serves_ca(port: int, pair: Pair) -> bool:
    try:
        handshake(port, pair.client_context()).close()
    except ssl.SSLCertVerificationError:
        return False
    return True


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- smg.tlsconf, pure ---------------------------------------------------------------------


def test_load_server_tls_reads_and_checks_the_pair(tmp_path: Path) -> None:
    pair = Pair(tmp_path, "srv")
    material = tlsconf.load_server_tls(str(pair.cert_path), str(pair.key_path))
    assert material.cert_pem == pair.cert_path.read_bytes()
    assert "serial" in material.description and "KEY" not in material.description
    ctx = tlsconf.server_context(material)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE  # no client certificate asked


def test_an_expired_certificate_is_served_but_flagged(tmp_path: Path) -> None:
    import datetime as dt

    ca = trustme.CA()
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    leaf = ca.issue_cert("127.0.0.1", not_before=past, not_after=past + dt.timedelta(days=1))
    cert, key = tmp_path / "old.pem", tmp_path / "old-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    material = tlsconf.load_server_tls(str(cert), str(key))
    assert material.description.endswith("(EXPIRED)")  # the supervisor logs a WARNING


def test_load_server_tls_refuses_a_mismatched_key(tmp_path: Path) -> None:
    pair, other = Pair(tmp_path, "a"), Pair(tmp_path, "b")
    with pytest.raises(tlsconf.TlsError, match="private key does not match the certificate"):
        tlsconf.load_server_tls(str(pair.cert_path), str(other.key_path))


def test_load_server_tls_refuses_garbage_and_missing_files(tmp_path: Path) -> None:
    pair = Pair(tmp_path, "a")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(tlsconf.TlsError, match=r"--tls-cert-path .*garbage\.pem"):
        tlsconf.load_server_tls(str(garbage), str(pair.key_path))
    with pytest.raises(tlsconf.TlsError, match="--tls-key-path"):
        tlsconf.load_server_tls(str(pair.cert_path), str(garbage))
    with pytest.raises(tlsconf.TlsError, match="cannot read it"):
        tlsconf.load_server_tls(str(tmp_path / "absent.pem"), str(pair.key_path))


def test_an_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pair = Pair(tmp_path, "a")
    key = serialization.load_pem_private_key(pair.key_path.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(tlsconf.TlsError, match="encrypted"):
        tlsconf.load_server_tls(str(pair.cert_path), str(encrypted))


def test_load_worker_tls(tmp_path: Path) -> None:
    worker, client = Pair(tmp_path, "w"), Pair(tmp_path, "c", "smg-client")
    none = tlsconf.load_worker_tls(GatewayConfig())
    assert none == tlsconf.WorkerTls(None, None, None)  # the system store, no client cert
    cfg = GatewayConfig(
        ca_cert_paths=[str(worker.ca_path), str(client.ca_path)],
        client_cert_path=str(client.cert_path),
        client_key_path=str(client.key_path),
    )
    material = tlsconf.load_worker_tls(cfg)
    assert material.ca_pem is not None and material.ca_pem.count("BEGIN CERTIFICATE") == 2
    ctx = tlsconf.worker_context(material)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    from cryptography import x509

    trusted = {ca["serialNumber"] for ca in ctx.get_ca_certs()}
    for pair in (worker, client):  # the given CAs are trusted (besides the system store)
        serial = x509.load_pem_x509_certificate(pair.ca_path.read_bytes()).serial_number
        digits = f"{serial:X}"
        assert "0" * (len(digits) % 2) + digits in trusted  # OpenSSL prints whole bytes
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope\n")
    with pytest.raises(tlsconf.TlsError, match=r"--ca-cert-paths .*garbage\.pem"):
        tlsconf.load_worker_tls(GatewayConfig(ca_cert_paths=[str(garbage)]))
    mismatched = GatewayConfig(
        client_cert_path=str(client.cert_path), client_key_path=str(worker.key_path)
    )
    with pytest.raises(tlsconf.TlsError, match=r"--client-cert-path .* does not match"):
        tlsconf.load_worker_tls(mismatched)


def test_reload_plan_counts_a_changed_certificate_file_and_keeps_tls_on_or_off() -> None:
    on = GatewayConfig(tls_cert_path="/c.pem", tls_key_path="/k.pem")
    same = plan_reload(on, on)
    assert same.changed == []
    renewed = plan_reload(on, on, content_changed=["tls_cert_path"])
    assert renewed.changed == ["tls_cert_path"]
    moved = plan_reload(on, GatewayConfig(tls_cert_path="/c2.pem", tls_key_path="/k2.pem"))
    assert moved.changed == ["tls_cert_path", "tls_key_path"] and moved.kept == []
    off = plan_reload(on, GatewayConfig())
    assert off.changed == [] and off.cfg.tls_cert_path == "/c.pem"
    assert [name for name, _, _ in off.kept] == ["tls_cert_path", "tls_key_path"]
    switched_on = plan_reload(GatewayConfig(), on, content_changed=["tls_cert_path"])
    assert switched_on.changed == [] and switched_on.cfg.tls_cert_path is None
    ca = plan_reload(GatewayConfig(), GatewayConfig(ca_cert_paths=["/ca.pem"]))
    assert ca.changed == [] and ca.kept == [("ca_cert_paths", [], ["/ca.pem"])]


def test_mock_worker_ssl_options() -> None:
    opts = parse_options(
        [
            "--ssl-certfile",
            "c",
            "--ssl-keyfile",
            "k",
            "--ssl-ca-certs",
            "ca",
            "--ssl-cert-reqs",
            "2",
        ]
    )
    assert (opts.ssl_certfile, opts.ssl_keyfile, opts.ssl_ca_certs, opts.ssl_cert_reqs) == (
        "c",
        "k",
        "ca",
        2,
    )
    for bad in (
        ["--ssl-certfile", "c"],
        ["--ssl-cert-reqs", "2"],
        ["--ssl-certfile", "c", "--ssl-keyfile", "k", "--ssl-cert-reqs", "2"],
        ["--ssl-certfile", "c", "--ssl-keyfile", "k", "--ssl-cert-reqs", "3"],
    ):
        with pytest.raises(SystemExit):
            parse_options(bad)


# --- an https mock worker -------------------------------------------------------------------


class TlsMock:
    """`smg mock-worker` serving https (and demanding client certificates if asked)."""

    def __init__(self, pair: Pair, client_ca: Path | None = None) -> None:
        args = ["--ssl-certfile", str(pair.cert_path), "--ssl-keyfile", str(pair.key_path)]
        if client_ca is not None:
            args += ["--ssl-ca-certs", str(client_ca), "--ssl-cert-reqs", "2"]
        command = [sys.executable, "-m", "smg", "mock-worker", "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("MOCK_WORKER_URL https://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"mock worker did not start: {line!r}")
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stats(self, ctx: ssl.SSLContext) -> dict[str, Any]:
        answer = httpx.get(self.url + "/mock/stats", verify=ctx, timeout=10.0)
        assert answer.status_code == 200
        return answer.json()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    directory = tmp_path_factory.mktemp("tls")
    return {
        "gateway": Pair(directory, "gateway"),
        "worker": Pair(directory, "worker"),
        "client": Pair(directory, "client", "smg-gateway"),
        "stranger": Pair(directory, "stranger"),
    }


def test_mock_worker_serves_https_and_demands_client_certificates(certs: dict[str, Pair]) -> None:
    worker, client = certs["worker"], certs["client"]
    mock = TlsMock(worker, client_ca=client.ca_path)
    try:
        ctx = worker.client_context()
        # TLS 1.3: the refusal of a client without a certificate arrives after the handshake.
        with pytest.raises((ssl.SSLError, httpx.TransportError)):
            httpx.get(mock.url + "/health", verify=ctx, timeout=5.0)
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
        assert httpx.get(mock.url + "/health", verify=ctx, timeout=5.0).status_code == 200
    finally:
        mock.stop()


# --- the listener ---------------------------------------------------------------------------


def tls_args(pair: Pair) -> list[str]:
    return ["--tls-cert-path", str(pair.cert_path), "--tls-key-path", str(pair.key_path)]


@pytest.fixture(scope="module")
def tls_gateway(certs: dict[str, Pair]) -> Iterator[Gateway]:
    with (
        start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, *tls_args(certs["gateway"])]) as gw,
    ):
        gw.wait_ready()  # the worker's first health check, before the first request
        yield gw


def test_openai_client_chat_and_stream_over_tls(
    tls_gateway: Gateway, certs: dict[str, Pair]
) -> None:
    assert tls_gateway.url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=certs["gateway"].client_context()) as http:
        client = openai.OpenAI(
            base_url=tls_gateway.url + "/v1", api_key="unused", max_retries=0, http_client=http
        )
        reply = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if chunk.choices
        ]
        assert "".join(pieces) == reply.choices[0].message.content
        # Keep-alive over TLS: the same connection answers again.
        assert http.get(tls_gateway.url + "/health").status_code == 200


def test_tls_listener_negotiates_http11_only(tls_gateway: Gateway, certs: dict[str, Pair]) -> None:
    sock = handshake(tls_gateway.port, certs["gateway"].client_context(), ["h2", "http/1.1"])
    try:
        assert sock.selected_alpn_protocol() == "http/1.1"
        assert sock.version() in ("TLSv1.3", "TLSv1.2")
        sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()
    untrusting = certs["stranger"].client_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls_gateway.port, untrusting)


def test_plain_http_to_the_tls_port_is_not_answered_as_http(tls_gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10.0) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        received = b""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        else:
            pytest.fail("the TLS port kept a plain-HTTP connection open")
    assert b"HTTP/" not in received  # closed, with no HTTP answer (1.13: a TLS alert)
    with pytest.raises(httpx.TransportError):
        httpx.get(tls_gateway.url.replace("https://", "http://") + "/health", timeout=5.0)
    # Nothing of it reached the log as an error, and the gateway still serves TLS.
    assert "Traceback" not in tls_gateway.logs()


def test_bad_certificate_files_stop_launch_with_status_2(certs: dict[str, Pair]) -> None:
    gateway, other = certs["gateway"], certs["stranger"]
    port = str(free_port())
    base = ["--host", "127.0.0.1", "--port", port, "--prometheus-port", str(free_port())]
    code, err, _ = run_launch(
        [*base, "--tls-cert-path", str(gateway.cert_path), "--tls-key-path", str(other.key_path)]
    )
    assert code == 2, err
    assert "the private key does not match the certificate" in err
    garbage = gateway.cert_path.parent / "garbage-cert.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    code, err, _ = run_launch(
        [*base, "--tls-cert-path", str(garbage), "--tls-key-path", str(gateway.key_path)]
    )
    assert code == 2, err
    assert f"--tls-cert-path {garbage}" in err
    code, err, _ = run_launch([*base, "--ca-cert-paths", str(garbage)])
    assert code == 2, err
    assert "--ca-cert-paths" in err and "not a PEM CA certificate" in err


def test_sighup_serves_a_renewed_certificate_and_refuses_a_broken_one(
    tmp_path: Path, certs: dict[str, Pair]
) -> None:
    first, second = Pair(tmp_path, "first"), Pair(tmp_path, "second")
    cert_path, key_path = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    first.write(cert_path, key_path)
    args = ["--tls-cert-path", str(cert_path), "--tls-key-path", str(key_path)]
    with (
        start_mock_workers(1) as mocks,
        running_gateway(["--worker-urls", mocks.url, *args]) as gw,
    ):
        assert serves_ca(gw.port, first) and not serves_ca(gw.port, second)
        # Renewed in place (same paths, another CA and serial): no other setting changes.
        second.write(cert_path, key_path)
        gw.signal(signal.SIGHUP)
        wait_until(lambda: all(serves_ca(gw.port, second) for _ in range(8)), 20.0, "new cert")
        wait_until(
            lambda: metric(gw.metrics(), "smg_config_reloads_total", result="success") == 1,
            10.0,
            "the reload counted",
        )
        assert not serves_ca(gw.port, first)
        assert "changed: tls_cert_path" in gw.logs()
        with httpx.Client(verify=second.client_context()) as http:
            assert http.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200

        # Broken: a key that does not match. Refused whole; the running certificate stays.
        first.cert.private_key_pem.write_to_path(str(key_path))
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: metric(gw.metrics(), "smg_config_reloads_total", result="failure") == 1,
            10.0,
            "the refusal counted",
        )
        assert "configuration reload refused" in gw.logs()
        assert "private key does not match" in gw.logs()
        time.sleep(0.5)  # a rollout would have started by now
        for _ in range(8):
            assert serves_ca(gw.port, second)
        with httpx.Client(verify=second.client_context()) as http:
            assert http.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
        assert metric(gw.metrics(), "smg_config_reloads_total", result="success") == 1


# --- https:// workers -----------------------------------------------------------------------


def worker_tls_args(certs: dict[str, Pair], client: bool = True, ca: str = "worker") -> list[str]:
    args = ["--ca-cert-paths", str(certs[ca].ca_path)]
    if client:
        args += [
            "--client-cert-path",
            str(certs["client"].cert_path),
            "--client-key-path",
            str(certs["client"].key_path),
        ]
    return args


def readiness(gw: Gateway) -> int:
    return httpx.get(gw.url + "/readiness", timeout=5.0).status_code


def test_mutual_tls_to_a_worker_that_requires_client_certificates(
    certs: dict[str, Pair],
) -> None:
    worker, client = certs["worker"], certs["client"]
    mock = TlsMock(worker, client_ca=client.ca_path)
    try:
        own = worker.client_context()
        own.load_cert_chain(str(client.cert_path), str(client.key_path))
        with running_gateway(["--worker-urls", mock.url, *worker_tls_args(certs)]) as gw:
            wait_until(lambda: readiness(gw) == 200, 20.0, "the mTLS worker ready")
            answer = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10.0)
            assert answer.status_code == 200, answer.text
            stream = httpx.post(
                gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10.0
            )
            assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
            assert mock.stats(own)["requests_by_route"].get("/v1/chat/completions", 0) >= 2
    finally:
        mock.stop()


def refused_after_failed_checks(gw: Gateway) -> httpx.Response:
    """Once the worker has failed two health checks: the gateway is not ready and a chat
    request gets 503; that answer, for its body."""
    wait_until(
        lambda: metric(gw.metrics(), "smg_worker_health_checks_total", result="failure") >= 2,
        20.0,
        "failed health checks",
    )
    assert readiness(gw) == 503
    answer = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10.0)
    assert answer.status_code == 503
    return answer


def test_without_client_certificate_the_mtls_worker_is_never_used(
    certs: dict[str, Pair],
) -> None:
    worker, client = certs["worker"], certs["client"]
    mock = TlsMock(worker, client_ca=client.ca_path)
    try:
        args = ["--worker-urls", mock.url, *worker_tls_args(certs, client=False)]
        with running_gateway([*args, "--health-check-interval-secs", "1"]) as gw:
            answer = refused_after_failed_checks(gw)
            assert answer.json()["error"]["code"] == "no_available_workers"
    finally:
        mock.stop()


def test_a_worker_whose_certificate_does_not_verify_is_never_used(
    certs: dict[str, Pair],
) -> None:
    mock = TlsMock(certs["worker"])
    try:
        args = ["--worker-urls", mock.url, *worker_tls_args(certs, ca="stranger")]
        with running_gateway([*args, "--health-check-interval-secs", "1"]) as gw:
            answer = refused_after_failed_checks(gw)
            assert answer.json()["error"] == {
                "message": "All workers are unavailable (circuit breaker open or unhealthy)",
                "type": "server_error",
                "code": "no_available_workers",
                "param": None,
            }
            workers = httpx.get(gw.url + "/workers", timeout=5.0).json()["workers"]
            assert [(w["url"], w["is_healthy"]) for w in workers] == [(mock.url, False)]
            assert re.search(r"WARNING .*TLS to worker https://127\.0\.0\.1:\d+ failed", gw.logs())
            assert "CERTIFICATE_VERIFY_FAILED" in gw.logs()
        # Used without a health check, the connection itself fails: never a relayed answer.
        with running_gateway([*args, "--disable-health-check"]) as gw:
            answer = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10.0)
            assert answer.status_code == 502
            error = answer.json()["error"]
            assert error["code"] == "upstream_connect_failed"
            assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
        assert mock.stats(certs["worker"].client_context())["inference_answered"] == 0
    finally:
        mock.stop()


def test_certificate_failures_are_warned_once_a_minute_per_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from smg.control import probes

    probes._tls_warned.clear()
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    with caplog.at_level("WARNING", logger="smg.control.probes"):
        assert probes._warn_tls_failure("https://w1:8000/health", error, now=100.0)
        assert not probes._warn_tls_failure("https://w1:8000/metrics", error, now=159.0)
        assert probes._warn_tls_failure("https://w2:8000/health", error, now=159.0)
        assert probes._warn_tls_failure("https://w1:8000/health", error, now=160.5)
    assert [r.getMessage().split(" failed")[0] for r in caplog.records] == [
        "TLS to worker https://w1:8000",
        "TLS to worker https://w2:8000",
        "TLS to worker https://w1:8000",
    ]
    probes._tls_warned.clear()


def test_ca_cert_paths_are_trusted_besides_the_system_store(certs: dict[str, Pair]) -> None:
    """As the Rust SMG 1.13 (run by hand with the same files): the worker's CA only in the
    system store (SSL_CERT_FILE), --ca-cert-paths naming another CA: the worker is used."""
    mock = TlsMock(certs["worker"])
    try:
        args = ["--worker-urls", mock.url, *worker_tls_args(certs, client=False, ca="stranger")]
        env = {"SSL_CERT_FILE": str(certs["worker"].ca_path)}
        with running_gateway(args, env=env) as gw:
            wait_until(lambda: readiness(gw) == 200, 20.0, "the worker ready")
            answer = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10.0)
            assert answer.status_code == 200, answer.text
    finally:
        mock.stop()
