"""The root supervisor: owns the shared table and forks every other process.

It never starts an event loop, a thread or a channel, so every fork it makes, at start-up
or to replace a crashed process later, is a clean one (it is its own fork server). It
forks one control-plane process and N data-plane processes, respawns crashed data-plane
processes with backoff, and on SIGTERM drains them and exits 0.
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

from smg.shm import layout
from smg.shm.table import WorkerTable

if TYPE_CHECKING:
    from smg.config import GatewayConfig
    from smg.workers_spec import WorkerSpec

log = logging.getLogger("smg.supervisor")

STARTUP_TIMEOUT_SECS = 60.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to signal this process when its parent exits (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


class StartupError(Exception):
    pass


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
        self.listener: socket.socket | None = None
        self.port = cfg.port
        self._stop_requested = False

    # --- start-up ---------------------------------------------------------------------------

    def _prepare_listener(self) -> None:
        from smg.dataplane.process import BACKLOG, make_listener

        inherit = self.cfg.listen_mode == "inherit"
        try:
            sock = make_listener(self.cfg.host, self.cfg.port, reuse_port=not inherit)
        except OSError as exc:
            raise StartupError(f"cannot bind {self.cfg.host}:{self.cfg.port}: {exc}") from exc
        self.port = sock.getsockname()[1]
        if inherit:
            sock.listen(BACKLOG)
        # In reuseport mode this bound, never-listening socket only holds the port (so a
        # replacement process can always bind it again); the kernel spreads connections
        # over the listening sockets of the group, never to this one.
        self.listener = sock

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
        if child.kind == "control":
            from smg.control.process import run as run_control

            return run_control(self.cfg, self.table, self.pid, self.processes, self.specs)
        from smg.dataplane.process import run as run_dataplane

        inherited = self.listener if self.cfg.listen_mode == "inherit" else None
        if inherited is None and self.listener is not None:
            self.listener.close()
        return run_dataplane(self.cfg, self.table, child.index, self.pid, self.port, inherited)

    def start(self) -> None:
        self._prepare_listener()
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
            self.table.write_proc(child.index, 0, layout.PROC_EMPTY, 0.0)
            if self._stop_requested:
                continue
            if starting or not child.ready:
                raise StartupError(f"data-plane process {child.index} failed at start-up: {reason}")
            self._schedule_respawn(child, reason, f"data-plane process {child.index}")

    def _schedule_respawn(self, child: Child, reason: str, name: str) -> None:
        alive = time.monotonic() - child.started
        child.restarts = 0 if alive > 60 else child.restarts + 1
        delay = min(30.0, 0.25 * (2 ** min(child.restarts, 7)))
        child.respawn_at = time.monotonic() + delay
        child.pid = 0
        log.error("%s exited (%s); replacing it in %.2f s", name, reason, delay)

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for child in [*self.dataplanes, self.control]:
            if child.pid == 0 and child.respawn_at and now >= child.respawn_at:
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
        log.warning(
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
        log.warning("draining (up to %.0f s)", grace)
        self.table.set_gateway_state(layout.GATEWAY_DRAINING)
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
