#!/usr/bin/env bash
# Install smg as a systemd service on a Debian or Ubuntu host. Run as root:
#
#   sudo deploy/install.sh                         # smg from this checkout, start the service
#   sudo deploy/install.sh --package ./smg_py-0.1.0-*.whl --socket
#   sudo deploy/install.sh --pip-args "--index-url https://pypi.internal/simple"
#
# What it does: checks python3 (>= 3.11, with venv), creates the system user and group smg
# (home /var/lib/smg), creates the venv /opt/smg/venv and pip-installs smg into it, writes
# /etc/smg/config.yaml and /etc/smg/smg.env only where absent (an operator's files are never
# overwritten), installs smg.service and smg.socket to /etc/systemd/system, reloads systemd
# and enables and starts smg.service (and smg.socket with --socket).
# Running it again is safe: it upgrades the package and the units, keeps /etc/smg as it is.
#
# --root DIR writes everything under DIR instead of / (as DESTDIR does) and skips what acts
# on the running system (useradd, chown, systemctl); the units still name the real paths
# (/opt/smg/..., /etc/smg/...). For tests and image builds.
set -euo pipefail
# The venv and units must be readable by the smg user whatever root's own umask is.
umask 022

usage() {
    cat <<'USAGE'
usage: install.sh [--package SPEC] [--pip-args ARGS] [--python PYTHON] [--socket]
                  [--no-start] [--root DIR]

  --package SPEC   what pip installs: a wheel, a directory or a requirement such as smg-py==0.1.0
                   (default: the smg checkout this script is in)
  --pip-args ARGS  extra pip arguments, split on spaces ("--no-index --find-links /srv/wheels")
  --python PYTHON  the interpreter the venv is made from (default: python3; >= 3.11)
  --socket         also enable smg.socket (socket activation of the API port)
  --no-start       enable the units but do not start them
  --root DIR       install under DIR, touch nothing outside it (no useradd/chown/systemctl)
USAGE
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

say() {
    echo "install.sh: $*"
}

package=""
pip_args=""
python="python3"
socket=0
start=1
root=""
while [ $# -gt 0 ]; do
    case "$1" in
        --package) [ $# -ge 2 ] || die "--package needs a value"; package="$2"; shift 2 ;;
        --pip-args) [ $# -ge 2 ] || die "--pip-args needs a value"; pip_args="$2"; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs a value"; python="$2"; shift 2 ;;
        --root) [ $# -ge 2 ] || die "--root needs a value"; root="$2"; shift 2 ;;
        --socket) socket=1; shift ;;
        --no-start) start=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
units="$here/systemd"
for file in smg.service smg.socket config.yaml smg.env; do
    [ -f "$units/$file" ] || die "missing $units/$file (run install.sh from an smg checkout)"
done
# By default smg is installed from the checkout this script belongs to (the units above come
# from it too, so package and units always match).
if [ -z "$package" ]; then
    package="$(cd "$here/.." && pwd)"
    grep -q '^name = "smg-py"' "$package/pyproject.toml" 2>/dev/null \
        || die "$package is not an smg checkout: give --package"
fi

# Installed layout (the units name the same paths).
user="smg"
home="/var/lib/smg"
venv="/opt/smg/venv"
etc="/etc/smg"
unit_dir="/etc/systemd/system"

if [ -n "$root" ]; then
    mkdir -p "$root"
    root="$(cd "$root" && pwd)"
else
    [ "$(id -u)" -eq 0 ] || die "run as root (or give --root DIR)"
    command -v systemctl >/dev/null || die "systemctl not found: this host does not run systemd"
fi

# --- Prerequisites ----------------------------------------------------------------------------
command -v "$python" >/dev/null || die "$python not found: apt-get install python3 python3-venv"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is $("$python" -c 'import sys; print(sys.version.split()[0])'); smg needs >= 3.11"
# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) separately, in python3-venv.
"$python" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$python cannot make a venv: apt-get install python3-venv"

# --- User and group ---------------------------------------------------------------------------
if [ -z "$root" ]; then
    if ! getent group "$user" >/dev/null; then
        groupadd --system "$user"
        say "created group $user"
    fi
    if ! getent passwd "$user" >/dev/null; then
        useradd --system --gid "$user" --home-dir "$home" --no-create-home \
            --shell /usr/sbin/nologin --comment "smg gateway" "$user"
        say "created user $user"
    fi
fi

# --- Venv and package -------------------------------------------------------------------------
if [ ! -x "$root$venv/bin/python" ]; then
    mkdir -p "$(dirname "$root$venv")"
    "$python" -m venv "$root$venv"
    say "created $venv"
fi
read -r -a extra <<<"$pip_args"
"$root$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
    ${extra[@]+"${extra[@]}"} "$package"
[ -x "$root$venv/bin/smg" ] || die "$venv/bin/smg missing after pip install $package"
say "installed $("$root$venv/bin/python" -m pip show smg-py 2>/dev/null | sed -n 's/^Version: /smg-py /p')"

# --- Configuration: written once, never overwritten -------------------------------------------
# /etc/smg: readable by root and the smg group only (smg.env holds credentials); made once,
# an operator's later changes to it are kept.
if [ ! -d "$root$etc" ]; then
    install -d -m 0750 "$root$etc"
    if [ -z "$root" ]; then
        chown root:"$user" "$root$etc"
    fi
fi
write_once() { # SRC DEST MODE GROUP
    if [ -e "$root$2" ]; then
        say "kept $2 (exists)"
        return
    fi
    install -m "$3" "$1" "$root$2"
    if [ -z "$root" ]; then
        chown root:"$4" "$root$2"
    fi
    say "wrote $2"
}
write_once "$units/config.yaml" "$etc/config.yaml" 0644 root
write_once "$units/smg.env" "$etc/smg.env" 0640 "$user"

# --- Units ------------------------------------------------------------------------------------
# Ours to replace on upgrade; local changes belong in drop-ins (systemctl edit smg).
mkdir -p "$root$unit_dir"
for unit in smg.service smg.socket; do
    if ! cmp -s "$units/$unit" "$root$unit_dir/$unit"; then
        install -m 0644 "$units/$unit" "$root$unit_dir/$unit"
        say "installed $unit_dir/$unit"
    fi
done

if [ -n "$root" ]; then
    say "done under $root (no user, ownership or systemctl changes there)"
    exit 0
fi

# --- systemd ----------------------------------------------------------------------------------
systemctl daemon-reload
enable=(smg.service)
if [ "$socket" -eq 1 ]; then
    enable=(smg.socket smg.service)
fi
systemctl enable "${enable[@]}"
if [ "$start" -eq 1 ]; then
    if [ "$socket" -eq 1 ] && ! systemctl is-active --quiet smg.socket \
        && systemctl is-active --quiet smg.service; then
        # A running smg holds the port itself; the socket can bind it only once it stops.
        systemctl stop smg.service
    fi
    systemctl start "${enable[@]}"
    say "started ${enable[*]}; after an upgrade run: systemctl restart smg"
fi
say "config: $etc/config.yaml, credentials: $etc/smg.env, logs: journalctl -u smg"
