"""The one Prometheus text renderer (exposition format 0.0.4) for every smg process.

Metrics travel as structured samples (`Family` / `Sample`, msgpack-friendly array-like
structs), never as text: data-plane processes answer the exporter's IPC scrape with
their families, the control plane adds its own, and `render` writes the whole answer
once. That is what the format needs and what per-process text could not give:

- one `# HELP` and one `# TYPE` line per family, with all its series after them, even
  when several processes report the same family;
- label values escaped (backslash, double quote, newline), so a model name or label
  with `"`, `\\` or `}` cannot end a label early or forge a series;
- help text escaped (backslash, newline).

Pure code: families in, text out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

__all__ = ["CONTENT_TYPE", "Family", "Sample", "decode_families", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KINDS = frozenset({"counter", "gauge", "histogram"})


class Sample(msgspec.Struct, array_like=True, frozen=True):
    """One series value: `suffix` is "" or, for a histogram, `_bucket`/`_sum`/`_count`."""

    suffix: str
    labels: list[tuple[str, str]]
    value: int | float


class Family(msgspec.Struct, array_like=True):
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: list[Sample]


def decode_families(obj: object) -> list[Family]:
    """Families from an IPC answer (plain msgpack lists); ValidationError if malformed."""
    return msgspec.convert(obj, list[Family])


def render(families: Iterable[Family]) -> str:
    """Exposition text for `families`, merging families that share a name.

    Families of one name keep the order they arrive in (their series stay grouped: all of
    process 0's, then process 1's); the first one's kind and help win. A family without
    samples still gets its HELP/TYPE lines (Prometheus accepts that, and it shows the
    metric exists).
    """
    merged: dict[str, tuple[Family, list[Sample]]] = {}
    for family in families:
        if family.kind not in KINDS:
            raise ValueError(f"{family.name}: unknown metric kind {family.kind!r}")
        entry = merged.get(family.name)
        if entry is None:
            merged[family.name] = (family, list(family.samples))
        else:
            entry[1].extend(family.samples)
    lines: list[str] = []
    add = lines.append
    for name, (family, samples) in merged.items():
        add(f"# HELP {name} {_escape_help(family.help)}")
        add(f"# TYPE {name} {family.kind}")
        for sample in samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels)
                add(f"{name}{sample.suffix}{{{labels}}} {_value(sample.value)}")
            else:
                add(f"{name}{sample.suffix} {_value(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
