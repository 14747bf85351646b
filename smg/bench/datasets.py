"""Prompt sets (pure, seeded): random, prefix repetition, shared prefix, ShareGPT, trace.

Lengths are in tokens of the given tokenizer. Token sequences are decoded to text and
re-encoded until the text has the target length (decoding N tokens does not always
give text that encodes to N tokens); what remains off is counted in `mismatch`.
Seeds drive Python's `random`, so prompts are reproducible run to run but are not
byte-identical to vllm's numpy-generated ones.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smg.bench.tokenizer import Tokenizer

DATASETS = (
    "random",
    "prefix_repetition",
    "generated-shared-prefix",
    "sharegpt",
    "timed_trace",
    "custom",
    "hf",
)
# Datasets read from --dataset-path.
PATH_DATASETS = ("sharegpt", "timed_trace", "custom", "hf")


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int
    timestamp: float | None = None  # seconds; only for traces


@dataclass
class DatasetInfo:
    mismatch: int = 0  # tokens more (+) or fewer (-) than asked, summed over prompts
    notes: list[str] = field(default_factory=list)


def fit_to_length(
    tok: Tokenizer, ids: list[int], target: int, rng: random.Random, allowed: list[int]
) -> tuple[str, int]:
    """Text whose encoding is (as near as possible to) `target` tokens, and its length."""
    ids = list(ids[:target])
    text = tok.decode(ids)
    for _ in range(10):
        enc = tok.encode(text)
        if len(enc) == target:
            return text, target
        if len(enc) > target:
            ids = enc[:target]
        else:
            ids = enc + [rng.choice(allowed) for _ in range(target - len(enc))]
        text = tok.decode(ids)
    return text, len(tok.encode(text))


def length_bounds(mean_len: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    lo = max(math.floor(mean_len * (1 - range_ratio)), minimum)
    hi = max(math.ceil(mean_len * (1 + range_ratio)), minimum)
    return lo, hi


def random_dataset(
    tok: Tokenizer,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> tuple[list[SampleRequest], DatasetInfo]:
    """vllm's `random`: a shared random prefix, then consecutive token ids from an offset.

    Input lengths are uniform integers in [floor(L(1-r)), ceil(L(1+r))], outputs the same
    with a floor of 1.
    """
    rng = random.Random(seed)
    allowed = tok.allowed_ids()
    in_lo, in_hi = length_bounds(input_len, range_ratio)
    out_lo, out_hi = length_bounds(output_len, range_ratio, minimum=1)
    if prefix_len + in_lo < 1:
        raise ValueError("--random-input-len too small: prompts would be empty")
    in_lens = [rng.randint(in_lo, in_hi) for _ in range(num)]
    out_lens = [rng.randint(out_lo, out_hi) for _ in range(num)]
    offsets = [rng.randrange(len(allowed)) for _ in range(num)]
    prefix = [rng.choice(allowed) for _ in range(prefix_len)]
    info = DatasetInfo()
    out: list[SampleRequest] = []
    n_allowed = len(allowed)
    for i in range(num):
        inner = [allowed[(offsets[i] + i + k) % n_allowed] for k in range(in_lens[i])]
        target = prefix_len + in_lens[i]
        text, got = fit_to_length(tok, prefix + inner, target, rng, allowed)
        info.mismatch += got - target
        out.append(SampleRequest(text, got, out_lens[i]))
    return out, info


def prefix_repetition_dataset(
    tok: Tokenizer,
    num: int,
    prefix_len: int = 256,
    suffix_len: int = 256,
    num_prefixes: int = 10,
    output_len: int = 128,
    seed: int = 0,
) -> tuple[list[SampleRequest], DatasetInfo]:
    """vllm's `prefix_repetition`: num_prefixes random prefixes, each with num // num_prefixes
    random suffixes; shuffled."""
    per = num // num_prefixes
    if per == 0:
        raise ValueError(f"--num-prompts ({num}) must be >= the number of prefixes")
    rng = random.Random(seed)
    allowed = tok.allowed_ids()
    info = DatasetInfo()
    out: list[SampleRequest] = []
    for _ in range(num_prefixes):
        p_text, p_len = fit_to_length(
            tok, [rng.choice(allowed) for _ in range(prefix_len)], prefix_len, rng, allowed
        )
        p_ids = tok.encode(p_text)
        info.mismatch += p_len - prefix_len
        for _ in range(per):
            s_text, s_len = fit_to_length(
                tok, [rng.choice(allowed) for _ in range(suffix_len)], suffix_len, rng, allowed
            )
            info.mismatch += s_len - suffix_len
            ids = p_ids + tok.encode(s_text)
            out.append(SampleRequest(tok.decode(ids), len(ids), output_len))
    rng.shuffle(out)
    return out, info


def shared_prefix_dataset(
    tok: Tokenizer,
    num_groups: int = 64,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
    seed: int = 0,
) -> tuple[list[SampleRequest], DatasetInfo]:
    """SGLang's `generated-shared-prefix`: per group one system prompt shared by its
    questions; prompt = system + "\\n\\n" + question; shuffled. --num-prompts is ignored."""
    rng = random.Random(seed)
    allowed = tok.allowed_ids()
    info = DatasetInfo()
    out: list[SampleRequest] = []
    for _ in range(num_groups):
        sys_text, sys_len = fit_to_length(
            tok,
            [rng.choice(allowed) for _ in range(system_prompt_len)],
            system_prompt_len,
            rng,
            allowed,
        )
        info.mismatch += sys_len - system_prompt_len
        for _ in range(prompts_per_group):
            q_text, q_len = fit_to_length(
                tok, [rng.choice(allowed) for _ in range(question_len)], question_len, rng, allowed
            )
            info.mismatch += q_len - question_len
            prompt = sys_text + "\n\n" + q_text
            out.append(SampleRequest(prompt, len(tok.encode(prompt)), output_len))
    rng.shuffle(out)
    return out, info


def sharegpt_dataset(
    tok: Tokenizer,
    path: str,
    num: int,
    output_len: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    oversample: bool = True,
) -> tuple[list[SampleRequest], DatasetInfo]:
    """ShareGPT-format JSON from a local file: first turn is the prompt, second sets the
    output length unless --sharegpt-output-len. vllm's filter: prompt and output >= 4 tokens,
    prompt <= 1024, prompt + output <= 2048."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    entries = [
        e
        for e in data
        if isinstance(e, dict)
        and isinstance(e.get("conversations"), list)
        and len(e["conversations"]) >= 2
    ]
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(entries)
    out: list[SampleRequest] = []
    for e in entries:
        if len(out) >= num:
            break
        prompt = str(e["conversations"][0].get("value", ""))
        completion = str(e["conversations"][1].get("value", ""))
        p_len = tok.count(prompt)
        o_len = tok.count(completion) if output_len is None else output_len
        too_short = p_len < 4 or (output_len is None and o_len < 4)
        if too_short or p_len > 1024 or p_len + o_len > 2048:
            continue
        out.append(SampleRequest(prompt, p_len, o_len))
    info = DatasetInfo()
    if not out:
        raise ValueError(f"{path}: no usable conversations")
    if oversample and len(out) < num:
        info.notes.append(f"oversampled {num - len(out)} prompts to reach {num}")
        out.extend(rng.choice(out[: len(out)]) for _ in range(num - len(out)))
    return out, info


def timed_trace_dataset(
    tok: Tokenizer,
    path: str,
    num: int,
    chunk_size: int = 16,
    sec_multiplier: float = 1.0,
    labels: dict[str, str] | None = None,
    seed: int = 0,
) -> tuple[list[SampleRequest], DatasetInfo]:
    """A JSONL trace (vllm `timed_trace` / Mooncake format), first `num` rows in order.

    Row: {"timestamp", "input_length", "output_length", "hash_ids"?}. Each hash id stands
    for `chunk_size` tokens whose content depends only on (seed, hash id), so rows sharing
    hash ids share a token prefix; the prompt is cut or filled to `input_length`.
    Timestamps are multiplied by `sec_multiplier` (0.001 for millisecond traces).
    """
    names = {"timestamp": "timestamp", "input_length": "input_length"}
    names.update({"output_length": "output_length", "hash_ids": "hash_ids"})
    names.update(labels or {})
    allowed = tok.allowed_ids()
    chunks: dict[int, list[int]] = {}
    rng = random.Random(seed)
    info = DatasetInfo()
    out: list[SampleRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(out) >= num:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ts = float(row[names["timestamp"]]) * sec_multiplier
                in_len = int(row[names["input_length"]])
                out_len = int(row[names["output_length"]])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: bad trace row ({exc})") from exc
            ids: list[int] = []
            for h in row.get(names["hash_ids"]) or []:
                if h not in chunks:
                    crng = random.Random(f"{seed}:{h}")
                    chunks[h] = [crng.choice(allowed) for _ in range(chunk_size)]
                ids.extend(chunks[h])
                if len(ids) >= in_len:
                    break
            ids = ids[:in_len] + [rng.choice(allowed) for _ in range(in_len - len(ids))]
            text = tok.decode(ids)
            got = len(tok.encode(text))
            info.mismatch += got - in_len
            out.append(SampleRequest(text, got, max(out_len, 1), timestamp=ts))
    if not out:
        raise ValueError(f"{path}: empty trace")
    return out, info


# -- local prompt files: vLLM's `custom` and `hf` (pure: rows in, samples out) --------

# Columns holding a conversation (a list of turns), then plain prompt columns, in the
# order they are tried; a completion column, when present, sets the output length.
CONVERSATION_COLUMNS = ("conversations", "conversation", "messages")
PROMPT_COLUMNS = ("prompt", "question", "problem", "instruction", "text", "input", "turns")
COMPLETION_COLUMNS = ("completion", "response", "output", "answer", "solution")
HF_DEFAULT_OUTPUT_LEN = 256


def _turn_text(turn: Any) -> str | None:
    """A turn's text: ShareGPT's {"from", "value"}, OpenAI's {"role", "content"}, or a str."""
    if isinstance(turn, str):
        return turn
    if isinstance(turn, dict):
        for key in ("value", "content", "text"):
            if isinstance(turn.get(key), str):
                return str(turn[key])
    return None


def row_prompt(row: dict[str, Any], column: str | None) -> tuple[str, str | None] | None:
    """(prompt, completion or None) of one row, or None when the row has no usable prompt.

    A conversation column gives its first turn as the prompt and its second as the
    completion (vLLM's ConversationDataset); `turns` (MT-Bench) gives its first string.
    """
    names = (column,) if column else CONVERSATION_COLUMNS + PROMPT_COLUMNS
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, list):
            texts = [_turn_text(t) for t in value]
            if not texts or texts[0] is None:
                return None
            completion = texts[1] if len(texts) > 1 and name != "turns" else None
            return texts[0], completion
        if isinstance(value, str):
            completion = next(
                (row[c] for c in COMPLETION_COLUMNS if isinstance(row.get(c), str)), None
            )
            return value, completion
        return None
    return None


def _oversample(
    out: list[SampleRequest], num: int, rng: random.Random, oversample: bool, info: DatasetInfo
) -> None:
    if oversample and 0 < len(out) < num:
        info.notes.append(f"oversampled {num - len(out)} prompts to reach {num}")
        out.extend(rng.choice(out[: len(out)]) for _ in range(num - len(out)))


def custom_dataset(
    tok: Tokenizer,
    rows: list[dict[str, Any]],
    num: int,
    output_len: int = 256,
    seed: int = 0,
    shuffle: bool = True,
    oversample: bool = True,
    template: Callable[[str], str] | None = None,
    source: str = "custom",
) -> tuple[list[SampleRequest], DatasetInfo]:
    """vLLM's `custom`: one {"prompt": ...} per JSON line; every output --custom-output-len
    tokens; the chat template applied to each prompt unless --skip-chat-template (None)."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{source}:{i}: each line needs a string 'prompt' field")
    rng = random.Random(seed)
    rows = list(rows)
    if shuffle:
        rng.shuffle(rows)
    out: list[SampleRequest] = []
    for row in rows[:num]:
        prompt = template(row["prompt"]) if template else row["prompt"]
        out.append(SampleRequest(prompt, tok.count(prompt), output_len))
    if not out:
        raise ValueError(f"{source}: no prompts")
    info = DatasetInfo()
    _oversample(out, num, rng, oversample, info)
    return out, info


def hf_dataset(
    tok: Tokenizer,
    rows: list[dict[str, Any]],
    num: int,
    output_len: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    oversample: bool = True,
    column: str | None = None,
    source: str = "hf",
) -> tuple[list[SampleRequest], DatasetInfo]:
    """Rows of a local Hugging Face dataset file (see `row_prompt` for the columns).

    The output length is --hf-output-len, else the completion's token count (then vLLM's
    ShareGPT filter applies: prompt and completion >= 4 tokens, prompt <= 1024, both
    <= 2048), else 256."""
    rng = random.Random(seed)
    rows = list(rows)
    if shuffle:
        rng.shuffle(rows)
    info = DatasetInfo()
    out: list[SampleRequest] = []
    skipped = 0
    for row in rows:
        if len(out) >= num:
            break
        got = row_prompt(row, column) if isinstance(row, dict) else None
        if got is None:
            skipped += 1
            continue
        prompt, completion = got
        p_len = tok.count(prompt)
        if output_len is not None:
            o_len = output_len
        elif completion is not None:
            o_len = tok.count(completion)
            if p_len < 4 or o_len < 4 or p_len > 1024 or p_len + o_len > 2048:
                skipped += 1
                continue
        else:
            o_len = HF_DEFAULT_OUTPUT_LEN
        out.append(SampleRequest(prompt, p_len, max(o_len, 1)))
    if skipped:
        info.notes.append(f"skipped {skipped} rows (no prompt column, or filtered by length)")
    if not out:
        wanted = column or ", ".join(CONVERSATION_COLUMNS + PROMPT_COLUMNS)
        raise ValueError(f"{source}: no usable rows (looked for a column among: {wanted})")
    _oversample(out, num, rng, oversample, info)
    return out, info
