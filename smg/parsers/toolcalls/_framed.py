"""The state machine shared by the marker-framed tool-call formats (DeepSeek, Kimi K2, GLM,
MiniMax M2, Step3, DSML): an optional section marker opens a run of calls, each call is
framed by a begin and an end marker, and a subclass only says how one call's body (the
text between its markers) becomes a `ToolCall` (`parse_call`; None = malformed).

Pure. Content streams as soon as it cannot be the start of a marker; a call is held from
its begin marker until its end marker has arrived, then emitted whole or, if its body does
not parse, given back as content. Syntax that no successful call accounts for (a section
marker with no good call in it) comes back as content too, so an answer in which no call
parses is returned exactly as the model wrote it. Whitespace between and after calls is
the format's layout, not content: it is dropped once a call has succeeded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from smg.parsers.toolcalls._json import known, tool_names
from smg.parsers.types import ToolCall, ToolParser, held_suffix_any

_QUOTED_HEAD = re.compile(r'\s*"([^"]+)"\s*>', re.DOTALL)

_TEXT = 0  # plain content; looking for a section or (bare) call marker
_SECTION = 1  # after a section marker or a call: between calls
_CALL = 2  # holding one call's text, from its begin marker


class FramedToolParser(ToolParser):
    section_begin: str = ""  # "" = the format has no section wrapper
    section_end: str = ""
    call_begin: str = ""
    call_end: str = ""
    bare_calls: bool = True  # a call marker outside a section starts a call

    def __init__(self, tools: Sequence[dict] = ()) -> None:
        super().__init__(tools)
        starts = [m for m in (self.section_begin, self.call_begin if self.bare_calls else "") if m]
        self._starts: tuple[str, ...] = tuple(starts)
        leads = {m[0] for m in starts}
        # The fast path needs one lead character (every family here starts its markers
        # with "<"); a format with several would simply always take the full path.
        self._lead = leads.pop() if len(leads) == 1 else ""
        self._idle = bool(self._lead)  # nothing held, outside any call: fast path open
        self._reach = max(len(self.call_begin), len(self.call_end)) - 1
        # One first character for both call markers (every family here: "<") opens the
        # in-call fast path; formats with two simply always scan.
        call_leads = {m[0] for m in (self.call_begin, self.call_end) if m}
        self._call_lead = call_leads.pop() if len(call_leads) == 1 and self._reach else ""
        self._buf = ""  # undecided text: a marker's possible start, or a call being held
        self._mode = _TEXT
        self._pending = ""  # section syntax no successful call has accounted for yet
        self._ok = False  # a call of the current section has succeeded
        self._scan = 0  # in a call: where the search for its end resumes
        self._begin_len = len(self.call_begin)
        # In a call: the buffer's last `_reach` characters hold no marker lead (set by
        # the in-call fast path, which only appends pieces without one; any scan resets it).
        self._clear = False
        self.names = tool_names(tools)

    def parse_call(self, body: str) -> ToolCall | None:
        """One call's body (between `call_begin` and `call_end`) -> a call, or None."""
        raise NotImplementedError

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._idle and self._lead not in text:
            return text, []
        lead = self._call_lead
        if lead and self._mode == _CALL and lead not in text:
            # Inside a call, a piece in which no marker can begin (their first character
            # is in neither it nor the tail a marker could have started in) only grows
            # the call: the scan resumes where the last one would have.
            buf = self._buf
            # (`_clear`: the last piece took this path, so the tail holds no lead either)
            if self._clear or lead not in buf[-self._reach :]:
                self._clear = True
                self._buf = buf = buf + text
                self._scan = max(self._begin_len, len(buf) - self._reach)
                return "", []
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._run(final=True)

    def _parse(self, body: str) -> ToolCall | None:
        try:
            call = self.parse_call(body)
        except Exception:  # a parser bug must not cost the answer: the call is content
            return None
        # A call to a function the request did not offer is content (every family: one rule).
        return call if call is not None and known(call.name, self.names) else None

    def _run(self, *, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        buf = self._buf
        while True:
            if self._mode == _TEXT:
                at, marker = self._earliest(buf)
                if marker is None:
                    keep = 0 if final else held_suffix_any(buf, self._starts)
                    out.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                out.append(buf[:at])
                buf = buf[at:]
                self._ok = False
                if marker == self.section_begin:
                    self._pending = marker
                    buf = buf[len(marker) :]
                    self._mode = _SECTION
                else:
                    self._pending = ""
                    self._start_call()
            elif self._mode == _SECTION:
                stripped = buf.lstrip()
                self._pending += buf[: len(buf) - len(stripped)]
                buf = stripped
                if buf.startswith(self.call_begin):
                    self._start_call()
                elif self.section_end and buf.startswith(self.section_end):
                    if not self._ok:
                        out.append(self._pending + self.section_end)
                    buf = buf[len(self.section_end) :]
                    self._pending = ""
                    self._mode = _TEXT
                elif not final and (
                    not buf
                    or self.call_begin.startswith(buf)
                    or (self.section_end and self.section_end.startswith(buf))
                ):
                    break  # whitespace so far, or a marker's start: the next piece decides
                else:  # anything else ends the run of calls
                    if not self._ok or buf:
                        out.append(self._pending)
                    self._pending = ""
                    self._mode = _TEXT
                    if not buf:
                        break
            else:
                begin, end = self.call_begin, self.call_end
                close = buf.find(end, self._scan)
                # (a close not found yet starts after len(buf) - len(end): only a new
                # call marker before that point certainly precedes it)
                if close >= 0:
                    limit = close
                else:
                    limit = len(buf) if final else max(0, len(buf) - len(end) + 1)
                again = buf.find(begin, self._scan, limit + len(begin) - 1)
                if again >= 0:  # a new call began before this one closed: this one is text
                    out.append(self._pending + buf[:again])
                    self._pending = ""
                    buf = buf[again:]
                    self._start_call()
                    continue
                if close < 0:
                    if final:
                        out.append(self._pending + buf)
                        self._pending, buf, self._mode = "", "", _TEXT
                        break
                    self._scan = max(len(begin), len(buf) - self._reach)
                    break
                stop = close + len(end)
                call = self._parse(buf[len(begin) : close])
                if call is None:
                    out.append(self._pending + buf[:stop])
                else:
                    calls.append(call)
                    self._ok = True
                self._pending = ""
                buf = buf[stop:]
                self._mode = _SECTION
        self._buf = buf
        self._clear = False
        self._idle = bool(self._lead) and not buf and self._mode == _TEXT
        return "".join(out), calls

    def _start_call(self) -> None:
        self._mode = _CALL
        self._scan = len(self.call_begin)

    def _earliest(self, buf: str) -> tuple[int, str | None]:
        best, found = -1, None
        for marker in self._starts:
            at = buf.find(marker)
            if at >= 0 and (best < 0 or at < best):
                best, found = at, marker
        return best, found


def invoke_head(body: str) -> tuple[str, str] | None:
    """A body whose call marker ends in `name=` (`<invoke name=`, DSML's): `"NAME">rest`
    -> (NAME stripped, rest), or None."""
    head = _QUOTED_HEAD.match(body)
    return None if head is None else (head.group(1).strip(), body[head.end() :])
