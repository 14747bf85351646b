"""OpenAI chat messages -> the messages Hugging Face chat templates expect (pure).

vLLM's rules (`vllm/entrypoints/chat_utils.py`: `_parse_chat_message_content`,
`_postprocess_messages`), so that a prompt rendered here is the one the engine's own OpenAI
server would render:
- content becomes what the template's content format wants: for "string" templates the text
  parts joined with "\\n" (None: ""), for "openai" templates a list of
  {"type": "text", "text": ...} (a plain string is wrapped; None: []);
- assistant `tool_calls[].function.arguments` JSON strings are parsed into objects (empty: {});
- reasoning (`reasoning` / `reasoning_content`) is kept under both names on assistant messages,
  `tool_call_id` on tool messages, a string `name` on any message; other keys are dropped.
Multimodal parts are out of scope in gRPC mode and are refused with a clear error.
`normalize_tools` gives request tools the shape vLLM's `tool.model_dump()` hands the template.
"""

from __future__ import annotations

import json
from typing import Any

from smg.chat.template import TemplateError

# Part types whose value is text, and the key it is under.
_TEXT_PARTS: dict[str, str] = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


def _texts(content: Any, index: int) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise TemplateError(f"messages[{index}].content must be a string or a list of parts")
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise TemplateError(f"messages[{index}].content parts must be objects")
        kind = part.get("type")
        if kind is None:
            raise TemplateError(f"messages[{index}].content: missing 'type' field in a part")
        key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise TemplateError(
                f"messages[{index}].content: part type {kind!r} is not supported "
                "(only text parts are, in gRPC mode)"
            )
        text = part.get(key)
        if text is None:
            continue  # vLLM skips a text part without text
        if not isinstance(text, str):
            raise TemplateError(f"messages[{index}].content: part {key!r} must be a string")
        texts.append(text)
    return texts


def _tool_calls(calls: Any, index: int) -> list[Any]:
    if not isinstance(calls, list):
        raise TemplateError(f"messages[{index}].tool_calls must be a list")
    out: list[Any] = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise TemplateError(f"messages[{index}].tool_calls[] must have a 'function' object")
        function = dict(call["function"])
        arguments = function.get("arguments")
        # Templates write tool-call arguments with tojson / items(): they expect an object,
        # as transformers documents; OpenAI clients send a JSON string.
        if not arguments:
            function["arguments"] = {}
        elif not isinstance(arguments, (dict, list)):
            if not isinstance(arguments, str):
                raise TemplateError(
                    f"messages[{index}].tool_calls[].function.arguments must be a string"
                )
            try:
                function["arguments"] = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise TemplateError(
                    f"messages[{index}].tool_calls[].function.arguments is not valid JSON: {exc.msg}"
                ) from exc
        out.append({**call, "function": function})
    return out


def normalize_messages(messages: list[dict], content_format: str) -> list[dict]:
    """New message dicts for `ChatTemplate.render`; the input is not changed."""
    if content_format not in ("string", "openai"):
        raise ValueError(f"unknown content format {content_format!r}")
    wrap = content_format == "openai"
    out: list[dict] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TemplateError(f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise TemplateError(f"messages[{index}].role must be a string")
        texts = _texts(message.get("content"), index)
        content: str | list[dict[str, str]] = (
            [{"type": "text", "text": text} for text in texts] if wrap else "\n".join(texts)
        )
        result: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None:
                result["tool_calls"] = _tool_calls(calls, index)
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if reasoning is not None:
                result["reasoning"] = reasoning
                result["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in message:
            result["tool_call_id"] = message["tool_call_id"]
        name = message.get("name")
        if isinstance(name, str):
            result["name"] = name
        out.append(result)
    return out


def normalize_tools(tools: list[dict] | None) -> list[dict] | None:
    """Request `tools` as vLLM passes them to the template (`[t.model_dump() for t in
    request.tools]`, pydantic models with extra keys allowed): "type" then "function", and in
    the function "name", "description", "parameters" (None when absent: `tool | tojson`
    writes `"description": null` there), then any other keys in the order sent. Key order
    matters: templates print tools with tojson, unsorted. No tools (None or []) -> None, so
    that `tools is not none` in a template stays false."""
    if not tools:
        return None
    if not isinstance(tools, list):
        raise TemplateError("tools must be a list")
    out: list[dict] = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise TemplateError(f"tools[{index}] must be an object")
        kind = tool.get("type", "function")
        function = tool.get("function")
        if kind != "function":
            raise TemplateError(f"tools[{index}].type must be 'function'")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TemplateError(f"tools[{index}].function must be an object with a string 'name'")
        fn: dict[str, Any] = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        fn.update((k, v) for k, v in function.items() if k not in fn)
        entry: dict[str, Any] = {"type": "function", "function": fn}
        entry.update((k, v) for k, v in tool.items() if k not in entry)
        out.append(entry)
    return out
