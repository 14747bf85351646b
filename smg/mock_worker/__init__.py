"""`smg mock-worker`: mock SGLang/vLLM HTTP workers for demos, benchmarks and tests."""

from smg.mock_worker.runner import main

__all__ = ["main"]
