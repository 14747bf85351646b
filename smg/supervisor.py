"""The root supervisor: owns the shared table and forks every other process.

It never starts an event loop, a thread or a channel, so every fork it makes, at start-up
or to replace a crashed process later, is a clean one (it is its own fork server). It
opens the listening sockets, forks one control-plane process and N data-plane processes,
respawns crashed processes with backoff, and on SIGTERM drains them and exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from smg.dataplane import admission
from smg.shm import layout
from smg.shm.table import WorkerTable

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.workers_spec import WorkerSpec

log = logging.getLogger("smg.supervisor")

STARTUP_TIMEOUT_SECS = 60.0
BACKLOG = 2048
# A crashed data-plane process's listener stays open (connections queue on it for the
# replacement) unless the replacement is due later than this: then it is closed so the
# kernel sends new connections to the other processes meanwhile.
KEEP_LISTENER_MAX_DELAY_SECS = 1.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to signal this process when its parent exits (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


class StartupError(Exception):
    pass


def bind_error(host: str, port: int, exc: OSError) -> StartupError:
    # The Rust SMG's words, so scripts that look for them keep working.
    what = f"{exc.strerror} (os error {exc.errno})" if exc.errno else str(exc)
    return StartupError(f"Failed to bind the HTTP listener on {host}:{port}: {what}")


def _tcp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR lets a restarted gateway bind over its predecessor's TIME_WAIT
    # connections; it never allows a second listener on the port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def open_listeners(host: str, port: int, count: int, reuse_port: bool) -> list[socket.socket]:
    """Bind and listen on ``count`` sockets on one port (one, without SO_REUSEPORT, when
    ``reuse_port`` is false); ``port`` 0 picks a free port for all of them.

    The first socket is bound *without* SO_REUSEPORT and gets it only after the bind: a
    plain bind fails on a port any other socket holds, SO_REUSEPORT or not, so a second
    smg (whose sockets would otherwise join this group, as the kernel allows for the same
    user) or any other server on the port is refused. The others then join its group."""
    sockets: list[socket.socket] = []
    try:
        first = _tcp_socket(host)
        sockets.append(first)
        first.bind((host, port))
        port = first.getsockname()[1]
        if reuse_port:
            first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.listen(BACKLOG)
        for _ in range(count - 1 if reuse_port else 0):
            sockets.append(join_listener_group(host, port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def join_listener_group(host: str, port: int) -> socket.socket:
    """One more SO_REUSEPORT listener in the group already on ``port``."""
    sock = _tcp_socket(host)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class Child:
    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.restarts = 0
        self.respawn_at = 0.0


class Supervisor:
    def __init__(
        self,
        cfg: GatewayConfig,
        processes: int,
        specs: list[WorkerSpec],
        mock_process: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.cfg = cfg
        self.processes = processes
        self.specs = specs
        self.mock_process = mock_process
        self.pid = os.getpid()
        self.table = WorkerTable.create(cfg.worker_table_capacity, processes, self.pid)
        self.children: dict[int, Child] = {}  # pid -> child
        self.dataplanes = [Child("dataplane", i) for i in range(processes)]
        self.control = Child("control", -1)
        # Reuseport mode: listener i belongs to data-plane process i and outlives it, so
        # its replacement accepts what queued meanwhile. Inherit mode: one shared socket.
        self.listeners: list[socket.socket | None] = []
        self.shared_listener = cfg.listen_mode == "inherit"
        self.port = cfg.port
        self._stop_requested = False

    # --- start-up ---------------------------------------------------------------------------

    def _open_listeners(self) -> None:
        host, port = self.cfg.host, self.cfg.port
        try:
            listeners = open_listeners(host, port, self.processes, not self.shared_listener)
        except OSError as exc:
            raise bind_error(host, port, exc) from exc
        self.port = listeners[0].getsockname()[1]
        self.listeners = list(listeners)

    def _listener_for(self, index: int) -> socket.socket | None:
        return self.listeners[0 if self.shared_listener else index]

    def _close_listeners(self) -> None:
        for i, sock in enumerate(self.listeners):
            if sock is not None:
                sock.close()
                self.listeners[i] = None

    def _fork(self, child: Child) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                die_with_parent()
                if os.getppid() != self.pid:  # the parent died before prctl took effect
                    os._exit(1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                code = self._child_main(child)
            except BaseException:
                logging.getLogger("smg").exception("%s process crashed", child.kind)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        child.pid = pid
        child.started = time.monotonic()
        child.ready = False
        self.children[pid] = child

    def _child_main(self, child: Child) -> int:
        # A child keeps only the listener it serves: a copy left open elsewhere would keep a
        # listener accepting into a queue nobody reads once its own process closed it.
        own = self._listener_for(child.index) if child.kind == "dataplane" else None
        for sock in self.listeners:
            if sock is not None and sock is not own:
                sock.close()
        if child.kind == "control":
            from smg.control.process import run as run_control

            return run_control(self.cfg, self.table, self.pid, self.processes, self.specs)
        from smg.dataplane.process import run as run_dataplane

        assert own is not None
        return run_dataplane(self.cfg, self.table, child.index, self.pid, own)

    def start(self) -> None:
        self._open_listeners()
        self._fork(self.control)
        for child in self.dataplanes:
            self._fork(child)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECS
        while True:
            self._reap(starting=True)
            ready = all(
                self.table.read_proc(c.index).state == layout.PROC_READY for c in self.dataplanes
            )
            if ready and self._control_ready():
                for child in self.dataplanes:
                    child.ready = True
                self.control.ready = True
                return
            if self._stop_requested:
                raise StartupError("stopped by a signal during start-up")
            if time.monotonic() > deadline:
                raise StartupError("processes did not become ready in time")
            time.sleep(0.02)

    def _control_ready(self) -> bool:
        from smg import ipc

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(ipc.control_plane_address(self.pid))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    # --- running ------------------------------------------------------------------------------

    def _reap(self, starting: bool = False) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if child.kind == "control":
                # It was the only writer of rows and directory: a kill between the two
                # sequence stores of a write would leave readers (and the replacement)
                # waiting on an odd word forever.
                repaired = self.table.repair_sequences()
                if repaired:
                    log.warning("repaired %d sequence word(s) left mid-write", repaired)
                if self._stop_requested:
                    continue
                if starting or not child.ready:
                    raise StartupError(f"control-plane process exited with code {code}")
                # Routing goes on from the table meanwhile; the replacement takes over the
                # workers from the table's directory.
                self._schedule_respawn(child, f"exit code {code}", "control-plane process")
                continue
            slot = self.table.read_proc(child.index)
            reason = slot.reason or f"exit code {code}"
            # Its in-flight counts can never be decremented now: zero them before anyone
            # replaces it.
            self.table.zero_process(child.index)
            admission.reclaim_process(self.table, child.index)  # its permits and queue places
            self.table.write_proc(child.index, 0, layout.PROC_EMPTY, 0.0)
            if self._stop_requested:
                continue
            if starting or not child.ready:
                raise StartupError(f"data-plane process {child.index} failed at start-up: {reason}")
            delay = self._schedule_respawn(child, reason, f"data-plane process {child.index}")
            others_listen = any(
                sock is not None for i, sock in enumerate(self.listeners) if i != child.index
            )
            if delay > KEEP_LISTENER_MAX_DELAY_SECS and not self.shared_listener and others_listen:
                # Crash-looping: the queue would wait too long; the kernel stops sending
                # connections to a closed listener. The replacement joins the group anew.
                # The last open listener is kept, so the port is never free for another.
                sock = self.listeners[child.index]
                if sock is not None:
                    sock.close()
                    self.listeners[child.index] = None

    def _schedule_respawn(self, child: Child, reason: str, name: str) -> float:
        alive = time.monotonic() - child.started
        child.restarts = 0 if alive > 60 else child.restarts + 1
        delay = min(30.0, 0.25 * (2 ** min(child.restarts, 7)))
        child.respawn_at = time.monotonic() + delay
        child.pid = 0
        log.error("%s exited (%s); replacing it in %.2f s", name, reason, delay)
        return delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for child in [*self.dataplanes, self.control]:
            if child.pid == 0 and child.respawn_at and now >= child.respawn_at:
                if child.kind == "dataplane" and self._listener_for(child.index) is None:
                    try:
                        self.listeners[child.index] = join_listener_group(self.cfg.host, self.port)
                    except OSError as exc:
                        self._schedule_respawn(
                            child,
                            f"cannot listen again: {exc}",
                            f"data-plane process {child.index}",
                        )
                        continue
                child.respawn_at = 0.0
                self._fork(child)
                child.ready = True  # a replacement that fails is respawned again, not fatal

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        try:
            self.start()
        except StartupError as exc:
            log.error("smg failed to start: %s", exc)
            print(f"smg: failed to start: {exc}", file=sys.stderr, flush=True)
            self._terminate_all(grace=2.0)
            return 1
        log.info(
            "smg ready on http://%s:%d with %d data-plane process(es)",
            self.cfg.host,
            self.port,
            self.processes,
        )
        print(f"SMG_READY http://{self.cfg.host}:{self.port}", flush=True)
        try:
            while not self._stop_requested:
                self._reap()
                self._respawn_due()
                time.sleep(0.05)
        except StartupError as exc:
            log.error("smg stopping: %s", exc)
            self._terminate_all(grace=2.0)
            return 1
        return self._shutdown()

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stop_requested = True

    def _shutdown(self) -> int:
        grace = float(self.cfg.shutdown_grace_period_secs)
        log.info("draining (up to %.0f s)", grace)
        self.table.set_gateway_state(layout.GATEWAY_DRAINING)
        # The data-plane processes hold their own copies: each listener closes when its
        # process stops accepting, not later.
        self._close_listeners()
        dataplane_pids = [c.pid for c in self.dataplanes if c.pid]
        for pid in dataplane_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._wait_for(dataplane_pids, grace + 5.0)
        self._terminate_all(grace=5.0)
        return 0

    def _wait_for(self, pids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(pids)
        while waiting and time.monotonic() < deadline:
            for pid in list(waiting):
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    waiting.discard(pid)
                    self.children.pop(pid, None)
            time.sleep(0.02)
        for pid in waiting:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _terminate_all(self, grace: float) -> None:
        self._close_listeners()
        pids = list(self.children)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._wait_for(pids, grace)
        if self.mock_process is not None and self.mock_process.poll() is None:
            self.mock_process.terminate()
            try:
                self.mock_process.wait(5)
            except subprocess.TimeoutExpired:
                self.mock_process.kill()
