"""smg.systemd's pure parts: NOTIFY_SOCKET addresses, messages, watchdog pacing, LISTEN_*
parsing, taking the variables out of the environment; and the Notifier's failure path."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from smg import systemd


def test_notify_address_forms() -> None:
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@smg/notify") == b"\0smg/notify"
    assert systemd.notify_address(None) is None
    assert systemd.notify_address("") is None
    for bad in ("@", "relative/path", "vsock:2:1234"):
        with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
            systemd.notify_address(bad)


def test_watchdog_interval_is_half_the_timeout_when_it_is_ours() -> None:
    assert systemd.watchdog_interval("30000000", None, 42) == 15.0
    assert systemd.watchdog_interval("200000", "42", 42) == 0.1
    assert systemd.watchdog_interval("200000", "43", 42) is None  # another process's
    assert systemd.watchdog_interval("200000", "x", 42) is None
    assert systemd.watchdog_interval(None, None, 42) is None
    assert systemd.watchdog_interval("0", None, 42) is None
    assert systemd.watchdog_interval("-5", None, 42) is None
    assert systemd.watchdog_interval("abc", None, 42) is None
    assert systemd.watchdog_interval(str(2**64 - 1), None, 42) is None  # USEC_INFINITY


def test_listen_fds_parsing() -> None:
    assert systemd.listen_fds("42", "1", None, 42) == [(3, "unknown")]
    assert systemd.listen_fds("42", "2", "http:extra", 42) == [(3, "http"), (4, "extra")]
    assert systemd.listen_fds("42", "0", None, 42) == []
    assert systemd.listen_fds("41", "1", None, 42) == []  # meant for another process
    assert systemd.listen_fds(None, "1", None, 42) == []
    with pytest.raises(ValueError, match="LISTEN_PID"):
        systemd.listen_fds("x", "1", None, 42)
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        systemd.listen_fds("42", "one", None, 42)
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        systemd.listen_fds("42", "-1", None, 42)
    with pytest.raises(ValueError, match="LISTEN_FDNAMES names 1 fd"):
        systemd.listen_fds("42", "2", "http", 42)


def test_messages() -> None:
    assert systemd.ready_message("1/2 workers ready") == b"READY=1\nSTATUS=1/2 workers ready"
    assert systemd.reloading_message(123456) == b"RELOADING=1\nMONOTONIC_USEC=123456"
    assert systemd.stopping_message("draining") == b"STOPPING=1\nSTATUS=draining"
    assert systemd.status_message("a\nb") == b"STATUS=a b"  # a newline would start a field
    assert systemd.WATCHDOG_MESSAGE == b"WATCHDOG=1"
    assert systemd.status_text(2, 3, 4, 4) == "2/3 workers ready, 4/4 data-plane processes"


def test_due_paces_by_interval() -> None:
    assert systemd.due(None, 0.1, 5.0)
    assert not systemd.due(4.0, 0.25, 4.125)
    assert systemd.due(4.0, 0.25, 4.25)


def test_take_environ_reads_and_removes_every_variable() -> None:
    environ = {
        "NOTIFY_SOCKET": "@smg",
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": "7",
        "LISTEN_PID": "7",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "smg.socket",
        "PATH": "/bin",
    }
    env = systemd.take_environ(environ, 7)
    assert environ == {"PATH": "/bin"}
    assert env.notifier is not None and env.notifier.address == b"\0smg"
    assert env.watchdog_interval == 0.5
    assert env.listen == [(3, "smg.socket")]
    # No NOTIFY_SOCKET: no notifier and no watchdog, whatever WATCHDOG_USEC says.
    bare = systemd.take_environ({"WATCHDOG_USEC": "1000000"}, 7)
    assert (bare.notifier, bare.watchdog_interval, bare.listen) == (None, None, [])
    # An unsupported NOTIFY_SOCKET is not an error: nothing is sent.
    assert systemd.take_environ({"NOTIFY_SOCKET": "vsock:1:2"}, 7).notifier is None


def test_notifier_sends_and_never_raises(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5.0)
    notifier = systemd.Notifier(path)
    try:
        assert notifier.send(b"READY=1")
        assert receiver.recv(100) == b"READY=1"
        receiver.close()
        # Nobody listens any more: False, logged once, no exception.
        assert not notifier.send(b"WATCHDOG=1")
        assert not notifier.send(b"WATCHDOG=1")
        assert not systemd.Notifier(str(tmp_path / "missing")).send(b"READY=1")
    finally:
        notifier.close()
        receiver.close()


def test_adopt_listener_refuses_what_is_not_a_listening_tcp_socket() -> None:
    # Each checked fd is moved to a fresh number: fd 3 belongs to the test runner here.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unlistened = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    try:
        with pytest.raises(ValueError, match="listening TCP socket, not AF_INET SOCK_DGRAM"):
            systemd.adopt_listener([(udp.fileno(), "x")])
        with pytest.raises(ValueError, match="AF_INET SOCK_STREAM, not listening"):
            systemd.adopt_listener([(unlistened.fileno(), "x")])
        adopted = systemd.adopt_listener([(listening.fileno(), "x")])
        assert adopted.getsockname() == listening.getsockname()
        assert not adopted.get_inheritable()
        adopted.detach()  # the same fd as `listening`, closed below
    finally:
        udp.close()
        unlistened.close()
        listening.close()


def test_supervisor_ready_waits_for_the_first_health_round_within_its_bound(
    tmp_path: Path,
) -> None:
    """The supervisor's notify step without processes: READY=1 once the control plane's
    word is set, or at the bound with a STATUS saying so; a reload ends with READY=1;
    no WATCHDOG=1 while a data-plane process is missing."""
    from smg.config import GatewayConfig
    from smg.shm import layout
    from smg.supervisor import FIRST_HEALTH_ROUND_WAIT_SECS, Supervisor

    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)

    def received() -> list[bytes]:
        out = []
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(receiver.recv(4096))
        return out

    env = systemd.SystemdEnv(systemd.Notifier(path), watchdog_interval=0.001)
    sup = Supervisor(GatewayConfig(), 2, [], systemd=env)
    try:
        sup._ready_deadline = time.monotonic() + 60.0
        sup._notify_tick()  # word not set, bound not reached; pid 0: no watchdog
        assert received() == []
        sup.table.atomic.store_u64(sup.table.global_offset(layout.G_FIRST_HEALTH_ROUND), 1)
        sup._notify_tick()
        assert received() == [b"READY=1\nSTATUS=0/0 workers ready, 0/2 data-plane processes"]
        sup._notify_reloading()
        sup._notify_tick()  # no rollout: the reload has ended
        [reloading, ready] = received()
        assert reloading.startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert ready == b"READY=1\nSTATUS=0/0 workers ready, 0/2 data-plane processes"

        late = Supervisor(GatewayConfig(), 2, [], systemd=env)
        late._ready_deadline = time.monotonic() - 0.001  # the bound has passed, word unset
        late._notify_tick()
        assert received() == [
            b"READY=1\nSTATUS=0/0 workers ready, 0/2 data-plane processes (first health "
            b"round not done after %d s)" % FIRST_HEALTH_ROUND_WAIT_SECS
        ]
    finally:
        env.notifier.close()  # type: ignore[union-attr]
        receiver.close()
