"""OpenAI chat client, Anthropic Messages worker (filled in below)."""

from __future__ import annotations

from typing import Any

from smg.translate.common import TranslateError


class ChatOverMessages:
    upstream_path = b"/v1/messages"

    def __init__(self, body: dict[str, Any], model: str | None) -> None:
        raise TranslateError("chat completions to an Anthropic-only worker: not yet translated")
