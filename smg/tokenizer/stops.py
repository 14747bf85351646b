"""Stop strings over streamed text (pure).

The same result as vLLM's `check_stop_strings` (vllm/v1/engine/detokenizer.py): after
each delta, the stop strings are tried in the order given and the first one found in
the new text (or straddling into it) ends the output, cut before it, or after it with
`include_stop` (include_stop_str_in_output). Streaming differs only in what is held
back meanwhile: vLLM holds the last max(len(stop)) - 1 characters whatever they are;
this holds only the longest tail that is the start of some stop string (usually none),
and nothing with `include_stop`, where a partial stop is emitted either way.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed the detokenizer's deltas in order; emit what `feed` returns."""

    __slots__ = ("_done", "_held", "_include", "_lead_chars", "_stops", "_tail", "_tail_len")

    def __init__(self, stops: Sequence[str], *, include_stop: bool) -> None:
        # An empty stop would match everywhere; the request validation rejects it (as
        # vLLM does), so here it is dropped rather than ending every stream at once.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._include = include_stop
        # The last characters seen (emitted or not): a stop can straddle deltas.
        self._tail = ""
        self._tail_len = max((len(s) for s in self._stops), default=1) - 1
        self._held = 0  # how many characters at the end of _tail are not emitted yet
        self._done = False
        # Every proper prefix of every stop, by its last character, longest first: a
        # held tail must end with that character, so most deltas check none or one.
        by_last: dict[str, list[str]] = {}
        for stop in self._stops:
            for k in range(1, len(stop)):
                by_last.setdefault(stop[k - 1], []).append(stop[:k])
        self._lead_chars: dict[str, tuple[str, ...]] = {
            c: tuple(sorted(set(ps), key=len, reverse=True)) for c, ps in by_last.items()
        }

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string that matched or None). After a
        match the stream is over: later calls return ("", None)."""
        if self._done or not delta:
            return "", None
        if not self._stops:
            return delta, None
        tail = self._tail
        text = tail + delta if tail else delta
        first = len(tail) - self._held  # where the text not yet emitted starts
        for stop in self._stops:
            # A new match ends inside `delta`, so it starts at most len(stop) - 1
            # characters before it, all kept in `tail`.
            start = len(tail) - len(stop) + 1
            idx = text.find(stop, start if start > 0 else 0)
            if idx >= 0:
                self._done = True
                self._tail = ""
                self._held = 0
                end = idx + len(stop) if self._include else idx
                return text[first:end] if end > first else "", stop
        # With the stop included in the output a partial stop is shown either way, so
        # nothing is held; without, the longest tail that may still become a stop is.
        keep = 0 if self._include else self._hold(text)
        n = self._tail_len
        self._tail = text[-n:] if n else ""
        self._held = keep
        return text[first : len(text) - keep], None

    def _hold(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop."""
        prefixes = self._lead_chars.get(text[-1])
        if prefixes is not None:
            for prefix in prefixes:
                if text.endswith(prefix):
                    return len(prefix)
        return 0

    def finish(self) -> str:
        """The held-back tail, when the stream ends without a match."""
        held = self._tail[len(self._tail) - self._held :] if self._held else ""
        self._held = 0
        return "" if self._done else held
