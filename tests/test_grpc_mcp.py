"""The MCP tool loop of POST /v1/responses on a gRPC model, end to end: `smg launch
--processes 2` in front of the gRPC mock (Qwen3 template, `--tool-call-parser qwen`), the
real MCP server tests/mcpserver.py over stdio, the openai SDK (max_retries=0).

The loop calls the model through the gateway itself, so on a gRPC model smg renders the
tools into the template, the qwen parser reads the model's `<tool_call>`, smg runs `add` on
the MCP server and renders its output back into the next prompt. The mock answers every
request with the same call, so `max_tool_calls: 1` runs one call and stops the second at the
limit (1.13's "Not executed" item, `incomplete_details.reason` `max_tool_calls`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from grpcmockutil import GrpcMock

from smg.mcp.loop import NOT_EXECUTED
from tests.gatewayutil import Gateway
from tests.mcputil import CALC_TOOLS as TOOLS
from tests.mcputil import QWEN3 as MODEL
from tests.mcputil import grpc_calc_gateway

OFF = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, GrpcMock]]:
    with grpc_calc_gateway(tmp_path_factory.mktemp("grpcmcp")) as served:
        yield served


def _client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)


def _prompt(mock: GrpcMock) -> str:
    return str(mock.stats()["last_generate_request"]["tokenized"]["original_text"])


def _check(output: list[Any]) -> None:
    assert [item.type for item in output] == ["mcp_list_tools", "mcp_call", "mcp_call"]
    listed, ran, stopped = output
    assert listed.server_label == "calc" and "add" in [t.name for t in listed.tools]
    # The arguments as the qwen parser read them from the model's text.
    assert (ran.name, ran.arguments, ran.output, ran.error) == (
        "add",
        '{"a": 2, "b": 3}',
        "5",
        None,
    )
    assert (stopped.name, stopped.status, stopped.error) == ("add", "failed", NOT_EXECUTED)


def test_add_over_grpc(served: tuple[Gateway, GrpcMock]) -> None:
    gw, mock = served
    made = _client(gw).responses.create(
        model=MODEL, input="What is 2 + 3?", tools=TOOLS, max_tool_calls=1, extra_body=OFF
    )
    _check(made.output)
    assert made.incomplete_details is not None
    assert made.incomplete_details.reason == "max_tool_calls"  # type: ignore[comparison-overlap]
    # The second model call's prompt: the tool rendered by the template, the call and its
    # output rendered back as Qwen3 renders a tool turn.
    prompt = _prompt(mock)
    assert '"name": "add"' in prompt and "<tool_response>\n5\n</tool_response>" in prompt
    stored = _client(gw).responses.retrieve(made.id)
    assert [item.type for item in stored.output] == ["mcp_list_tools", "mcp_call", "mcp_call"]


def test_add_over_grpc_streamed(served: tuple[Gateway, GrpcMock]) -> None:
    gw, _mock = served
    events = list(
        _client(gw).responses.create(
            model=MODEL,
            input="What is 2 + 3?",
            tools=TOOLS,
            max_tool_calls=1,
            stream=True,
            extra_body=OFF,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.mcp_call.completed" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    _check(events[-1].response.output)  # type: ignore[union-attr]
