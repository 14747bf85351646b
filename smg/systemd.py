"""systemd's service protocols, spoken without libsystemd.

Notify (sd_notify(3)): newline-separated `KEY=VALUE` assignments in one datagram to the
unix socket `$NOTIFY_SOCKET` (a path, or `@name`: an abstract socket, leading NUL).
Watchdog (sd_watchdog_enabled(3)): `$WATCHDOG_USEC` is the timeout; `WATCHDOG=1` is sent
every half of it; `$WATCHDOG_PID`, when set, names the one process meant.
Socket activation (sd_listen_fds(3)): `$LISTEN_PID` names the process meant, `$LISTEN_FDS`
counts the sockets passed from fd 3 (SD_LISTEN_FDS_START) on, `$LISTEN_FDNAMES` names them.

Everything here is pure (parsing, formatting, pacing) except `Notifier` (sends datagrams)
and `adopt_listener` (checks an inherited fd).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field

log = logging.getLogger("smg.systemd")

SD_LISTEN_FDS_START = 3
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# systemd's USEC_INFINITY: WATCHDOG_USEC must be below it.
_USEC_INFINITY = 2**64 - 1


def notify_address(value: str | None) -> str | bytes | None:
    """The address `$NOTIFY_SOCKET` names: a path (str), an abstract name (bytes with a
    leading NUL, from `@name`), or None when unset or empty. ValueError for a form this
    implementation does not speak (a relative path, `vsock:`)."""
    if not value:
        return None
    if value.startswith("@"):
        if len(value) < 2:
            raise ValueError(f"NOTIFY_SOCKET={value!r}: an abstract name needs a name")
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r}: only a path or @abstract name is supported")


def watchdog_interval(usec: str | None, pid: str | None, our_pid: int) -> float | None:
    """Seconds between `WATCHDOG=1` messages (half the timeout), or None when the watchdog
    is not ours (sd_watchdog_enabled: unset, zero or malformed WATCHDOG_USEC; WATCHDOG_PID
    set to anything but our pid)."""
    if not usec:
        return None
    if pid:
        try:
            if int(pid) != our_pid:
                return None
        except ValueError:
            return None
    try:
        timeout = int(usec)
    except ValueError:
        return None
    if timeout <= 0 or timeout >= _USEC_INFINITY:
        return None
    return timeout / 2 / 1e6


def listen_fds(
    pid: str | None, count: str | None, names: str | None, our_pid: int
) -> list[tuple[int, str]]:
    """The sockets systemd passed us, as (fd, name) from fd 3 on: [] when LISTEN_PID is
    unset or another process's (sd_listen_fds). ValueError for malformed values meant for
    us. A missing LISTEN_FDNAMES names every fd "unknown", as sd_listen_fds_with_names."""
    if not pid:
        return []
    try:
        if int(pid) != our_pid:
            return []
    except ValueError as exc:
        raise ValueError(f"LISTEN_PID={pid!r} is not a process id") from exc
    try:
        n = int(count or "")
    except ValueError as exc:
        raise ValueError(f"LISTEN_FDS={count!r} is not a number") from exc
    if n < 0:
        raise ValueError(f"LISTEN_FDS={count!r} is negative")
    labels = names.split(":") if names else ["unknown"] * n
    if len(labels) != n:
        raise ValueError(f"LISTEN_FDNAMES names {len(labels)} fd(s) but LISTEN_FDS is {n}")
    return [(SD_LISTEN_FDS_START + i, labels[i]) for i in range(n)]


def format_message(*fields: tuple[str, str]) -> bytes:
    """One notify datagram: `KEY=VALUE` lines. A newline inside a value would start a new
    assignment, so it becomes a space."""
    return "\n".join(f"{key}={value.replace(chr(10), ' ')}" for key, value in fields).encode()


def ready_message(status: str) -> bytes:
    return format_message(("READY", "1"), ("STATUS", status))


def reloading_message(monotonic_usec: int) -> bytes:
    """Type=notify-reload's start of a reload: RELOADING=1 with the CLOCK_MONOTONIC time
    (µs) in the same datagram, so systemd can tell this reload from an older one."""
    return format_message(("RELOADING", "1"), ("MONOTONIC_USEC", str(monotonic_usec)))


def stopping_message(status: str) -> bytes:
    return format_message(("STOPPING", "1"), ("STATUS", status))


def status_message(status: str) -> bytes:
    return format_message(("STATUS", status))


WATCHDOG_MESSAGE = format_message(("WATCHDOG", "1"))


def status_text(ready_workers: int, workers: int, ready_processes: int, processes: int) -> str:
    """The service's one-line state, shown by `systemctl status`."""
    return (
        f"{ready_workers}/{workers} workers ready, "
        f"{ready_processes}/{processes} data-plane processes"
    )


def due(last: float | None, interval: float, now: float) -> bool:
    """Whether a message sent at `last` (None: never) is due again at `now`."""
    return last is None or now - last >= interval


@dataclass
class Notifier:
    """Sends notify datagrams. Never raises and never blocks the caller: the socket is
    non-blocking, and a failure (no listener, queue full) is logged once per errno."""

    address: str | bytes
    sock: socket.socket | None = None
    _failed: set[int] = field(default_factory=set)

    def send(self, payload: bytes) -> bool:
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            self.sock.sendto(payload, self.address)
            return True
        except OSError as exc:
            code = exc.errno or 0
            if code not in self._failed:
                self._failed.add(code)
                level = logging.DEBUG if code == errno.EAGAIN else logging.WARNING
                log.log(level, "systemd notify to %r failed: %s (logged once)", self.address, exc)
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class SystemdEnv:
    """What systemd handed this process through its environment."""

    notifier: Notifier | None = None
    watchdog_interval: float | None = None
    listen: list[tuple[int, str]] = field(default_factory=list)


def take_environ(environ: MutableMapping[str, str], our_pid: int) -> SystemdEnv:
    """Read the notify, watchdog and socket-activation variables and remove them from
    `environ`, so no child process (the mock workers, an engine) takes them for its own
    (sd_notify's unset_environment). ValueError for malformed LISTEN_* meant for us."""
    values = {name: environ.pop(name, None) for name in (*NOTIFY_VARS, *LISTEN_VARS)}
    env = SystemdEnv()
    try:
        address = notify_address(values["NOTIFY_SOCKET"])
    except ValueError as exc:
        log.warning("%s; not notifying systemd", exc)
        address = None
    if address is not None:
        env.notifier = Notifier(address)
        env.watchdog_interval = watchdog_interval(
            values["WATCHDOG_USEC"], values["WATCHDOG_PID"], our_pid
        )
    env.listen = listen_fds(
        values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"], our_pid
    )
    return env


def adopt_listener(fds: list[tuple[int, str]]) -> socket.socket:
    """The first passed fd as a socket, checked to be a listening TCP one (AF_INET or
    AF_INET6, SOCK_STREAM); ValueError says what it is instead. Marked close-on-exec:
    forked processes share it, nothing exec'ed gets it."""
    fd, name = fds[0]
    if len(fds) > 1:
        log.warning(
            "systemd passed %d sockets (%s); serving the first (fd %d, %s)",
            len(fds),
            ", ".join(n for _fd, n in fds),
            fd,
            name,
        )
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"fd {fd} from systemd (LISTEN_FDS) is not a socket: {exc}") from exc
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if (
        sock.family not in (socket.AF_INET, socket.AF_INET6)
        or sock.type != socket.SOCK_STREAM
        or not listening
    ):
        what = (
            f"{sock.family.name} {sock.type.name}, {'listening' if listening else 'not listening'}"
        )
        sock.detach()  # systemd's fd: left open, not ours to close
        raise ValueError(
            f"fd {fd} from systemd (LISTEN_FDS) must be a listening TCP socket, not {what}"
        )
    return sock
