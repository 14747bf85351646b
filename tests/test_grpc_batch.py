"""Batched prompts on /v1/completions in gRPC mode: one engine request per prompt (x n),
all at once, choices numbered prompt-major (prompt i, sample j -> i * n + j), usage
summed; streamed chunks interleave; the first failure fails the request; a client that
leaves aborts every engine request."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from grpcmockutil import GrpcMock

from smg.grpc import prepare, respond
from smg.grpc.prepare import MAX_BATCH_PROMPTS, Defaults, RequestError, prepare_completion
from tests.gatewayutil import Gateway, wait_until
from tests.test_grpc_e2e import (
    MODEL,
    TEXT,
    client,
    gateway,
    grpc_mocks,
    make_tokenizer_dir,
    serving,
    text_mode,
)

# --- pure: the arithmetic and the checks ------------------------------------------------------


def test_batch_index_is_prompt_major() -> None:
    assert [respond.batch_index(i, 2, j) for i in range(3) for j in range(2)] == list(range(6))
    assert respond.batch_index(0, 1, 0) == 0
    assert respond.batch_index(4, 1, 0) == 4
    assert respond.batch_index(2, 3, 1) == 7


def test_usage_is_summed_over_prompts() -> None:
    usage = respond.summed_usage(
        [respond.Usage(5, 6, 0), respond.Usage(7, 12, 3), respond.Usage(1, 0, 1)]
    )
    assert usage.as_dict() == {
        "prompt_tokens": 13,
        "completion_tokens": 18,
        "total_tokens": 31,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_prepare_keeps_every_prompt() -> None:
    p = prepare_completion({"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 3}, Defaults())
    assert p.prompts == ["a", "b", "c"] and p.prompt == "a"
    ids = prepare_completion({"prompt": [[1, 2], [3]]}, Defaults())
    assert ids.prompts == [[1, 2], [3]] and ids.prompt == [1, 2]
    # one prompt keeps today's shape: no batch
    assert prepare_completion({"prompt": ["a"]}, Defaults()).prompts is None
    assert prepare_completion({"prompt": [[1, 2]]}, Defaults()).prompts is None
    assert prepare_completion({"prompt": [1, 2]}, Defaults()).prompts is None
    part = prepare.batch_part(p, "b")
    assert (part.prompt, part.prompts, part.sampling.n) == ("b", None, 2)
    part.sampling.max_tokens = 1
    assert p.sampling.max_tokens == 3  # each prompt's own sampling copy


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (["a", ""], "Prompt cannot be empty."),
        ([[1], []], "Prompt cannot be empty."),
        ([[1], [2, -1]], "'prompt' holds a negative token id."),
        ([[1], ["a"]], "'prompt' must be a list of token-id lists."),
        (
            ["a", [1]],
            "'prompt' must be a string, a list of token ids, a list of strings or a list "
            "of token-id lists (not a mix).",
        ),
        (
            ["a"] * (MAX_BATCH_PROMPTS + 1),
            f"at most {MAX_BATCH_PROMPTS} prompts per request, got {MAX_BATCH_PROMPTS + 1}.",
        ),
    ],
)
def test_prepare_refuses_bad_batches(prompt: list[Any], message: str) -> None:
    with pytest.raises(RequestError) as caught:
        prepare_completion({"prompt": prompt}, Defaults())
    assert (caught.value.status, caught.value.param, caught.value.message) == (
        400,
        "prompt",
        message,
    )


def test_batch_body_numbers_choices_and_keeps_echo_per_prompt() -> None:
    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "".join(chr(96 + i) for i in ids)

    p = prepare_completion({"prompt": ["x", "y"], "n": 2, "echo": True}, Defaults())
    parts = [prepare.batch_part(p, q) for q in p.prompts or []]

    def choice(i: int) -> list[respond.Delta]:
        return [respond.Delta(i, "t", None, "length", None, [1])]

    body = json.loads(
        respond.completion_batch_body(
            parts,
            "r1",
            "m",
            7,
            Tok(),
            [[choice(0), choice(1)], [choice(0), choice(1)]],
            respond.Usage(2, 4, 0),
        )
    )
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "xt"),
        (1, "xt"),
        (2, "yt"),
        (3, "yt"),
    ]
    assert body["id"] == "cmpl-r1" and body["usage"]["total_tokens"] == 6


# --- end to end: smg launch in front of the gRPC mock -----------------------------------------


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def one(tokdir: Path) -> Iterator[tuple[Gateway, GrpcMock]]:
    with grpc_mocks(tokdir, 1, *text_mode()) as mocks, gateway(serving(tokdir, mocks)) as gw:
        yield gw, mocks[0]


def completions(gw: Gateway, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30, **kw)


def sse(gw: Gateway, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """A streamed answer: (its JSON chunks, every data line)."""
    lines = []
    with httpx.stream(
        "POST",
        gw.url + "/v1/completions",
        json={"model": MODEL, "stream": True, **body},
        timeout=30,
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: ") :])
    return [json.loads(x) for x in lines if x != "[DONE]"], lines


def test_strings_answer_one_choice_per_prompt_with_summed_usage(
    one: tuple[Gateway, GrpcMock],
) -> None:
    gw, mock = one
    before = mock.stats()["generate"]
    singles = [completions(gw, {"prompt": p, "max_tokens": 20}).json() for p in ("Hi", "Hi you")]
    answer = completions(gw, {"prompt": ["Hi", "Hi you"], "max_tokens": 20})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, TEXT, "stop"),
        (1, TEXT, "stop"),
    ]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][key] == sum(s["usage"][key] for s in singles)
    assert mock.stats()["generate"] == before + 4  # two singles, then one request per prompt


def test_token_lists_with_n2_number_choices_prompt_major(one: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = one
    prompts = [[9906, 1070], [9906], [13347, 11, 1917]]
    answer = completions(gw, {"prompt": prompts, "n": 2, "max_tokens": 20, "echo": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert all(c["text"].endswith(TEXT) for c in body["choices"])
    # echo: prompt i leads choices 2i and 2i+1
    texts = [c["text"][: -len(TEXT)] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[4] == texts[5]
    assert len({texts[0], texts[2], texts[4]}) == 3
    assert body["usage"]["prompt_tokens"] == 2 + 1 + 3
    sent = mock.stats()["last_generate_request"]
    assert re.fullmatch(r".+-p[012]", sent["request_id"])  # the engine's names: <id>-p<i>


def test_stream_interleaves_prompts_with_one_usage_chunk_and_one_done(
    one: tuple[Gateway, GrpcMock],
) -> None:
    gw, _mock = one
    chunks, lines = sse(
        gw,
        {
            "prompt": ["a", "b c", "d e f"],
            "n": 2,
            "max_tokens": 20,
            "stream_options": {"include_usage": True},
        },
    )
    assert lines.count("[DONE]") == 1 and lines[-1] == "[DONE]"
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    singles = [
        completions(gw, {"prompt": p, "max_tokens": 1}).json() for p in ("a", "b c", "d e f")
    ]
    assert last["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert all(c["usage"] is None for c in content if "usage" in c)
    assert len({c["id"] for c in chunks}) == 1
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for c in content:
        assert len(c["choices"]) == 1
        choice = c["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == dict.fromkeys(range(6), TEXT)
    assert finished == dict.fromkeys(range(6), "stop")


def test_openai_sdk_parses_batched_answers(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    sdk = client(gw)
    answer = sdk.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=20, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert {c.text for c in answer.choices} == {TEXT}
    assert answer.usage is not None and answer.usage.total_tokens > 0
    stream = sdk.completions.create(
        model=MODEL,
        prompt=[[9906], [9906, 1070]],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert texts == {0: TEXT, 1: TEXT}
    assert usage is not None and usage.prompt_tokens == 3


def test_a_prompt_over_the_context_fails_the_batch_before_dispatch(
    one: tuple[Gateway, GrpcMock],
) -> None:
    gw, mock = one
    before = mock.stats()["generate"]
    answer = completions(gw, {"prompt": ["ok", "word " * 5000]})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert mock.stats()["generate"] == before


def test_an_engine_failure_fails_the_request_as_a_single_prompt_would(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, *text_mode(), "--itl-ms", "5") as mocks,
        gateway(serving(tokdir, mocks, "--disable-retries")) as gw,
    ):
        mock = mocks[0]
        mock.config(fail_next=1, fail_code="INVALID_ARGUMENT")
        single = completions(gw, {"prompt": "a", "max_tokens": 20})
        mock.config(fail_next=1, fail_code="INVALID_ARGUMENT")
        batch = completions(gw, {"prompt": ["a", "b", "c"], "max_tokens": 20})
        assert (batch.status_code, batch.json()) == (single.status_code, single.json())
        assert batch.status_code == 400
        # After the head: the stream ends with the single path's error event.
        mock.config(fail_next=1, fail_code="INTERNAL", fail_after_tokens=2)
        chunks, lines = sse(gw, {"prompt": ["a", "b"], "max_tokens": 20})
        assert lines[-1] == "[DONE]" and lines.count("[DONE]") == 1
        assert chunks[-1] == {
            "error": {"message": "mock failure", "type": "stream_error", "code": "internal_error"}
        }
        assert any(c.get("choices") for c in chunks[:-1])


def test_client_disconnect_aborts_every_prompts_engine_request(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, "--itl-ms", "50", "--output-mode", "random") as mocks,
        gateway(serving(tokdir, mocks)) as gw,
    ):
        with httpx.stream(
            "POST",
            gw.url + "/v1/completions",
            json={
                "model": MODEL,
                "prompt": ["a", "b", "c"],
                "stream": True,
                "max_tokens": 1000,
                "ignore_eos": True,
            },
            headers={"x-request-id": "batch-abort"},
            timeout=30.0,
        ) as response:
            assert response.status_code == 200
            seen: set[int] = set()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    seen.update(c["index"] for c in json.loads(line[6:])["choices"])
                if seen == {0, 1, 2}:
                    break  # every prompt streams at once
        wanted = {f"batch-abort-p{i}" for i in range(3)}
        stats = wait_until(
            lambda: (s := mocks[0].stats()) and wanted <= set(map(str, s["aborted"])) and s,
            10.0,
            "the mock to see every prompt's Abort",
        )
        assert wanted <= set(map(str, stats["aborted"]))


def test_sdk_error_on_batched_failure(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 1, *text_mode()) as mocks,
        gateway(serving(tokdir, mocks, "--disable-retries")) as gw,
    ):
        mocks[0].config(fail_next=1, fail_code="RESOURCE_EXHAUSTED")
        with pytest.raises(openai.RateLimitError):
            client(gw).completions.create(model=MODEL, prompt=["a", "b"], max_tokens=5)


def test_unavailable_before_any_output_retries_the_batch_elsewhere(tokdir: Path) -> None:
    with (
        grpc_mocks(tokdir, 2, *text_mode()) as mocks,
        gateway(serving(tokdir, mocks, "--policy", "round_robin")) as gw,
    ):
        mocks[0].config(fail_next=1, fail_code="UNAVAILABLE")
        for _ in range(2):  # round robin: one of the two reaches the failing worker
            answer = completions(gw, {"prompt": ["a", "b"], "max_tokens": 20})
            assert answer.status_code == 200, answer.text
            assert [c["text"] for c in answer.json()["choices"]] == [TEXT, TEXT]
        retries = [
            line
            for line in gw.metrics().splitlines()
            if line.startswith("smg_worker_retries_total")
        ]
        assert sum(float(line.split()[-1]) for line in retries) == 1.0


def test_stop_strings_end_each_prompts_choices(one: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = one
    body = {"prompt": ["a", "b"], "n": 2, "stop": [", w"], "max_tokens": 50}
    answer = completions(gw, body).json()
    assert [(c["index"], c["text"], c["stop_reason"]) for c in answer["choices"]] == [
        (i, "Hello there", ", w") for i in range(4)
    ]
    chunks, _lines = sse(gw, body)
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == dict.fromkeys(range(4), "Hello there")
