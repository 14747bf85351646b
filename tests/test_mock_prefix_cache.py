"""The mock worker's simulated prefix cache: the pure LRU, then a real mock process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import mockutil
import pytest

from smg.mock_worker import options, plan
from smg.mock_worker.prefix_cache import BLOCK_TOKENS, PrefixCache, block_hashes

pytestmark = pytest.mark.timeout(60)


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# --- pure --------------------------------------------------------------------------------


def test_block_hashes_are_chained_full_blocks_of_all_but_the_last_token() -> None:
    toks = words("w", 49)  # 48 usable tokens: 3 full blocks
    hashes = block_hashes(toks)
    assert len(hashes) == 3
    assert block_hashes(words("w", 48)) == hashes[:2]  # 47 usable: 2 blocks
    assert block_hashes(words("w", 16)) == []
    # Chained: the same second block after a different first block hashes differently.
    other = ["x"] * 16 + toks[16:49]
    assert block_hashes(other)[1] != hashes[1]
    assert block_hashes(["ab", "c"] + ["z"] * 15) != block_hashes(["a", "bc"] + ["z"] * 15)


def test_block_hash_value_is_pinned() -> None:
    # A change of the hash scheme would silently change every benchmark: pin one value.
    import xxhash

    expected = xxhash.xxh3_64_intdigest("\x1f".join(["t"] * 16).encode(), 0)
    assert block_hashes(["t"] * 17) == [expected]


def test_prefix_match_counts_whole_blocks_until_the_first_miss() -> None:
    cache = PrefixCache(10_000)
    system = words("s", 64)
    assert cache.lookup(system + words("q", 20)) == 0
    assert cache.lookup(system + words("r", 20)) == 64
    assert cache.lookup(system + words("q", 20)) == 80  # 84 tokens: 83 usable, 5 blocks
    # A different first block hides the rest (a prefix cache, not a bag of blocks).
    assert cache.lookup(["x", *system[1:], *words("q", 20)]) == 0
    st = cache.stats
    assert (st.requests, st.hits, st.cached_tokens) == (4, 2, 144)
    assert st.prompt_tokens == 4 * 84
    assert cache.stats.to_json()["hit_rate"] == pytest.approx(144 / 336)


def test_identical_prompt_never_reports_every_token_cached() -> None:
    cache = PrefixCache(1000)
    prompt = words("p", 32)
    cache.lookup(prompt)
    assert cache.lookup(prompt) == 16  # the 32nd token is computed: 31 usable tokens


def test_lru_evicts_least_recent_prefix_and_trims_chains_from_the_tail() -> None:
    cache = PrefixCache(4 * BLOCK_TOKENS)  # 4 blocks
    a, b = words("a", 33), words("b", 33)  # 2 blocks each
    cache.lookup(a)
    cache.lookup(b)
    assert cache.lookup(a) == 32  # refreshes a; b is now the least recent
    c = words("c", 33)
    cache.lookup(c)  # evicts b's 2 blocks
    assert cache.stats.evicted_blocks == 2
    assert cache.lookup(a) == 32
    assert cache.lookup(b) == 0  # b evicted; stores b again, evicting c (least recent)
    # Tail first: a 3-block prompt into a full 4-block cache keeps its own head blocks.
    small = PrefixCache(2 * BLOCK_TOKENS)
    long = words("l", 49)
    small.lookup(long)
    assert small.used_tokens == 32
    assert small.lookup(long) == 32  # the first two blocks survived, the third went


def test_clear_keeps_counters_reset_zeroes_them() -> None:
    cache = PrefixCache(100)
    cache.lookup(words("a", 40))
    cache.clear()
    assert cache.used_tokens == 0 and cache.stats.requests == 1
    assert cache.lookup(words("a", 40)) == 0
    cache.reset()
    assert cache.used_tokens == 0 and cache.stats.requests == 0
    assert cache.capacity_tokens == 96  # rounded down to whole blocks
    with pytest.raises(ValueError):
        PrefixCache(-1)


def test_prompt_token_lists_follow_the_planners_counts() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "a b c"},
            {"role": "user", "content": [{"type": "text", "text": "d e"}, "f"]},
            {"role": "assistant", "content": None},
        ]
    }
    assert plan.prompt_token_lists("chat", chat) == [["a", "b", "c", "d", "e", "f"]]
    assert plan.chat_prompt_tokens(chat["messages"]) == 6
    assert plan.prompt_token_lists("completion", {"prompt": "x y"}) == [["x", "y"]]
    assert plan.prompt_token_lists("completion", {"prompt": [1, 2]}) == [["1", "2"]]
    assert plan.prompt_token_lists("completion", {"prompt": ["a b", "c"]}) == [["a", "b"], ["c"]]
    assert plan.prompt_token_lists("generate", {"input_ids": [[5], [6, 7]]}) == [["5"], ["6", "7"]]
    assert plan.prompt_token_lists("generate", {"text": "hi there"}) == [["hi", "there"]]


def test_options_flags_and_runtime_update() -> None:
    opts = options.parse_options(["--prefix-cache-tokens", "4096", "--prefill-us-per-token", "7"])
    assert (opts.prefix_cache_tokens, opts.prefill_us_per_token) == (4096, 7.0)
    assert options.RuntimeConfig.from_options(opts).prefill_us_per_token == 7.0
    default = options.parse_options([])
    assert (default.prefix_cache_tokens, default.prefill_us_per_token) == (0, 0.0)
    cfg = options.RuntimeConfig()
    assert options.apply_update(cfg, {"prefill_us_per_token": -1}) is not None
    assert options.apply_update(cfg, {"prefill_us_per_token": 2.5}) is None
    assert cfg.prefill_us_per_token == 2.5
    with pytest.raises(SystemExit):
        options.parse_options(["--prefix-cache-tokens", "-1"])


# --- a real mock process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cached2() -> Iterator[mockutil.MockWorkers]:
    args = ("--prefix-cache-tokens", "4096", "--prefill-us-per-token", "100")
    with mockutil.start_mock_workers(2, *args, engine="vllm") as mocks:
        yield mocks


@pytest.fixture()
def cw(cached2: mockutil.MockWorkers) -> str:
    for url in cached2.urls:
        mockutil.reset_stats(url)
    return cached2.urls[0]


SYSTEM = " ".join(words("sys", 1024))


def chat_body(question: str, stream: bool = False) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": 2,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def timed(url: str, body: dict[str, object]) -> tuple[float, dict[str, object]]:
    start = time.monotonic()
    status, data = mockutil.request_json("POST", url + "/v1/chat/completions", body)
    assert status == 200, data
    return time.monotonic() - start, data


def test_chat_reports_cached_tokens_and_prefill_time_follows_uncached(cw: str) -> None:
    q = " ".join(words("q", 15))  # 1039 tokens: 1038 usable, 64 full blocks
    cold_s, cold = timed(cw, chat_body(q))
    assert cold["usage"] == {
        "prompt_tokens": 1039,
        "completion_tokens": 2,
        "total_tokens": 1041,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    warm_s, warm = timed(cw, chat_body(" ".join(words("r", 15))))
    assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}
    # 100 us/token: cold ~104 ms of prefill, warm ~1.5 ms. Generous for a noisy box.
    assert cold_s >= 0.100
    assert warm_s < cold_s - 0.05
    st = mockutil.stats(cw)["prefix_cache"]
    assert st["requests"] == 2 and st["hits"] == 1
    assert st["prompt_tokens"] == 2078 and st["cached_tokens"] == 1024
    assert st["capacity_tokens"] == 4096 and st["block_tokens"] == 16
    # Both prompts' 64 full blocks lie inside the shared system prompt: stored once.
    assert st["used_tokens"] == 1024


def test_streaming_usage_completions_and_flush(cached2: mockutil.MockWorkers, cw: str) -> None:
    body = chat_body("hello there", stream=True)
    with httpx.stream("POST", cw + "/v1/chat/completions", json=body, timeout=10) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    with httpx.stream("POST", cw + "/v1/chat/completions", json=body, timeout=10) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}
    # Completions, a batch of two prompts sharing the cache: the second sees the first.
    prompt = SYSTEM + " tail"
    status, data = mockutil.request_json(
        "POST", cw + "/v1/completions", {"prompt": [prompt, prompt], "max_tokens": 1}
    )
    assert status == 200, data
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 2048}
    # vLLM's /reset_prefix_cache empties it; the counters stay.
    status, _, _ = mockutil.request("POST", cw + "/reset_prefix_cache")
    assert status == 200
    status, data = mockutil.request_json("POST", cw + "/v1/chat/completions", chat_body("x"))
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert mockutil.stats(cw)["prefix_cache"]["requests"] == 5
    # Worker 1 saw nothing: its own cache and counters.
    other = mockutil.stats(cached2.urls[1])["prefix_cache"]
    assert other["requests"] == 0 and other["used_tokens"] == 0


def test_sglang_omits_prompt_tokens_details_until_something_is_cached() -> None:
    # sglang/srt/entrypoints/openai/usage_processor.py: _details_if_cached(count) is None at 0.
    with mockutil.start_mock_workers(1, "--prefix-cache-tokens", "4096") as mocks:
        body = {"prompt": SYSTEM, "max_tokens": 1, "stream": True}
        body["stream_options"] = {"include_usage": True}
        usages = []
        for _ in range(2):
            with httpx.stream("POST", mocks.url + "/v1/completions", json=body, timeout=10) as r:
                assert r.status_code == 200
                events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
            usages.append(json.loads(events[-2])["usage"])
        assert "prompt_tokens_details" not in usages[0]
        assert usages[1]["prompt_tokens_details"] == {"cached_tokens": 1008}  # 1023 usable
        status, data = mockutil.request_json(
            "POST", mocks.url + "/generate", {"text": SYSTEM, "sampling_params": {}}
        )
        assert status == 200 and data["meta_info"]["cached_tokens"] == 1008


def test_no_cache_by_default_and_prefill_applies_to_every_token() -> None:
    with mockutil.start_mock_workers(1, "--prefill-us-per-token", "200") as mocks:
        status, data = mockutil.request_json(
            "POST", mocks.url + "/v1/completions", {"prompt": SYSTEM, "max_tokens": 1}
        )
        assert status == 200
        assert "prompt_tokens_details" not in data["usage"]
        assert mockutil.stats(mocks.url)["prefix_cache"] is None
        start = time.monotonic()
        mockutil.request_json("POST", mocks.url + "/v1/completions", {"prompt": SYSTEM})
        assert time.monotonic() - start >= 0.2  # 1024 tokens x 200 us, no cache to help
        status, data = mockutil.request_json(
            "POST", mocks.url + "/generate", {"text": SYSTEM, "sampling_params": {}}
        )
        assert status == 200 and data["meta_info"]["cached_tokens"] == 0
