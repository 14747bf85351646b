"""Reading systemd units, seccomp groups and strace output for tests/test_deploy_systemd.py.

Pure functions over text (each tested directly), plus `syscall_groups()` and
`systemd_root()`, which run or copy what the installed systemd provides.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Section -> key -> every value assigned, in order (systemd.syntax(7): `#`/`;` comments,
    a trailing backslash continues a line)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit line: {raw!r}")
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    """The value of a key assigned exactly once."""
    values = unit[section][key]
    if len(values) != 1:
        raise AssertionError(f"[{section}] {key}= assigned {len(values)} times: {values}")
    return values[0]


def parse_timespan(text: str) -> float:
    """Seconds in a systemd time span: `200`, `200s`, `3min 20s`, `1h`, `500ms`."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    if not parts or re.sub(r"[\d.\sa-z]", "", text.strip()):
        raise ValueError(f"not a time span: {text!r}")
    for number, unit in parts:
        total += float(number) * units[unit or "s"]
    return total


def parse_syscall_groups(listing: str) -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter` (no argument) -> group -> its members (system calls
    and nested @groups); `#` lines are comments."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def expand(name: str, groups: Mapping[str, list[str]]) -> frozenset[str]:
    """A system call or @group -> the system calls it names, nested groups expanded."""
    if not name.startswith("@"):
        return frozenset({name})
    out: set[str] = set()
    for member in groups[name]:
        out |= expand(member, groups)
    return frozenset(out)


def allowed_syscalls(values: Iterable[str], groups: Mapping[str, list[str]]) -> frozenset[str]:
    """What a unit's SystemCallFilter= lines let through (systemd.exec(5)): the first
    positive line starts an allow list, `~` lines remove from it, an empty assignment resets.
    Only allow lists are supported (a pure deny list allows "everything else")."""
    allowed: set[str] | None = None
    for value in values:
        if not value:
            allowed = None
            continue
        negative = value.startswith("~")
        names = set().union(*(expand(n, groups) for n in value.lstrip("~").split()))
        if negative:
            if allowed is None:
                raise ValueError("a deny list without an allow list before it")
            allowed -= names
        else:
            allowed = names if allowed is None else allowed | names
    if allowed is None:
        raise ValueError("no SystemCallFilter= allow list")
    return frozenset(allowed)


_CALL = re.compile(r"^([a-z_][a-z0-9_]*)\(")
_FAMILY = re.compile(r"^socket(?:pair)?\((AF_[A-Z0-9]+)")
_PATH_OPEN = re.compile(r'^(?:openat|open|statx|newfstatat|access|readlink)\((?:[^,]*, )?"([^"]*)"')
_WRITE_OPEN = re.compile(r'^(?:openat|open)\((?:[^,]*, )?"([^"]*)", [^)]*O_(?:WRONLY|RDWR|CREAT)')
_EXECVE_OK = re.compile(r"^execve\(.* = 0$")
_BIND = re.compile(r"^bind\(\d+, (\{[^}]*\})")
_PATH_CHANGE = re.compile(
    r'^(?:mkdir|mkdirat|unlink|unlinkat|rename|renameat2?)\((?:[^,]*, )?"([^"]*)"'
)


class Trace:
    """What `strace -ff -o PREFIX` files show: system call names, socket address families,
    addresses bound, /proc paths looked at, and paths written or changed."""

    def __init__(self) -> None:
        self.syscalls: set[str] = set()
        self.families: set[str] = set()
        self.proc_paths: set[str] = set()
        self.written: set[str] = set()
        self.bound: set[str] = set()

    def add_line(self, line: str) -> None:
        call = _CALL.match(line)
        if call is None:
            return  # signals (---), exits (+++)
        self.syscalls.add(call[1])
        if family := _FAMILY.match(line):
            self.families.add(family[1])
        if bound := _BIND.match(line):
            self.bound.add(bound[1])
        if (path := _PATH_OPEN.match(line)) and path[1].startswith("/proc/"):
            self.proc_paths.add(path[1])
        for pattern in (_WRITE_OPEN, _PATH_CHANGE):
            if written := pattern.match(line):
                self.written.add(written[1])

    @classmethod
    def read(cls, files: Iterable[Path]) -> Trace:
        """Each file from its process's last successful execve on: what ran before it (a
        launcher such as strace's own child or systemd-socket-activate) is another program."""
        trace = cls()
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.readlines()
            execs = [i for i, line in enumerate(lines) if _EXECVE_OK.match(line)]
            for line in lines[execs[-1] if execs else 0 :]:
                trace.add_line(line)
        return trace


def per_process_path(path: str) -> bool:
    """Whether a /proc path stays visible under ProcSubset=pid: a process's own directory."""
    return re.match(r"^/proc/(self|thread-self|\d+)(/|$)", path) is not None


def parse_env_file(text: str) -> dict[str, str]:
    """An EnvironmentFile= (systemd.exec(5)): KEY=VALUE lines, `#`/`;` comments, blank
    lines; anything else is refused here (systemd would warn and skip it)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if match is None:
            raise ValueError(f"line {number} is not KEY=VALUE: {raw!r}")
        env[match[1]] = match[2]
    return env


def syscall_groups() -> dict[str, list[str]]:
    """Every seccomp group this host's systemd knows, as `systemd-analyze` lists them."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    return parse_syscall_groups(listing)


# The distribution's units: /usr/lib on a merged-/usr system (Debian 12), else /lib.
SYSTEM_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    Path("/usr/lib/systemd/system"),
)


def systemd_root(root: Path) -> None:
    """Give `root` what `systemd-analyze verify --root` needs besides the unit under test:
    the distribution's units (sysinit.target, multi-user.target, ...) and /bin/kill
    (ExecReload=). /bin and /lib are symlinks into /usr, as on a merged-/usr system."""
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True
    )
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    kill = shutil.which("kill", path="/usr/bin:/bin")
    if kill is None:
        raise FileNotFoundError("kill")
    shutil.copy2(kill, root / "usr/bin/kill")
    for link in ("bin", "lib"):
        if not os.path.lexists(root / link):
            os.symlink(f"usr/{link}", root / link)
