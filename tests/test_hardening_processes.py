"""Processes and the shared table under faults: who may hold the port, what a killed
process leaves behind, and who may talk to the local control channel.

Real `smg launch` processes on loopback (tests/gatewayutil.py). Raw sockets read the
`x-smg-process` header of each answer, so the per-process split of connections is
measured where the client sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from gatewayutil import Gateway, children, free_port, pid_serving, run_launch, wait_until

from smg import ipc
from smg.shm import layout

pytestmark = pytest.mark.timeout(120)

CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
CHAT_BODY = b'{"messages": [{"role": "user", "content": "hello"}]}'
BIND_REFUSED = "Failed to bind the HTTP listener on 127.0.0.1:{port}: Address already in use"


# --- helpers ------------------------------------------------------------------------------


def send_chat(port: int) -> socket.socket:
    """A new connection with one whole request sent (Connection: close)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    sock.sendall(CHAT % (len(CHAT_BODY), CHAT_BODY))
    return sock


def read_answer(sock: socket.socket, timeout: float = 20.0) -> tuple[int, str]:
    """(status, x-smg-process) of the answer, read to EOF; (0, '') when the connection
    ended (EOF or reset) without an answer."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError), sock:
        while chunk := sock.recv(65536):
            data += chunk
    head, _, _body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, ""
    status = int(head[9:12])
    process = ""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-smg-process":
            process = value.strip().decode()
    return status, process


def split_of_new_connections(port: int, count: int, timeout: float = 20.0) -> Counter[str]:
    """Which process answered each of ``count`` new connections (all must be 200)."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, process = read_answer(send_chat(port), timeout)
        assert status == 200
        seen[process] += 1
    return seen


def control_plane_pid(gw: Gateway) -> int:
    """The child serving the metrics port is the control plane."""
    metrics_port = int(gw.metrics_url.rsplit(":", 1)[1].split("/")[0])
    for child in children(gw):
        for conn in child.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == metrics_port:
                return child.pid
    raise AssertionError("no child listens on the metrics port")


@contextlib.contextmanager
def started(gw: Gateway, *, ready: bool = True) -> Iterator[Gateway]:
    gw.start()
    try:
        if ready:
            gw.wait_ready()
        yield gw
    finally:
        gw.stop()
        gw.close_log()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """Shared by the tests that disturb nothing."""
    with started(Gateway(["--mock-workers", "1"], processes=2)) as gw:
        yield gw


# --- item 13: the port belongs to one gateway ------------------------------------------------


def test_second_launch_on_a_served_port_exits_1(gateway: Gateway) -> None:
    port = gateway.port
    args = ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port())]
    code, err, took = run_launch([*args, "--processes", "2"], timeout=20.0)
    assert code == 1, err
    assert BIND_REFUSED.format(port=port) + " (os error 98)" in err, err
    assert took < 10.0
    # The first gateway (started on --port 0) still serves every new connection with both
    # of its processes.
    assert set(split_of_new_connections(port, 20)) == {"0", "1"}


def test_launch_refuses_a_port_held_by_a_reuseport_group() -> None:
    # The kernel lets a socket of the same user join an SO_REUSEPORT group: that is how a
    # second smg used to start silently and take part of the traffic.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for mode in ("reuseport", "inherit"):
            args = ["--host", "127.0.0.1", "--port", str(port), "--listen-mode", mode]
            code, err, _took = run_launch(
                [*args, "--processes", "2", "--prometheus-port", str(free_port())], timeout=20.0
            )
            assert code == 1, (mode, err)
            assert BIND_REFUSED.format(port=port) in err, (mode, err)


# --- items 13 and 19: a killed data-plane process's listener waits for its replacement -------


def test_killed_process_listener_queues_for_its_replacement() -> None:
    with started(Gateway(["--mock-workers", "1"], processes=2)) as gw:
        before = split_of_new_connections(gw.port, 20)
        assert set(before) == {"0", "1"}, before
        victim = pid_serving(gw, "1")
        assert victim
        # Stopped, the process accepts nothing: new connections queue on its listener
        # (the kernel completes their handshakes), about half of them by the port hash.
        os.kill(victim, signal.SIGSTOP)
        queued = [send_chat(gw.port) for _ in range(16)]
        os.kill(victim, signal.SIGKILL)
        # And new connections made while the replacement is being started.
        gap = [send_chat(gw.port) for _ in range(16)]
        queued_answers = [read_answer(sock) for sock in queued]
        gap_answers = [read_answer(sock) for sock in gap]
        # None is dropped: the supervisor kept listener 1 open and handed it on.
        assert [status for status, _p in queued_answers] == [200] * 16, queued_answers
        assert [status for status, _p in gap_answers] == [200] * 16, gap_answers
        assert "1" in {p for _s, p in queued_answers}, queued_answers
        assert "1" in {p for _s, p in gap_answers}, gap_answers
        assert pid_serving(gw, "1") not in (0, victim)
        # New connections keep reaching both processes.
        after = split_of_new_connections(gw.port, 20)
        assert set(after) == {"0", "1"}, after


def test_crash_looping_process_gives_its_share_back_until_it_starts() -> None:
    with started(Gateway(["--mock-workers", "1"], processes=2)) as gw:
        assert gw.process is not None
        victim = pid_serving(gw, "1")
        assert victim
        os.kill(victim, signal.SIGKILL)
        # Squatting its local channel makes every replacement fail at start-up.
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = ipc.dataplane_address(gw.process.pid, 1)

        def squat() -> bool:
            squatter.bind(name)  # fails while the dead process's socket is still there
            return True

        with squatter:
            wait_until(squat, 2.0, "the dead process's channel name to be free")
            wait_until(lambda: "replacing it in 2.00 s" in gw.logs(), 15.0, "a third failed start")
            # Backing off that long, its listener is closed: the survivor gets everything
            # and nothing waits in a queue nobody accepts from.
            assert split_of_new_connections(gw.port, 16, timeout=5.0) == {"0": 16}
        # Once a replacement starts, it listens again and takes its share.
        wait_until(
            lambda: pid_serving(gw, "1", attempts=10) not in (0, victim),
            15.0,
            "a replacement that starts",
        )
        assert set(split_of_new_connections(gw.port, 20)) == {"0", "1"}


def test_sigterm_closes_the_port_while_streams_drain() -> None:
    # The supervisor holds copies of the listeners; at SIGTERM it must drop them, or the
    # port would keep queueing connections nobody accepts until the last stream ends.
    args = ["--mock-workers", "1", "--shutdown-grace-period-secs", "15"]
    with started(Gateway(args, processes=2)) as gw:
        stream = socket.create_connection(("127.0.0.1", gw.port), timeout=10.0)
        body = CHAT_BODY[:-1] + b', "stream": true}'
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nx-mock-itl-ms: 300\r\n"
            b"x-mock-output-len: 20\r\nContent-Length: %d\r\n\r\n"
        )
        with stream:
            stream.sendall(head % len(body) + body)
            assert stream.recv(65536).startswith(b"HTTP/1.1 200")
            gw.signal(signal.SIGTERM)
            signalled = time.monotonic()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", gw.port), timeout=1.0).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_until(refused, 4.0, "the port to close after the 1 s listener linger")
            assert gw.process is not None and gw.process.poll() is None, "still draining"
            while stream.recv(65536):
                pass
            assert time.monotonic() - signalled > 4.0  # the stream outlived the listeners
        assert gw.wait(20.0) == 0
        # Routine events are INFO, not WARNING.
        lines = gw.logs().splitlines()
        for event in ("smg ready on http://127.0.0.1:", "draining (up to 15 s)"):
            logged = [line for line in lines if event in line]
            assert len(logged) == 1 and " INFO [" in logged[0], (event, logged)


# --- item 14: a control plane killed in the middle of a write -----------------------------------


def plant_odd_sequence_words(supervisor_pid: int) -> None:
    """Leave row 0's and the directory's sequence words odd in the shared table, as a
    control plane killed between the two stores of a write does."""
    with open(f"/proc/{supervisor_pid}/maps", encoding="ascii") as maps:
        regions = [line.split() for line in maps]
    with open(f"/proc/{supervisor_pid}/mem", "r+b", buffering=0) as mem:
        for region in regions:
            if len(region) < 6 or region[1] != "rw-s" or "zero" not in region[5]:
                continue
            start = int(region[0].split("-")[0], 16)
            header = os.pread(mem.fileno(), layout.HEADER_SIZE, start)
            with contextlib.suppress(ValueError):
                geo = layout.read_geometry(header)
                for offset in (layout.row_offset(geo, 0), layout.OFF_DIR_SEQ):
                    seq = layout.U64.unpack(os.pread(mem.fileno(), 8, start + offset))[0]
                    os.pwrite(mem.fileno(), layout.U64.pack(seq | 1), start + offset)
                return
    raise AssertionError("no shared worker table in the supervisor's mappings")


def test_control_plane_killed_mid_write_is_replaced() -> None:
    args = ["--mock-workers", "1", "--policy", "power_of_two"]
    with started(Gateway(args, processes=2)) as gw:
        assert gw.process is not None
        assert read_answer(send_chat(gw.port))[0] == 200
        control = control_plane_pid(gw)
        os.kill(control, signal.SIGSTOP)  # it must not write (and flip parity) meanwhile
        plant_odd_sequence_words(gw.process.pid)
        os.kill(control, signal.SIGKILL)

        def replaced() -> bool:
            answer = gw.admin("GET", "/workers")
            return answer.status_code == 200 and "127.0.0.1" in answer.text

        wait_until(replaced, 20.0, "a replacement control plane listing the worker")
        assert control_plane_pid(gw) != control
        assert gw.admin("GET", "/health").status_code == 200
        assert gw.admin("GET", "/readiness").status_code == 200
        assert [read_answer(send_chat(gw.port))[0] for _ in range(5)] == [200] * 5
        assert "repaired 2 sequence word(s) left mid-write" in gw.logs()
        assert "stayed busy" not in gw.logs()


# --- item 17: only the gateway's own user may use its local channel ------------------------------


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this host")
    return entry.pw_uid, entry.pw_gid


def as_nobody(action: Callable[[], bytes]) -> bytes:
    """Run ``action`` in a forked child that has become the user nobody; its result."""
    uid, gid = _nobody()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result = b"error"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = action()
        except BaseException as exc:
            result = f"error {exc!r}".encode()
        finally:
            os.write(write_end, result)
            os._exit(0)
    os.close(write_end)
    try:
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return b"".join(chunks)


def call_raw(address: str, message: Any) -> bytes:
    """b'answered' when a frame came back, b'refused' when the connection ended without
    one, for one message sent on a fresh connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        sock.connect(address)
        try:
            sock.sendall(ipc.encode_frame(message))
            answer = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b"refused"
    return b"answered" if answer else b"refused"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")


@needs_root
def test_control_channel_refuses_another_user(gateway: Gateway) -> None:
    assert gateway.process is not None
    root = gateway.process.pid
    list_workers = {"kind": "admin", "method": "GET", "path": "/workers", "query": "", "body": b""}
    targets = [
        (ipc.control_plane_address(root), list_workers),
        (ipc.dataplane_address(root, 0), {"kind": "stats"}),
        (ipc.dataplane_address(root, 1), {"kind": "stats"}),
    ]
    for address, message in targets:
        # The gateway's own user gets an answer to the very same bytes...
        assert call_raw(address, message) == b"answered"
        # ... another local user gets none.
        assert as_nobody(lambda a=address, m=message: call_raw(a, m)) == b"refused", address
    assert "refused a connection from uid" in gateway.logs()


@needs_root
def test_client_refuses_a_server_of_another_user() -> None:
    # Someone else bound the name first (say while the control plane was being replaced):
    # a call must not hand it the admin request (worker API keys travel in such bodies).
    address = f"\0smg-test-{os.getpid()}-squatted"
    uid, gid = _nobody()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(address)
            server.listen()
            os.write(ready_write, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(ready_write)
        assert os.read(ready_read, 1) == b"x"
        with pytest.raises(ipc.PeerRefused, match="served by uid"):
            asyncio.run(ipc.call(address, {"kind": "stats"}, timeout=5.0))
    finally:
        os.close(ready_read)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_same_user_calls_are_answered() -> None:
    async def main() -> Any:
        async def echo(message: Any) -> Any:
            return {"echo": message}

        address = f"\0smg-test-{os.getpid()}-{threading.get_ident()}-echo"
        server = await ipc.serve(address, echo)
        try:
            return await ipc.call(address, {"kind": "stats"}, timeout=5.0)
        finally:
            server.close()

    assert asyncio.run(main()) == {"echo": {"kind": "stats"}}
