"""Data-plane series that never go backwards when a process is replaced (pure code).

Each data-plane process counts only its own requests, from zero. The exporter keeps the
last scrape of every live process (keyed by table slot and pid), and when a process is
gone (crashed, killed for a stale heartbeat, replaced by a reload) folds its last numbers
into per-series totals that stay: the total of a series is then what every process that
ever carried it counted, so a counter in /metrics only grows. Series are identified by
family name, sample suffix and labels; the `process` label is the listener number, so
the new process of a listener continues the old one's series.

- counters and histograms (buckets, `_sum`, `_count`): gone processes' last values plus
  the live processes' current ones;
- gauges: live processes only (a gone process has no connections).

A crashed process's counts since its last scrape are lost (they were never exported, so
nothing goes backwards); a process that drains pushes its final numbers before exiting.
"""

from __future__ import annotations

import msgspec

from smg.promtext import Family, Sample

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]  # (suffix, labels)
ProcessKey = tuple[int, int]  # (slot, pid)
_GONE_MEMORY = 4096


class MetricFolder:
    def __init__(self) -> None:
        self.live: dict[ProcessKey, list[Family]] = {}
        self._scrape_seq: dict[ProcessKey, int] = {}
        self.retired: dict[str, dict[SeriesKey, int | float]] = {}
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (kind, help), first-seen order
        self._gone: dict[ProcessKey, None] = {}  # an ordered set, bounded

    def update(self, key: ProcessKey, families: list[Family], seq: int) -> None:
        """A scrape of process `key` that started as number `seq`: an answer older than
        the one held (scrapes overlap) or from a gone process is ignored."""
        if key in self._gone or seq < self._scrape_seq.get(key, -1):
            return
        self._scrape_seq[key] = seq
        self.live[key] = families
        self._note(families)

    def retire(self, key: ProcessKey, final: list[Family] | None = None) -> None:
        """Process `key` is gone: fold its final numbers (pushed by a draining process) or
        else its last scrape into the totals. Once per process."""
        if key in self._gone:
            return
        self._gone[key] = None
        if len(self._gone) > _GONE_MEMORY:
            del self._gone[next(iter(self._gone))]
        families = final if final is not None else self.live.get(key)
        self.live.pop(key, None)
        self._scrape_seq.pop(key, None)
        if not families:
            return
        self._note(families)
        for family in families:
            if family.kind == "gauge":
                continue
            totals = self.retired.setdefault(family.name, {})
            for sample in family.samples:
                series = (sample.suffix, _labels(sample.labels))
                totals[series] = totals.get(series, 0) + sample.value

    def sync(self, alive: set[ProcessKey]) -> None:
        """Retire every process held that is no longer alive (the table says so)."""
        for key in [key for key in self.live if key not in alive]:
            self.retire(key)

    def families(self) -> list[Family]:
        """The folded data-plane families, one per name, in first-seen order."""
        merged: dict[str, dict[SeriesKey, int | float]] = {}
        for name in self._meta:
            merged[name] = dict(self.retired.get(name, {}))
        for families in self.live.values():
            for family in families:
                values = merged.setdefault(family.name, {})
                for sample in family.samples:
                    series = (sample.suffix, _labels(sample.labels))
                    values[series] = values.get(series, 0) + sample.value
        return [
            Family(
                name,
                self._meta[name][0],
                self._meta[name][1],
                [Sample(suffix, list(labels), value) for (suffix, labels), value in values.items()],
            )
            for name, values in merged.items()
            if name in self._meta
        ]

    # --- surviving a control-plane restart ---------------------------------------------------

    def state(self) -> bytes:
        """The folded totals and the processes already folded, encoded (for a stash that
        the next control plane reads if this one dies)."""
        return msgspec.msgpack.encode(
            {
                "meta": [[name, kind, text] for name, (kind, text) in self._meta.items()],
                "retired": [
                    [name, [[suffix, list(labels), value] for (suffix, labels), value in v.items()]]
                    for name, v in self.retired.items()
                ],
                "gone": [list(key) for key in self._gone],
            }
        )

    @classmethod
    def from_state(cls, blob: bytes) -> MetricFolder:
        """A folder holding what `state()` wrote; an empty one if `blob` is empty or not
        readable (a stash never written)."""
        folder = cls()
        if not blob:
            return folder
        try:
            data = msgspec.msgpack.decode(blob)
            for name, kind, text in data["meta"]:
                folder._meta[name] = (kind, text)
            for name, series in data["retired"]:
                folder.retired[name] = {
                    (suffix, _labels(labels)): value for suffix, labels, value in series
                }
            for slot, pid in data["gone"]:
                folder._gone[(slot, pid)] = None
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return cls()
        return folder

    def _note(self, families: list[Family]) -> None:
        for family in families:
            if family.name not in self._meta:
                self._meta[family.name] = (family.kind, family.help)


def _labels(labels: list[tuple[str, str]]) -> Labels:
    return tuple((name, value) for name, value in labels)
