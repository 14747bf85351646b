"""Chat templates (gRPC mode): OpenAI messages normalized as vLLM does, rendered with
Hugging Face's jinja semantics."""

from smg.chat.messages import normalize_messages, normalize_tools
from smg.chat.template import (
    ChatTemplate,
    TemplateError,
    detect_content_format,
    load_template_file,
    select_template,
)

__all__ = [
    "ChatTemplate",
    "TemplateError",
    "detect_content_format",
    "load_template_file",
    "normalize_messages",
    "normalize_tools",
    "select_template",
]
