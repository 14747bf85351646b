"""Which output parsers a gRPC request gets (pure).

Precedence, per kind (tool calls, reasoning): the worker's label (`tool_call_parser` /
`reasoning_parser` in its spec's labels: smg's per-worker choice; the Rust SMG 1.13 has
only the flags), then the gateway flag (`--tool-call-parser` / `--reasoning-parser`),
then the registry's model-name patterns over the names in order: the request's model
first (the name 1.13 matches), then the worker's served model name and model path. A
label or flag naming no registered parser is skipped (1.13 falls back to the model
patterns with a warning too).

`ParserSelector` caches the answer per (worker directory entry, request model), so a
request pays one dict lookup; the cache is bounded because the request's model is the
client's text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from smg.parsers.registry import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    reasoning_parser_for_model,
    tool_parser_for_model,
)

if TYPE_CHECKING:
    from smg.shm.directory import DirectoryEntry

log = logging.getLogger("smg.parsers")

TOOL_LABEL = "tool_call_parser"
REASONING_LABEL = "reasoning_parser"
_CACHE_LIMIT = 4096


def _named(value: str | None, known: Mapping[str, str], what: str) -> str | None:
    if not value:
        return None
    if value in known:
        return value
    log.warning("unknown %s %r: choosing from the model name instead", what, value)
    return None


def choose(
    model_names: Sequence[str],
    labels: Mapping[str, str],
    tool_flag: str | None,
    reasoning_flag: str | None,
) -> tuple[str | None, str | None]:
    """(tool parser name, reasoning parser name); None: no parser of that kind."""
    tool = _named(labels.get(TOOL_LABEL), TOOL_PARSERS, "tool_call_parser label") or _named(
        tool_flag, TOOL_PARSERS, "--tool-call-parser"
    )
    reasoning = _named(
        labels.get(REASONING_LABEL), REASONING_PARSERS, "reasoning_parser label"
    ) or _named(reasoning_flag, REASONING_PARSERS, "--reasoning-parser")
    for name in model_names:
        if tool is not None and reasoning is not None:
            break
        if not name:
            continue
        if tool is None:
            tool = tool_parser_for_model(name)
        if reasoning is None:
            reasoning = reasoning_parser_for_model(name)
    return tool, reasoning


def entry_names(entry: DirectoryEntry | None, request_model: str | None) -> list[str]:
    """The names the model patterns are tried on, in order."""
    names = [request_model] if request_model else []
    if entry is not None:
        if entry.grpc is not None:
            names += [entry.grpc.served_model_name, entry.grpc.model_path]
        names += list(entry.models)
    return [n for n in names if n]


class ParserSelector:
    """`choose` for a worker's directory entry, cached per (entry, request model). The
    data plane decodes a new entry whenever the control plane republishes the worker
    (labels patched, model info discovered, a new generation on the row), so keying on
    the entry object re-resolves exactly then; the entry is kept in the value so its id
    is not reused while cached."""

    __slots__ = ("_cache", "reasoning_flag", "tool_flag")

    def __init__(self, tool_flag: str | None, reasoning_flag: str | None) -> None:
        self.tool_flag = tool_flag
        self.reasoning_flag = reasoning_flag
        self._cache: dict[tuple[int, str | None], tuple[object, tuple[str | None, str | None]]] = {}

    def for_entry(
        self, entry: DirectoryEntry | None, request_model: str | None
    ) -> tuple[str | None, str | None]:
        key = (id(entry), request_model)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is entry:
            return hit[1]
        labels = entry.spec.labels if entry is not None else {}
        found = choose(
            entry_names(entry, request_model), labels, self.tool_flag, self.reasoning_flag
        )
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (entry, found)
        return found
