"""Command-line entry point: `smg launch`, `smg mock-worker`, `smg bench`."""

from __future__ import annotations

import sys

from smg import __version__

_USAGE = """usage: smg [--version] <command> [options]

commands:
  launch        start the gateway (supervisor + data-plane processes)
  mock-worker   start one or more mock SGLang/vLLM HTTP workers (--grpc: a gRPC engine)
  bench         benchmark an OpenAI-compatible endpoint
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        print(f"smg {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "launch":
        from smg.launch import main as launch_main

        return launch_main(rest)
    if command == "mock-worker":
        from smg.mock_worker import main as mock_main

        return mock_main(rest)
    if command == "bench":
        from smg.bench import main as bench_main

        try:
            return bench_main(rest)
        except KeyboardInterrupt:
            # Ctrl-C ends a benchmark (and, with --embedded, the gateway it started): a
            # line, not a traceback; 130 as a shell reports SIGINT.
            print("smg bench: interrupted", file=sys.stderr)
            return 130
    print(f"smg: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2
