"""StopMatcher: vLLM's stop-string result (check_stop_strings), holding back only a tail
that could still start a stop string."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smg.tokenizer import StopMatcher


def vllm_reference(deltas: list[str], stops: list[str], include: bool) -> tuple[str, str | None]:
    """vLLM v1's rule, written from vllm/v1/engine/detokenizer.py (update +
    check_stop_strings): after each delta, the stops in order; the first found in the
    region that may hold a new match ends the text, cut before it or after it."""
    out = ""
    for delta in deltas:
        if not delta:
            continue
        out += delta
        for stop in stops:
            idx = out.find(stop, max(0, len(out) - len(delta) - len(stop) + 1))
            if idx != -1:
                return (out[: idx + len(stop)] if include else out[:idx]), stop
    return out, None


def run(m: StopMatcher, deltas: list[str]) -> tuple[list[str], str | None, str]:
    emitted: list[str] = []
    matched = None
    for d in deltas:
        text, stop = m.feed(d)
        emitted.append(text)
        if stop is not None:
            matched = stop
    return emitted, matched, m.finish()


def test_stop_across_deltas_excluded() -> None:
    m = StopMatcher(["STOP"], include_stop=False)
    assert m.feed("Hello S") == ("Hello ", None)  # "S" may start STOP
    assert m.feed("T") == ("", None)
    assert m.feed("OP and more") == ("", "STOP")
    assert m.feed("ignored") == ("", None)
    assert m.finish() == ""
    assert m.done


def test_stop_across_deltas_included() -> None:
    m = StopMatcher(["STOP"], include_stop=True)
    # With the stop in the output nothing needs holding: a partial stop shows either way.
    assert m.feed("Hello S") == ("Hello S", None)
    assert m.feed("TOP and more") == ("TOP", "STOP")
    assert m.feed("x") == ("", None)


def test_false_start_is_released() -> None:
    m = StopMatcher(["STOP"], include_stop=False)
    assert m.feed("ST") == ("", None)
    assert m.feed("ART") == ("START", None)
    assert m.feed("ends S") == ("ends ", None)
    assert m.finish() == "S"


def test_hold_only_the_possible_tail() -> None:
    m = StopMatcher(["</answer>", "\n\nUser:"], include_stop=False)
    # vLLM would hold the last 8 characters of every delta; only "</an" can start a stop.
    assert m.feed("text </an") == ("text ", None)
    assert m.feed("d") == ("</and", None)
    assert m.feed("x\n\nUs") == ("x", None)
    assert m.feed("er: hi") == ("", "\n\nUser:")


def test_list_order_wins_as_in_vllm() -> None:
    # Both stops in one delta: vLLM takes the first stop of the list that is found.
    m = StopMatcher(["world", "o"], include_stop=False)
    assert m.feed("hello world") == ("hello ", "world")
    assert vllm_reference(["hello world"], ["world", "o"], False) == ("hello ", "world")


def test_no_stops_and_empty_stops() -> None:
    m = StopMatcher([], include_stop=False)
    assert m.feed("abc") == ("abc", None)
    m2 = StopMatcher(["", "x"], include_stop=False)
    assert m2.feed("abc") == ("abc", None)
    assert m2.feed("dxe") == ("d", "x")


def test_unicode_stops() -> None:
    m = StopMatcher(["。\n"], include_stop=True)
    assert m.feed("你好。") == ("你好。", None)
    assert m.feed("\n再见") == ("\n", "。\n")


alphabet = st.sampled_from(list("abAB\n。"))
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3)
delta_lists = st.lists(st.text(alphabet, max_size=5), max_size=12)


@settings(max_examples=800, deadline=None)
@given(delta_lists, stop_lists, st.booleans())
def test_property_matches_vllm(deltas: list[str], stops: list[str], include: bool) -> None:
    emitted, matched, tail = run(StopMatcher(stops, include_stop=include), deltas)
    want_text, want_stop = vllm_reference(deltas, stops, include)
    assert "".join(emitted) + tail == want_text
    assert matched == want_stop
    if matched is not None:
        assert tail == ""
    # Held back at any moment: never more than a proper prefix of some stop.
    m = StopMatcher(stops, include_stop=include)
    seen = ""
    shown = ""
    for d in deltas:
        text, stop = m.feed(d)
        shown += text
        if stop is not None:
            break
        seen += d
        held = seen[len(shown) :]
        assert seen.startswith(shown)
        assert held == "" or any(s.startswith(held) and s != held for s in stops)


@pytest.mark.parametrize("include", [False, True])
def test_feed_cost(include: bool) -> None:
    """Per-delta cost (printed; run with -s), best of 5 runs on the noisy box."""
    import time

    words = [" the", " quick", " brown", " fox", " jumps", "\n", " over", "</"] * 300
    best = float("inf")
    for _ in range(5):
        m = StopMatcher(["</s>", "\n\nHuman:", "STOP"], include_stop=include)
        t0 = time.perf_counter()
        for w in words:
            m.feed(w)
        best = min(best, (time.perf_counter() - t0) / len(words) * 1e6)
    print(f"\nStopMatcher.feed: {best:.2f} us/delta (include_stop={include})")
    assert best < 50
