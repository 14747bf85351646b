"""Tag-delimited reasoning (`<think>…</think>` and its kin): every family the registry names.

One state machine, one row of settings per family (the Rust SMG 1.13's ParserConfig in
crates/reasoning_parser/src/factory.rs and parsers/*.rs): the start and end tags and whether
the output starts inside the reasoning block (`always_in_reasoning`). A family is a class
only because the registry names classes; each sets `name` and its row, nothing else.

The rule, the same for any split of the text (1.13's streaming path, made split-invariant):
- Outside reasoning, before any start tag: text is content; the first start tag is dropped
  and reasoning begins. (1.13's one-shot path turns text before `<think>` into reasoning
  too, its streaming path sends it as content: a stream cannot take back what it sent,
  so both paths here send it as content.)
- Inside reasoning: text is reasoning, streamed as it comes; the first start tag (when the
  output opened inside reasoning and the model writes `<think>` anyway) is dropped once;
  the end tag is dropped and ends reasoning for good. An unclosed block stays reasoning.
- After the end tag: everything is content verbatim, tags included (vLLM's rule; 1.13's
  one-shot path would also delete later start tags).
- Whitespace is kept exactly (1.13 and vLLM do not trim).
Only a suffix that may be the start of a tag is held back between pieces.
"""

from __future__ import annotations

from smg.parsers.types import ReasoningParser, held_suffix, held_suffix_any

_OUTSIDE = 0  # before any start tag: content, looking for the start tag
_INSIDE = 1  # reasoning, looking for the end tag
_DONE = 2  # after the end tag: all content


class PassthroughReasoningParser(ReasoningParser):
    """`passthrough`: no reasoning extraction; every character is content."""

    name = "passthrough"

    def feed(self, text: str) -> tuple[str, str]:
        return "", text

    def finish(self) -> tuple[str, str]:
        return "", ""


class TagReasoningParser(ReasoningParser):
    """The shared machine; a subclass sets the family's row (class attributes)."""

    name = "base"
    start_tag = "<think>"
    end_tag = "</think>"
    # 1.13's always_in_reasoning: the family's models reason first without writing the
    # start tag (their templates open the block in the prompt).
    starts_inside = False

    __slots__ = ("_held", "_lead", "_lead2", "_start_pending", "_state")

    def __init__(self, *, in_reasoning: bool | None = None) -> None:
        super().__init__(in_reasoning=in_reasoning)
        inside = self.starts_inside if in_reasoning is None else in_reasoning
        self._state = _INSIDE if inside else _OUTSIDE
        # Inside from the start, a start tag the model still writes is dropped once.
        self._start_pending = True
        self._held = ""
        # Characters that can begin a tag: a piece without any of them, while nothing is
        # held, cannot change state and passes through untouched.
        self._lead = self.start_tag[0]
        self._lead2 = self.end_tag[0] if self.end_tag[0] != self._lead else None

    def feed(self, text: str) -> tuple[str, str]:
        state = self._state
        if state == _DONE:
            return "", text
        if (
            not self._held
            and self._lead not in text
            and (self._lead2 is None or self._lead2 not in text)
        ):
            return (text, "") if state == _INSIDE else ("", text)
        return self._scan(self._held + text)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self._state == _INSIDE else ("", held)

    def _scan(self, buf: str) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        start, end = self.start_tag, self.end_tag
        while True:
            if self._state == _OUTSIDE:
                at = buf.find(start)
                if at < 0:
                    keep = held_suffix(buf, start)
                    content.append(buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep :]
                    break
                content.append(buf[:at])
                buf = buf[at + len(start) :]
                self._state = _INSIDE
                self._start_pending = False
                continue
            # Inside: the end tag, and a first start tag to drop while one is pending.
            stop = buf.find(end)
            if self._start_pending:
                at = buf.find(start)
                if at >= 0 and (stop < 0 or at < stop):
                    reasoning.append(buf[:at])
                    buf = buf[at + len(start) :]
                    self._start_pending = False
                    continue
            if stop >= 0:
                reasoning.append(buf[:stop])
                content.append(buf[stop + len(end) :])
                self._state = _DONE
                self._held = ""
                break
            if self._start_pending:
                keep = held_suffix_any(buf, (start, end))
            else:
                keep = held_suffix(buf, end)
            reasoning.append(buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            break
        return "".join(reasoning), "".join(content)


class BaseReasoningParser(TagReasoningParser):
    name = "base"


class DeepSeekR1ReasoningParser(TagReasoningParser):
    name = "deepseek_r1"
    starts_inside = True


class DeepSeekV31ReasoningParser(TagReasoningParser):
    name = "deepseek_v31"


class Qwen3ReasoningParser(TagReasoningParser):
    name = "qwen3"


class Qwen3ThinkingReasoningParser(TagReasoningParser):
    name = "qwen3_thinking"
    starts_inside = True


class KimiReasoningParser(TagReasoningParser):
    """Legacy Kimi models (1.13's `kimi`): unicode think tokens."""

    name = "kimi"
    start_tag = "\u25c1think\u25b7"  # ◁think▷
    end_tag = "\u25c1/think\u25b7"  # ◁/think▷


class KimiK25ReasoningParser(TagReasoningParser):
    name = "kimi_k25"


class KimiThinkingReasoningParser(TagReasoningParser):
    name = "kimi_thinking"
    starts_inside = True


class Glm45ReasoningParser(TagReasoningParser):
    name = "glm45"


class Step3ReasoningParser(TagReasoningParser):
    name = "step3"
    starts_inside = True


class MinimaxReasoningParser(TagReasoningParser):
    """1.13 once prepended `<think>` to the output; it now starts inside reasoning,
    which is the same thing (the template opens the block in the prompt)."""

    name = "minimax"
    starts_inside = True
