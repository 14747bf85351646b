"""Logging set-up: the supervisor's before any fork, each child's right after its fork.

Every process writes its own lines: the console (stderr, shared, as before) and, with
``--log-dir``, a file of its own that no other process writes (``smg.log`` the
supervisor, ``control.log`` the control plane, ``dataplane-<slot>.log`` each data-plane
process, by table slot: during a live reload the replacement of listener i runs beside
the old process in another slot). One writer per file means rotation needs no lock and
lines never interleave. Files rotate by size (``--log-max-bytes``, ``--log-backup-count``
kept as ``<name>.1`` ... ``<name>.N``).

The Rust SMG 1.13 writes one file, ``<dir>/smg.YYYY-MM-DD``, rolled daily by
tracing-appender; smg rolls by size instead, because N processes each own a file and a
busy day's access log has no natural bound.

``--log-json`` lines follow 1.13's shape: ``timestamp``, ``level`` (upper case),
``message``, the event's fields at top level, ``target`` (the logger), plus ``process``
(the data-plane listener index, or ``"control"`` / ``"supervisor"``) and ``pid``. Fields
come from ``extra=`` on the logging call (``request_id``, ``worker``, ``status``...).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# The Rust SMG's level names (tracing's), so one log pipeline reads both gateways.
_LEVEL_NAMES = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "ERROR",
}
# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", "smg_process", "_smg_line"}
)
# JSON keys the formatter owns: an `extra=` field of the same name is renamed, not lost.
_RESERVED = frozenset({"timestamp", "level", "message", "target", "process", "pid", "exception"})

ACCESS_LOGGER = "smg.access"
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class _SecondCache:
    """strftime once per second, not once per line (the access log writes thousands)."""

    def __init__(self, fmt: str, convert: Any) -> None:
        self.fmt = fmt
        self.convert = convert
        self.second = -1
        self.text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second = second
            self.text = time.strftime(self.fmt, self.convert(second))
        return self.text


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = _SecondCache("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        # One line per record, whichever handler asks first (stderr and the file share it).
        line = record.__dict__.get("_smg_line")
        if line is None:
            line = record._smg_line = self._format(record)
        return line

    def _format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": f"{self._second(record.created)}.{int(record.msecs):03d}Z",
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            payload[f"field_{key}" if key in _RESERVED else key] = value
        payload["target"] = record.name
        payload["process"] = getattr(record, "smg_process", "supervisor")
        payload["pid"] = record.process
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        # default=str: a field that JSON cannot hold (bytes, an exception) is still written.
        return orjson.dumps(payload, default=str).decode()


def _logfmt(value: Any) -> str:
    """A field value as one logfmt token: quoted (JSON string escapes) when it holds a space,
    a quote, '=' or a control character, so a client-sent value cannot forge a line or a
    field."""
    text = value if isinstance(value, str) else str(value)
    if text and all(0x21 <= ord(c) <= 0x7E and c not in '"=' for c in text):
        return text
    return orjson.dumps(text).decode()


class TextFormatter(logging.Formatter):
    """The plain line, then the process and any `extra=` fields as `key=value`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d %(name)s] %(message)s")
        self._second = _SecondCache(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._second(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get("_smg_line")
        if line is None:
            line = record._smg_line = self._format(record)
        return line

    def _format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # The process and the fields after the message: the head keeps its long-standing
        # `LEVEL [pid logger]` shape, which tools (and tests) read.
        parts = [f"process={getattr(record, 'smg_process', 'supervisor')}"]
        parts.extend(f"{k}={_logfmt(v)}" for k, v in _fields(record).items())
        extra = " ".join(parts)
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {extra}{sep}{tail}"


class ProcessStamp(logging.Filter):
    """Stamps each record with the process it came from (set after the fork)."""

    def __init__(self, process: int | str) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.smg_process = self.process
        return True


class SizeRotatingFileHandler(logging.FileHandler):
    """A file of this process alone, rotated once it passes `max_bytes`.

    Rotation keeps the file descriptor: the new file is dup2()ed onto it. faulthandler
    (the heartbeat stack dump) holds that descriptor number, and a closed one could be
    reused by a socket and receive the dump.
    """

    def __init__(self, path: str, max_bytes: int, backup_count: int) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        assert self.stream is not None
        self.size = os.fstat(self.stream.fileno()).st_size

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = self.stream
            stream.write(line + "\n")
            stream.flush()
            self.size += len(line) + 1
            if self.max_bytes and self.size >= self.max_bytes:
                self.rotate()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def rotate(self) -> None:
        path = self.baseFilename
        if self.backup_count > 0:
            for i in range(self.backup_count - 1, 0, -1):
                older = f"{path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.dup2(fd, self.stream.fileno())
            finally:
                os.close(fd)
        else:
            os.ftruncate(self.stream.fileno(), 0)
        self.size = 0


def _handlers(
    as_json: bool,
    log_dir: str | None,
    file_name: str,
    process: int | str,
    max_bytes: int,
    backup_count: int,
) -> list[logging.Handler]:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(
            SizeRotatingFileHandler(os.path.join(log_dir, file_name), max_bytes, backup_count)
        )
    formatter: logging.Formatter = JsonFormatter() if as_json else TextFormatter()
    stamp = ProcessStamp(process)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(stamp)
    return handlers


def _install(handlers: list[logging.Handler], level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        # Inherited from the parent: close this process's copy of the file only.
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def setup_logging(
    level: str,
    as_json: bool = False,
    log_dir: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backup_count: int = DEFAULT_BACKUP_COUNT,
) -> None:
    """The supervisor's logging (before any fork): stderr, and `<log_dir>/smg.log`."""
    _install(_handlers(as_json, log_dir, "smg.log", "supervisor", max_bytes, backup_count), level)


def child_log_file(kind: str, slot: int) -> str:
    """The file a child writes: its own, never shared (see the module docstring)."""
    return "control.log" if kind == "control" else f"dataplane-{slot}.log"


def setup_child_logging(cfg: Any, kind: str, index: int, slot: int) -> None:
    """Right after a fork: replace the inherited handlers with this process's own (same
    level, format and console; its own file), stamped with its process index."""
    process: int | str = "control" if kind == "control" else index
    _install(
        _handlers(
            cfg.log_json,
            cfg.log_dir,
            child_log_file(kind, slot),
            process,
            cfg.log_max_bytes,
            cfg.log_backup_count,
        ),
        logging.getLevelName(logging.getLogger().level).lower(),
    )


def access_logger(cfg: Any) -> logging.Logger | None:
    """The `smg.access` logger when --access-log is on, else None (the data plane then
    pays one None check per answer). Its lines are INFO: they show at the default level."""
    if not cfg.access_log:
        return None
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.setLevel(logging.INFO)
    return logger


ACCESS_MESSAGE = "finished processing request"  # the Rust SMG's message for this line


def log_access(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """One access line. The record is built here, without logging's caller lookup (a
    stack walk per call): the line's place in the source says nothing about the request."""
    if logger.isEnabledFor(logging.INFO):
        logger.handle(
            logger.makeRecord(
                logger.name, logging.INFO, "", 0, ACCESS_MESSAGE, None, None, None, fields
            )
        )


def access_fields(
    method: str,
    path: str,
    status: int,
    error_code: str,
    worker: str | None,
    duration_s: float,
    request_id: bytes,
    bytes_in: int,
    bytes_out: int | None,
) -> dict[str, Any]:
    """One access-log line's fields (pure, tested directly). The process index is the
    record's `process` stamp, as on every line."""
    return {
        "method": method,
        "path": path,
        "status": status,
        "error_code": error_code or None,
        "worker": worker,
        "duration_ms": round(duration_s * 1000.0, 3),
        "request_id": request_id.decode("latin-1"),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }


def set_level(level: str) -> None:
    """Change the level of this process's root logger (a live reload); processes forked
    afterwards inherit it."""
    logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))
