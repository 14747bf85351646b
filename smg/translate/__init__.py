"""Request and answer translation between the Anthropic Messages API and OpenAI chat
completions, for a client of one API routed to a worker that speaks only the other.

Pure code (h11 style: bytes in, bytes out; no I/O, no clock but the `created` stamp):
the data plane builds a Translation per request, sends `upstream_body` to
`upstream_path`, and passes the worker's answer through `response()` (whole answers, 2xx
or error) or `feed()`/`finish()` (2xx event streams, split anywhere).
"""

from __future__ import annotations

from typing import Any, Protocol

from smg.providers import API_ANTHROPIC, API_OPENAI
from smg.translate.chat_messages import ChatOverMessages
from smg.translate.common import TranslateError
from smg.translate.messages_chat import MessagesOverChat
from smg.translate.responses_chat import ResponsesOverChat

__all__ = [
    "ResponsesOverChat",
    "TranslateError",
    "Translation",
    "responses_over_chat",
    "translation",
]

MESSAGES_ROUTE = "/v1/messages"
CHAT_ROUTE = "/v1/chat/completions"
RESPONSES_ROUTE = "/v1/responses"
_TRANSLATED = {(MESSAGES_ROUTE, API_OPENAI), (CHAT_ROUTE, API_ANTHROPIC)}


class Translation(Protocol):
    upstream_path: bytes  # b"/v1/chat/completions" or b"/v1/messages"
    upstream_body: bytes  # the translated request (JSON)
    stream: bool

    def response(self, status: int, body: bytes) -> bytes:
        """A whole upstream answer (2xx or error) -> the client's body (status kept)."""
        ...

    def feed(self, data: bytes) -> bytes:
        """Upstream SSE bytes, split anywhere -> client SSE bytes (maybe b"")."""
        ...

    def finish(self) -> bytes:
        """The upstream stream ended: the closing events still owed (an error event when
        it ended before the answer was complete)."""
        ...

    def abort(self, code: str, message: str) -> bytes:
        """A gateway-side stream failure -> the client's error event."""
        ...


def translation(
    client_path: str, body: dict[str, Any], worker_api: str, model: str | None
) -> Translation | None:
    """The translation a request needs to reach a worker of `worker_api`, or None when it
    goes as it came (same API, or a worker speaking both). `model` names the model in the
    upstream request when given (else the body's). Raises TranslateError (answer 400) when
    the request is malformed or cannot be expressed in the worker's API."""
    if (client_path, worker_api) not in _TRANSLATED:
        return None
    if not isinstance(body, dict):
        raise TranslateError("the request body must be a JSON object")
    if client_path == MESSAGES_ROUTE:
        return MessagesOverChat(body, model)
    return ChatOverMessages(body, model)


def responses_over_chat(body: dict[str, Any], model: str | None) -> ResponsesOverChat:
    """/v1/responses served by a chat pipeline (a gRPC model, where smg renders and parses):
    not in `translation()`, since an OpenAI worker takes /v1/responses as it comes. Raises
    TranslateError (answer 400)."""
    if not isinstance(body, dict):
        raise TranslateError("the request body must be a JSON object")
    return ResponsesOverChat(body, model)
