"""`smg bench`: a load generator for OpenAI-compatible endpoints (see docs/bench.md).

Forms: `smg bench [flags]` (a run, flags as `vllm bench serve`), `smg bench compare A B`,
`smg bench stub` (a fast local server), `smg bench calibrate` (client throughput) and
`smg bench plot RESULT.json...` (the HTML report).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if argv and argv[0] == "compare":
        from smg.bench.compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "stub":
        from smg.bench.stub import main as stub_main

        return stub_main(argv[1:])
    if argv and argv[0] == "plot":
        from smg.bench.report import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "calibrate":
        from smg.bench.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    from smg.bench.serve import run

    return run(argv)
