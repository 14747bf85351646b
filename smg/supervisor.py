"""The root supervisor: owns the shared table and forks every other process.

It never starts an event loop, a thread or a channel, so every fork it makes, at start-up
or to replace a crashed process later, is a clean one (it is its own fork server). It
opens the listening sockets, forks one control-plane process and N data-plane processes,
respawns crashed processes with backoff, replaces a data-plane process whose event loop
stopped beating (after dumping its stack), re-reads the configuration on SIGHUP and rolls
it out one process at a time, and on SIGTERM drains them and exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import msgspec

from smg import ipc
from smg.dataplane import admission
from smg.logs import setup_child_logging
from smg.policies.shared import SharedRouting
from smg.posture import posture_warning
from smg.shm import layout
from smg.shm.readiness import routable
from smg.shm.stash import Stash
from smg.shm.table import WorkerTable
from smg.systemd import (
    WATCHDOG_MESSAGE,
    SystemdEnv,
    due,
    ready_message,
    reloading_message,
    status_message,
    status_text,
    stopping_message,
)
from smg.tlsconf import (
    ServerTls,
    TlsError,
    load_worker_tls,
    server_tls_from,
    set_inherited_worker_tls,
)

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
# A data-plane process whose heartbeat is stale gets DUMP_SIGNAL (faulthandler writes its
# Python stacks to the log), then SIGKILL this long after. REPLACE_SIGNAL tells a process
# it has been replaced by a live reload: stop accepting now, finish, exit.
DUMP_SIGNAL = signal.SIGUSR1
REPLACE_SIGNAL = signal.SIGUSR2
DUMP_WAIT_SECS = 0.5
# A live reload's new process must be ready within this, or the rollout stops there.
REPLACEMENT_READY_TIMEOUT_SECS = 60.0
# systemd READY=1 waits for the control plane's first health round at most this long after
# the data plane listens; then it is sent anyway, its STATUS saying so (start-up never hangs).
FIRST_HEALTH_ROUND_WAIT_SECS = 60.0
# STATUS= is recomputed (a directory read) at most this often, and sent when it changed.
STATUS_INTERVAL_SECS = 1.0


def heartbeat_interval(cfg: GatewayConfig) -> float:
    """How often a data-plane process beats: well inside the timeout, at most 4 per second."""
    return max(0.02, min(0.25, float(cfg.dataplane_heartbeat_timeout_secs) / 4))


def heartbeat_stale(beat_ns: int, now_ns: int, timeout_secs: float) -> bool:
    """Whether a beat written at `beat_ns` (0: none yet) is older than the timeout."""
    return beat_ns != 0 and now_ns - beat_ns > timeout_secs * 1e9


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
    def __init__(self, kind: str, index: int, slot: int | None = None) -> None:
        self.kind = kind
        self.index = index  # listener number (x-smg-process)
        self.slot = index if slot is None else slot  # slot in the shared table
        self.kill_reason = ""  # "heartbeat" once the supervisor decided to kill it
        self.kill_at = 0.0  # when the SIGKILL is due (after the stack dump)
        self.retiring = False  # replaced by a live reload, draining
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.restarts = 0
        self.respawn_at = 0.0


class Rollout:
    """A live reload in progress: data-plane processes replaced one index at a time.
    `previous` is the configuration to go back to if a new process fails (None for a
    rollback itself)."""

    def __init__(
        self,
        indexes: list[int],
        previous: GatewayConfig | None,
        previous_tls: ServerTls | None = None,
    ) -> None:
        self.pending = indexes
        self.previous = previous
        self.previous_tls = previous_tls  # the listener's certificate to go back to
        self.replaced: list[int] = []
        self.new: Child | None = None  # started, not ready yet
        self.new_deadline = 0.0
        self.old: Child | None = None  # replaced, draining: the next waits for its slot
        self.old_deadline = 0.0


class Supervisor:
    def __init__(
        self,
        cfg: GatewayConfig,
        processes: int,
        specs: list[WorkerSpec],
        mock_process: subprocess.Popen[bytes] | None = None,
        argv: list[str] | None = None,
        systemd: SystemdEnv | None = None,
        activated: socket.socket | None = None,
    ) -> None:
        self.cfg = cfg
        self.argv = argv  # what SIGHUP re-reads (None: reload refused, nothing to re-read)
        self.processes = processes
        self.specs = specs
        self.mock_process = mock_process
        self.pid = os.getpid()
        # One slot more than processes: during a live reload the new process of a listener
        # runs beside the old one, each with its own in-flight counts and process words.
        self.table = WorkerTable.create(cfg.worker_table_capacity, processes + 1, self.pid)
        # The control plane's folded metric totals, kept for its replacement if it dies.
        self.stash = Stash.create()
        # Routing state every data-plane process shares (cache_aware's prefix index,
        # sticky-key pins): made before any fork so each child inherits the same mappings;
        # one region per slot.
        self.shared = SharedRouting.create(cfg, processes + 1)
        self.children: dict[int, Child] = {}  # pid -> child
        self.dataplanes = [Child("dataplane", i) for i in range(processes)]
        self.control = Child("control", -1)
        self.retiring: list[Child] = []  # replaced by a reload, draining
        self.rollout: Rollout | None = None
        self._reload_requested = False
        # Reuseport mode: listener i belongs to data-plane process i and outlives it, so
        # its replacement accepts what queued meanwhile. Inherit mode: one shared socket.
        self.listeners: list[socket.socket | None] = []
        # A socket systemd opened (socket activation) is served as one shared listener,
        # as --listen-mode inherit: it cannot be joined by SO_REUSEPORT siblings.
        self.activated = activated
        self.shared_listener = cfg.listen_mode == "inherit" or activated is not None
        self.host = cfg.host
        self.port = cfg.port
        # systemd notify state (smg.systemd); all of it idle without NOTIFY_SOCKET.
        self.systemd = systemd or SystemdEnv()
        self._ready_sent = False
        self._ready_deadline = 0.0
        self._reloading = False
        self._status = ""
        self._status_at: float | None = None
        self._watchdog_at: float | None = None
        self._stop_requested = False
        # The listener's certificate and key (None: plain HTTP), read before any fork and
        # again on SIGHUP; each data-plane process builds its SSLContext from it.
        self.server_tls: ServerTls | None = None

    def load_tls(self) -> None:
        """Read and check every certificate, key and CA file before anything is forked;
        TlsError says which file is wrong. The worker-side material is inherited by the
        children through the fork (fixed until a restart)."""
        self.server_tls = server_tls_from(self.cfg)
        set_inherited_worker_tls(load_worker_tls(self.cfg))
        if self.server_tls is not None:
            log.info("serving TLS on --port: %s", self.server_tls.description)
            if self.server_tls.description.endswith("(EXPIRED)"):
                log.warning("the --tls-cert-path certificate has expired: clients will refuse it")

    # --- start-up ---------------------------------------------------------------------------

    def _open_listeners(self) -> None:
        if self.activated is not None:
            self.host, self.port = self.activated.getsockname()[:2]
            self.listeners = [self.activated]
            log.info("serving the socket systemd passed (%s:%d)", self.host, self.port)
            if self.cfg.port not in (0, self.port):
                log.warning(
                    "--port %d is ignored: serving port %d, the socket systemd passed",
                    self.cfg.port,
                    self.port,
                )
            return
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
                # This process's own log file and process stamp, before it logs anything.
                setup_child_logging(self.cfg, child.kind, child.index, child.slot)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                # SIGHUP is the root's (reload); a hangup of the group must not kill children.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
        child.kill_reason = ""
        child.kill_at = 0.0
        self.children[pid] = child

    def _child_main(self, child: Child) -> int:
        # A child keeps only the listener it serves: a copy left open elsewhere would keep a
        # listener accepting into a queue nobody reads once its own process closed it.
        own = self._listener_for(child.index) if child.kind == "dataplane" else None
        for sock in self.listeners:
            if sock is not None and sock is not own:
                sock.close()
        if self.systemd.notifier is not None:
            self.systemd.notifier.close()  # the root's alone (NotifyAccess=main)
        if child.kind == "control":
            from smg.control.process import run as run_control

            return run_control(
                self.cfg, self.table, self.pid, self.processes, self.specs, self.stash, self.shared
            )
        from smg.dataplane.process import run as run_dataplane

        assert own is not None
        return run_dataplane(
            self.cfg,
            self.table,
            child.index,
            self.pid,
            own,
            slot=child.slot,
            tls=self.server_tls,
            shared=self.shared,
        )

    def start(self) -> None:
        self._open_listeners()
        self._fork(self.control)
        for child in self.dataplanes:
            self._fork(child)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECS
        while True:
            self._reap(starting=True)
            ready = all(
                self.table.read_proc(c.slot).state == layout.PROC_READY for c in self.dataplanes
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
            slot = self.table.read_proc(child.slot)
            reason = slot.reason or f"exit code {code}"
            # Its in-flight counts can never be decremented now: zero them before anyone
            # replaces it.
            self._free_slot(child.slot)
            if self._stop_requested:
                continue
            rollout = self.rollout
            if child.retiring:
                self.retiring.remove(child)
                continue
            if rollout is not None and rollout.new is child:
                self._rollout_failed(rollout, f"the new data-plane process failed: {reason}")
                continue
            if starting or not child.ready:
                raise StartupError(f"data-plane process {child.index} failed at start-up: {reason}")
            cause = child.kill_reason or "crash"
            self._count(layout.G_DP_RESTARTS + layout.RESTART_WORDS[cause])
            if cause == "heartbeat":
                reason = f"no heartbeat for {self.cfg.dataplane_heartbeat_timeout_secs} s"
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

    def _free_slot(self, slot: int) -> None:
        """Zero a gone process's slot: in-flight counts, admission permits and queue places
        (returned to the gateway-wide words), state, heartbeat."""
        self.table.zero_process(slot)
        admission.reclaim_process(self.table, slot)
        self.table.atomic.store_u64(self.table.proc_word_offset(slot, layout.P_HEARTBEAT_NS), 0)
        self.table.write_proc(slot, 0, layout.PROC_EMPTY, 0.0)

    def _count(self, offset: int) -> None:
        """One more in a supervisor-owned counter word (G_DP_RESTARTS, G_CONFIG_RELOADS)."""
        self.table.atomic.fetch_add_u64(self.table.global_offset(offset), 1)

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

    # --- heartbeats -----------------------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        """Replace a data-plane process whose loop has not beaten within the timeout: dump
        its Python stacks to the log first (faulthandler, DUMP_SIGNAL), SIGKILL it a moment
        later; its exit is then handled as a crash (respawn, slot zeroed), counted as
        `heartbeat`. Its connections close with it, so a request it held gets an error."""
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        timeout = float(self.cfg.dataplane_heartbeat_timeout_secs)
        atomic = self.table.atomic
        candidates = [*self.dataplanes, *self.retiring]
        if self.rollout is not None and self.rollout.new is not None:
            candidates.append(self.rollout.new)
        for child in candidates:
            if not child.pid or child.pid not in self.children:
                continue
            if child.kill_at:
                if now >= child.kill_at:
                    child.kill_at = math.inf  # once
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
                continue
            proc = self.table.read_proc(child.slot)
            if proc.pid != child.pid or proc.state not in (layout.PROC_READY, layout.PROC_DRAINING):
                continue
            beat = atomic.load_u64(self.table.proc_word_offset(child.slot, layout.P_HEARTBEAT_NS))
            if not heartbeat_stale(beat, now_ns, timeout):
                continue
            log.error(
                "data-plane process %d (pid %d) has not beaten for %.1f s (timeout %s s): "
                "dumping its stack to the log, then replacing it",
                child.index,
                child.pid,
                (now_ns - beat) / 1e9,
                timeout,
            )
            child.kill_reason = "heartbeat"
            child.kill_at = now + DUMP_WAIT_SECS
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, DUMP_SIGNAL)

    # --- live reload ------------------------------------------------------------------------------

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self._reload_requested = True

    def _reload(self) -> None:
        """SIGHUP: re-read and validate the configuration; refuse it whole if invalid, else
        apply what may change live and roll the data plane over to it."""
        from smg.config import ConfigError, load_config
        from smg.logs import set_level
        from smg.reload import needs_rollout, plan_reload

        self._reload_requested = False
        if self.argv is None:
            log.error("configuration reload refused: this supervisor has no command line")
            self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["failure"])
            return
        try:
            new = load_config(self.argv, os.environ)
        except (ConfigError, SystemExit, Exception) as exc:  # refuse, never die
            log.error("configuration reload refused, the running one stays: %s", exc)
            self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["failure"])
            return
        plan = plan_reload(self.cfg, new)
        try:
            # The certificate is re-read even when no setting changed: renewing it in place
            # and sending SIGHUP is how it is rotated. A broken one refuses the reload whole.
            new_tls = server_tls_from(plan.cfg)
        except TlsError as exc:
            log.error("configuration reload refused, the running one stays: %s", exc)
            self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["failure"])
            return
        if new_tls != self.server_tls:
            plan = plan_reload(self.cfg, new, content_changed=["tls_cert_path"])
        for name, running, refused in plan.kept:
            log.warning(
                "reload: --%s changed (%r -> %r) but needs a restart; keeping %r",
                name.replace("_", "-"),
                running,
                refused,
                running,
            )
        if not plan.changed:
            self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["success"])
            log.info("configuration reloaded: nothing changed")
            return
        log.info("configuration reloaded; changed: %s", ", ".join(plan.changed))
        previous, previous_tls = self.cfg, self.server_tls
        self.cfg = plan.cfg
        if new_tls != self.server_tls and new_tls is not None:
            log.info("reload: new TLS certificate: %s", new_tls.description)
        self.server_tls = new_tls
        set_level(plan.cfg.log_level)  # children forked from now on inherit it
        self._send_config_to_control()
        if needs_rollout(plan.changed):
            # Counted as a success once every process runs it (a failure if one cannot).
            self.rollout = Rollout(list(range(self.processes)), previous, previous_tls)
        else:
            self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["success"])

    def _rollout_failed(self, rollout: Rollout, why: str) -> None:
        """A new process could not start: the old one of that index keeps serving; go back
        to the previous configuration (the processes already replaced are replaced again)."""
        self.rollout = None
        if rollout.previous is None:
            log.error("reload: rolling back failed too (%s); processes keep running", why)
            return
        log.error("reload failed (%s); going back to the previous configuration", why)
        self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["failure"])
        self.cfg = rollout.previous
        self.server_tls = rollout.previous_tls
        from smg.logs import set_level

        set_level(self.cfg.log_level)
        self._send_config_to_control()
        if rollout.replaced:
            self.rollout = Rollout(list(rollout.replaced), None)

    def _send_config_to_control(self) -> None:
        """Hand the control plane the new configuration (health checks, log level, worker
        list). A blocking call with a short timeout: the root has no loop. If the control
        plane is down, its replacement is forked with the new configuration anyway."""
        message = {"kind": "reload", "config": self.cfg}
        try:
            answer = blocking_call(ipc.control_plane_address(self.pid), message, 5.0)
        except (OSError, ValueError) as exc:
            log.warning("reload: the control plane did not take the new configuration: %r", exc)
            return
        if not isinstance(answer, dict) or not answer.get("ok"):
            log.warning("reload: the control plane answered %r", answer)

    def _free_slot_for_new(self) -> int | None:
        used = {c.slot for c in self.dataplanes} | {c.slot for c in self.retiring}
        for slot in range(self.table.slots):
            if slot not in used and self.table.read_proc(slot).pid == 0:
                return slot
        return None

    def _advance_rollout(self) -> None:
        """One step of a live reload: start the next index's new process on the same
        listener in the free slot; once it is ready (accepting), tell the old one to stop
        accepting and drain; wait for the old one to exit (freeing its slot); go on."""
        rollout = self.rollout
        if rollout is None:
            return
        now = time.monotonic()
        old = rollout.old
        if old is not None:
            if old.pid in self.children:
                if now > rollout.old_deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old.pid, signal.SIGKILL)
                    rollout.old_deadline = math.inf
                return
            rollout.old = None
        new = rollout.new
        if new is not None:
            state = self.table.read_proc(new.slot)
            if state.pid == new.pid and state.state == layout.PROC_READY:
                self._switch_over(rollout, new)
            elif now > rollout.new_deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(new.pid, signal.SIGKILL)
                new.retiring = True  # reaped as a retiring process: its slot is freed
                self.retiring.append(new)
                self._rollout_failed(
                    rollout,
                    f"the new data-plane process was not ready in "
                    f"{REPLACEMENT_READY_TIMEOUT_SECS:.0f} s",
                )
            return
        if not rollout.pending:
            self.rollout = None
            if rollout.previous is not None:
                self._count(layout.G_CONFIG_RELOADS + layout.RELOAD_WORDS["success"])
                log.info("reload: every data-plane process runs the new configuration")
            else:
                log.info("reload: every data-plane process runs the previous configuration")
            return
        slot = self._free_slot_for_new()
        if slot is None:
            return  # a slot is still being freed
        index = rollout.pending.pop(0)
        if self._listener_for(index) is None:
            return  # crash-looping with its listener closed: its respawn gets the new config
        child = Child("dataplane", index, slot)
        rollout.new = child
        rollout.new_deadline = now + REPLACEMENT_READY_TIMEOUT_SECS
        self._fork(child)

    def _switch_over(self, rollout: Rollout, new: Child) -> None:
        old = self.dataplanes[new.index]
        new.ready = True
        self.dataplanes[new.index] = new
        rollout.new = None
        rollout.replaced.append(new.index)
        self._count(layout.G_DP_RESTARTS + layout.RESTART_WORDS["reload"])
        if old.pid and old.pid in self.children:
            old.retiring = True
            self.retiring.append(old)
            rollout.old = old
            rollout.old_deadline = (
                time.monotonic() + float(self.cfg.shutdown_grace_period_secs) + 5.0
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, REPLACE_SIGNAL)
        log.info(
            "reload: data-plane process %d replaced (pid %d -> %d, slot %d -> %d)",
            new.index,
            old.pid,
            new.pid,
            old.slot,
            new.slot,
        )

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.load_tls()
        except TlsError as exc:
            # A configuration error, reported and exited on like the others (status 2).
            log.error("smg failed to start: %s", exc)
            print(f"smg launch: {exc}", file=sys.stderr, flush=True)
            self._terminate_all(grace=2.0)
            return 2
        try:
            self.start()
        except StartupError as exc:
            log.error("smg failed to start: %s", exc)
            print(f"smg: failed to start: {exc}", file=sys.stderr, flush=True)
            self._terminate_all(grace=2.0)
            return 1
        scheme = "http" if self.server_tls is None else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        log.info(
            "smg ready on %s://%s:%d with %d data-plane process(es)",
            scheme,
            host,
            self.port,
            self.processes,
        )
        print(f"SMG_READY {scheme}://{host}:{self.port}", flush=True)
        log.warning("%s", posture_warning(self.cfg))
        self._ready_deadline = time.monotonic() + FIRST_HEALTH_ROUND_WAIT_SECS
        try:
            while not self._stop_requested:
                self._reap()
                self._respawn_due()
                self._check_heartbeats()
                if self._reload_requested and self.rollout is None:
                    self._notify_reloading()
                    self._reload()  # one at a time: a SIGHUP during a rollout waits for it
                self._advance_rollout()
                self._notify_tick()
                time.sleep(0.05)
        except StartupError as exc:
            log.error("smg stopping: %s", exc)
            self._terminate_all(grace=2.0)
            return 1
        return self._shutdown()

    # --- systemd notify ---------------------------------------------------------------------

    def _notify_reloading(self) -> None:
        """RELOADING=1 as a SIGHUP reload starts; `_notify_tick` sends READY=1 once it has
        ended (refused, nothing changed, applied, rolled out or rolled back). Not before the
        first READY=1: systemd does not reload a service still starting."""
        if self.systemd.notifier is None or not self._ready_sent:
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.systemd.notifier.send(reloading_message(usec))
        self._reloading = True

    def _notify_tick(self) -> None:
        """Once per poll: the first READY=1 (after the first health round, bounded), the
        READY=1 that ends a reload, STATUS= when its text changed, WATCHDOG=1 on pace."""
        notifier = self.systemd.notifier
        if notifier is None:
            return
        now = time.monotonic()
        if not self._ready_sent:
            done = bool(
                self.table.atomic.load_u64(self.table.global_offset(layout.G_FIRST_HEALTH_ROUND))
            )
            if done or now >= self._ready_deadline:
                status = self._status_text()
                self._status, self._status_at = status, now
                if not done:
                    log.warning(
                        "the first health round did not end in %.0f s; telling systemd ready",
                        FIRST_HEALTH_ROUND_WAIT_SECS,
                    )
                    status += (
                        f" (first health round not done after {FIRST_HEALTH_ROUND_WAIT_SECS:.0f} s)"
                    )
                notifier.send(ready_message(status))
                self._ready_sent = True
        elif self._reloading and self.rollout is None:
            self._reloading = False
            self._status, self._status_at = self._status_text(), now
            notifier.send(ready_message(self._status))
        elif due(self._status_at, STATUS_INTERVAL_SECS, now):
            self._status_at = now
            status = self._status_text()
            if status != self._status:
                self._status = status
                notifier.send(status_message(status))
        interval = self.systemd.watchdog_interval
        if (
            interval is not None
            and due(self._watchdog_at, interval, now)
            and self._dataplane_fresh()
        ):
            self._watchdog_at = now
            notifier.send(WATCHDOG_MESSAGE)

    def _dataplane_fresh(self) -> bool:
        """The watchdog rule: WATCHDOG=1 only while every configured data-plane process has
        beaten within --dataplane-heartbeat-timeout-secs, the rule `_check_heartbeats`
        replaces a process on. A process being replaced (marked for the kill, or pid 0
        waiting for its respawn) or not yet beating is not fresh. So systemd sees a data
        plane the supervisor keeps failing to revive and restarts the whole service."""
        now_ns = time.monotonic_ns()
        timeout = float(self.cfg.dataplane_heartbeat_timeout_secs)
        for child in self.dataplanes:
            if not child.pid or child.pid not in self.children or child.kill_reason:
                return False
            if self.table.read_proc(child.slot).pid != child.pid:
                return False
            beat = self.table.atomic.load_u64(
                self.table.proc_word_offset(child.slot, layout.P_HEARTBEAT_NS)
            )
            if beat == 0 or heartbeat_stale(beat, now_ns, timeout):
                return False
        return True

    def _status_text(self) -> str:
        try:
            _generation, directory = self.table.read_directory()
            workers = len(directory.entries)
            ready = sum(
                1 for e in directory.entries if routable(self.table.read_row(e.row), e.generation)
            )
        except RuntimeError as exc:
            # A control plane killed mid-write (not reaped yet: the sequence word is repaired
            # then) leaves the directory busy: keep the last text, never stop the poll loop.
            log.debug("STATUS not updated: %s", exc)
            return self._status
        processes = sum(
            1
            for c in self.dataplanes
            if c.pid
            and (proc := self.table.read_proc(c.slot)).pid == c.pid
            and proc.state == layout.PROC_READY
        )
        return status_text(ready, workers, processes, self.processes)

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stop_requested = True

    def _shutdown(self) -> int:
        grace = float(self.cfg.shutdown_grace_period_secs)
        log.info("draining (up to %.0f s)", grace)
        if self.systemd.notifier is not None:
            self.systemd.notifier.send(stopping_message(f"draining (up to {grace:.0f} s)"))
        self.table.set_gateway_state(layout.GATEWAY_DRAINING)
        # The data-plane processes hold their own copies: each listener closes when its
        # process stops accepting, not later.
        self._close_listeners()
        dataplane_pids = [c.pid for c in [*self.dataplanes, *self.retiring] if c.pid]
        if self.rollout is not None and self.rollout.new is not None:
            dataplane_pids.append(self.rollout.new.pid)
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


def blocking_call(address: str, message: object, timeout: float) -> object:
    """One request and answer over the local channel without an event loop (the root has
    none): the same frames and the same peer check as `smg.ipc.call`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
        if ipc.peer_uid(sock) != os.geteuid():
            raise ipc.PeerRefused(f"{address[1:]!r} is served by another user")
        sock.sendall(ipc.encode_frame(message))
        header = _recv_exactly(sock, 4)
        (length,) = struct.unpack("!I", header)
        if length > ipc.MAX_FRAME:
            raise ValueError(f"frame of {length} bytes")
        return msgspec.msgpack.decode(_recv_exactly(sock, length))
    finally:
        sock.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the peer closed the channel")
        chunks += chunk
    return bytes(chunks)
