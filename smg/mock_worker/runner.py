"""Process entry: bind the workers, print their URLs, serve until a signal or --exit-after."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import uvloop

from smg.mock_worker.options import Options, parse_options
from smg.mock_worker.pd import start_bootstrap_server
from smg.mock_worker.server import Connection, ProcessState, Worker, server_ssl_context

URL_PREFIX = "MOCK_WORKER_URL"
BOOTSTRAP_PREFIX = "MOCK_WORKER_BOOTSTRAP"


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _announce(worker: Worker, scheme: str) -> str:
    """A worker's stdout line(s): its URL, and a prefill's bootstrap port after it."""
    url = _url(worker.opts.host, worker.port, scheme)
    line = f"{URL_PREFIX} {url}\n"
    if worker.rooms is not None:
        line += f"{BOOTSTRAP_PREFIX} {url} {worker.bootstrap_port}\n"
    return line


def _cannot_listen(host: str, port: int, error: OSError, what: str = "") -> int:
    """Say why a listener could not be bound; the exit status of serve()."""
    print(
        f"smg mock-worker: cannot listen on {host}:{port}{what}: {error}",
        file=sys.stderr,
        flush=True,
    )
    return 1


async def serve(opts: Options) -> int:
    loop = asyncio.get_running_loop()
    process = ProcessState(opts.exit_after)
    workers: list[Worker] = []
    servers: list[asyncio.AbstractServer] = []
    try:
        tls = server_ssl_context(opts)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        print(f"smg mock-worker: cannot use the TLS files: {e}", file=sys.stderr, flush=True)
        return 1
    scheme = "http" if tls is None else "https"
    try:
        for i in range(opts.count):
            worker = Worker(opts, i, process)
            port = 0 if opts.port == 0 else opts.port + i
            try:
                server = await loop.create_server(
                    lambda w=worker: Connection(w), opts.host, port, backlog=4096, ssl=tls
                )
            except OSError as e:
                return _cannot_listen(opts.host, port, e)
            servers.append(server)
            worker.port = server.sockets[0].getsockname()[1]
            workers.append(worker)
            if worker.rooms is not None:  # a PD prefill: its bootstrap server
                bport = 0 if opts.bootstrap_port == 0 else opts.bootstrap_port + i
                try:
                    boot = await start_bootstrap_server(worker.rooms, opts.host, bport)
                except OSError as e:
                    return _cannot_listen(opts.host, bport, e, " (bootstrap)")
                servers.append(boot)
                worker.bootstrap_port = boot.sockets[0].getsockname()[1]
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, process.stop.set)
        # Announced only once every listener is bound, so a reader may connect at once.
        lines = "".join(_announce(w, scheme) for w in workers)
        sys.stdout.write(lines)
        sys.stdout.flush()
        await process.stop.wait()
    finally:
        for server in servers:
            server.close()
        for worker in workers:
            for conn in list(worker.connections):
                conn.shutdown()
        # Let close() flush what the last responses left in the transport buffers.
        await asyncio.sleep(0.05)
    return 0


def main(argv: list[str]) -> int:
    if "--grpc" in argv:  # the gRPC mock engine: its own options and server
        from smg.mock_worker.grpc_server import main as grpc_main

        return grpc_main(argv)
    try:
        opts = parse_options(argv)
    except SystemExit as e:  # --help or a bad flag; argparse already printed why
        return e.code if isinstance(e.code, int) else 2
    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(serve(opts))
    return 130
