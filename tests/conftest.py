"""Session-wide checks: no credential a test used appears in any gateway log of the run.

Every `smg launch` the tests start through tests/gatewayutil.py (Gateway, running_gateway,
run_launch) leaves its output in one session directory; every key or token a test uses,
right or wrong, is registered with `gatewayutil.secret(...)`. When the session ends, each
collected file is searched for each registered value; a hit fails the run, naming the file
and where the secret was registered, never the secret itself.
"""

from __future__ import annotations

import shutil
import tempfile

import gatewayutil
import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    gatewayutil.SESSION_LOG_DIR = tempfile.mkdtemp(prefix="smg-test-session-logs-")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    log_dir = gatewayutil.SESSION_LOG_DIR
    if log_dir is None:
        return
    gatewayutil.SESSION_LOG_DIR = None
    found = gatewayutil.leaked_secrets(log_dir, gatewayutil.SECRETS)
    if not found:
        shutil.rmtree(log_dir, ignore_errors=True)
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        "SECRET LEAK: a credential the tests used appears in a gateway log "
        f"(logs kept in {log_dir}):",
        *found,
    ]
    if reporter is not None:
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line, red=True, bold=True)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
