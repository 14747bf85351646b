"""smg.tokenizer.load: a model directory -> Tokenizer (ids, EOS set, template, defaults)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smg.tokenizer import TokenizerLoadError, load_tokenizer
from tests.tokenizer_data import (
    ANTHROPIC_JSON,
    LLAMA3_TEMPLATE,
    LLAMA31_TOKENIZER_CONFIG,
    llama31_dir,
    make_model_dir,
    needs_anthropic,
    needs_llama3,
)

pytestmark = needs_llama3


@pytest.fixture(scope="module")
def llama31(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama31_dir(tmp_path_factory.mktemp("llama31"))


def test_llama31_directory(llama31: Path) -> None:
    tok = load_tokenizer(str(llama31))
    assert tok.vocab_size == 128256
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|eot_id|>"
    # tokenizer_config's eos first, then generation_config's list (deduplicated).
    assert tok.eos_token_ids == (128009, 128001, 128008)
    assert {128001, 128008, 128009} <= set(tok.eos_token_ids)
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert 128000 in tok.special_ids and 128009 in tok.special_ids and 9906 not in tok.special_ids
    assert tok.chat_template == LLAMA3_TEMPLATE
    assert tok.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    assert tok.context_length == 131072
    assert tok.id_to_token(128009) == "<|eot_id|>"
    assert tok.id_to_token(9906) == "Hello"


def test_encode_decode(llama31: Path) -> None:
    tok = load_tokenizer(str(llama31))
    prompt = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
    ids = tok.encode(prompt)
    assert ids == [128000, 128006, 882, 128007, 271, 9906, 128009]
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "user\n\nHello"
    assert tok.decode(tok.encode("héllo 你好 🎉")) == "héllo 你好 🎉"
    # This tokenizer.json's post-processor adds no BOS (the original Llama-3 release).
    assert tok.encode("Hello", add_special_tokens=True) == [9906]


def test_tokenizer_json_file_path(llama31: Path) -> None:
    tok = load_tokenizer(str(llama31 / "tokenizer.json"))
    assert tok.eos_token_ids == (128009, 128001, 128008)


def test_named_template_list_picks_default(tmp_path: Path) -> None:
    tc = dict(LLAMA31_TOKENIZER_CONFIG)
    tc["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    d = make_model_dir(tmp_path / "m", tokenizer_config=tc)
    tok = load_tokenizer(str(d))
    assert tok.chat_template == "DEFAULT"
    assert tok.chat_templates == {"tool_use": "TOOLS", "default": "DEFAULT"}


def test_template_files_and_flag(tmp_path: Path) -> None:
    d = make_model_dir(
        tmp_path / "m",
        tokenizer_config=LLAMA31_TOKENIZER_CONFIG,
        extra={"chat_template.jinja": "FROM JINJA FILE"},
    )
    assert load_tokenizer(str(d)).chat_template == "FROM JINJA FILE"
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "FROM JSON FILE"}))
    assert load_tokenizer(str(d)).chat_template == "FROM JSON FILE"
    flag = tmp_path / "mine.jinja"
    flag.write_text("FROM FLAG")
    assert load_tokenizer(str(d), chat_template_path=str(flag)).chat_template == "FROM FLAG"
    flag_json = tmp_path / "mine.json"
    flag_json.write_text(json.dumps({"chat_template": "FROM FLAG JSON"}))
    assert (
        load_tokenizer(str(d), chat_template_path=str(flag_json)).chat_template == "FROM FLAG JSON"
    )
    with pytest.raises(TokenizerLoadError, match="cannot read chat template"):
        load_tokenizer(str(d), chat_template_path=str(tmp_path / "missing.jinja"))


def test_bare_directory(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_model_dir(tmp_path / "bare")))
    assert tok.eos_token_ids == ()
    assert tok.chat_template is None
    assert tok.bos_token is None
    assert tok.generation_defaults == {}
    assert tok.context_length is None


def test_context_length_sources(tmp_path: Path) -> None:
    d = make_model_dir(
        tmp_path / "a",
        tokenizer_config={"model_max_length": 8192},
        config={"eos_token_id": 7, "text_config": {"max_position_embeddings": 4096}},
    )
    tok = load_tokenizer(str(d))
    assert tok.context_length == 4096
    assert tok.eos_token_ids == (7,)
    d2 = make_model_dir(tmp_path / "b", tokenizer_config={"model_max_length": 8192})
    assert load_tokenizer(str(d2)).context_length == 8192
    # transformers' "not set" sentinel is no context length.
    d3 = make_model_dir(tmp_path / "c", tokenizer_config={"model_max_length": 1e30})
    assert load_tokenizer(str(d3)).context_length is None


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer\.json"):
        load_tokenizer(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="cannot load"):
        load_tokenizer(str(bad))
    d = make_model_dir(tmp_path / "badcfg")
    (d / "generation_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerLoadError, match=r"generation_config\.json"):
        load_tokenizer(str(d))


@needs_anthropic
def test_second_vocabulary(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "anth", ANTHROPIC_JSON, tokenizer_config={"eos_token": "<EOT>"})
    tok = load_tokenizer(str(d))
    assert tok.eos_token_ids == (0,)
    assert tok.special_ids >= {0, 1, 2}
    assert tok.decode(tok.encode("héllo 你好 🎉")) == "héllo 你好 🎉"


def test_bad_input_is_value_error(llama31: Path) -> None:
    tok = load_tokenizer(str(llama31))
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([2**40])
    assert tok.decode([9906, 200000]) == "Hello"  # not in the vocabulary: nothing


def test_named_templates_without_default(tmp_path: Path) -> None:
    d = make_model_dir(
        tmp_path / "m", tokenizer_config={"chat_template": [{"name": "rag", "template": "RAG"}]}
    )
    tok = load_tokenizer(str(d))
    assert tok.chat_template is None
    assert tok.chat_templates == {"rag": "RAG"}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(TokenizerLoadError, match="chat_template"):
        load_tokenizer(str(d), chat_template_path=str(bad))


@pytest.mark.parametrize("cached", [False, True])
def test_encode_releases_the_gil(llama31: Path, cached: bool) -> None:
    """A long prompt tokenized on a worker thread leaves other threads running (the
    data plane offloads big prompts so its event loop keeps streaming)."""
    import threading
    import time

    from smg.tokenizer.cache import TokenizerCacheConfig

    cache = TokenizerCacheConfig(enable_l0=True, enable_l1=True) if cached else None
    tok = load_tokenizer(str(llama31), cache=cache)
    text = "<|eot_id|>" + "Hello world, this is a long prompt. " * 8000
    done = threading.Event()
    th = threading.Thread(target=lambda: (tok.encode(text), done.set()))
    spins = 0
    deadline = time.monotonic() + 60
    th.start()
    while not done.is_set() and time.monotonic() < deadline:
        spins += 1
        time.sleep(0.0005)
    th.join(timeout=60)
    assert done.is_set()
    assert spins >= 5  # with the GIL held for the whole encode this is 1
