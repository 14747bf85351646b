"""The request-side pieces smg.translate.common gives both X -> chat translations."""

from __future__ import annotations

import pytest

from smg.translate.common import TranslateError, chat_base, chat_function


def test_chat_function_takes_the_named_schema_key() -> None:
    tool = {"name": "f", "description": "d", "input_schema": {"type": "object"}, "parameters": 1}
    assert chat_function(tool, "input_schema") == {
        "name": "f",
        "description": "d",
        "parameters": {"type": "object"},
    }


def test_chat_function_without_schema_or_string_description() -> None:
    assert chat_function({"name": "f", "description": 3}, "parameters") == {
        "name": "f",
        "parameters": {"type": "object", "properties": {}},
    }


def test_chat_base_route_model_wins_over_the_body() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert chat_base({"model": "b"}, "r", messages, "empty") == {"model": "r", "messages": messages}
    assert chat_base({"model": "b"}, None, messages, "empty")["model"] == "b"


def test_chat_base_refuses_system_text_alone() -> None:
    with pytest.raises(TranslateError, match=r"^nothing to answer$"):
        chat_base({}, None, [{"role": "system", "content": "s"}], "nothing to answer")
