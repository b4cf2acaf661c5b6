"""Chat messages -> prompt text and token ids, through the model's (or --chat-template's) Jinja
template; shared by /v1/chat/completions, /api/chat, /api/generate and /tokenize.
"""
from __future__ import annotations

from jaxserve.server.validation import RequestError, get

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(message: dict, where: str, *, allow_images: bool = False) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"'{where}.content' must be a string or an array of content parts",
                           param=f"{where}.content", code="invalid_type")
    texts = []
    for j, part in enumerate(content):
        label = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"'{label}' must be an object", param=label, code="invalid_type")
        kind = part.get("type")
        if kind != "text":
            raise RequestError(f"'{label}.type' {kind!r} is not supported: this model takes text parts only",
                               param=f"{label}.type", code="unsupported_value")
        texts.append(get(part, "text", "str", required=True, nullable=False, where=f"{label}."))
    return "".join(texts)


def normalize_messages(messages, param: str = "messages") -> list[dict]:
    """Validated [{"role", "content"}] with text content, for the chat template."""
    if not isinstance(messages, list):
        raise RequestError(f"'{param}' must be an array of messages", param=param, code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{where}' must be an object", param=where, code="invalid_type")
        role = get(m, "role", "str", required=True, nullable=False, where=f"{where}.")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                               param=f"{where}.role", code="invalid_value")
        if m.get("images"):
            raise RequestError(f"'{where}.images': this model does not take images", param=f"{where}.images")
        if m.get("tool_calls"):
            raise RequestError(f"'{where}.tool_calls': tool calling is not supported yet",
                               param=f"{where}.tool_calls")
        out.append({"role": role, "content": message_text(m, where)})
    return out


def render_chat(tokenizer, messages: list[dict], chat_template: str | None, *,
                add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """The templated prompt and its token ids (the template writes any BOS itself)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; pass --chat-template or use /v1/completions",
                           param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template)
    except Exception as e:  # Jinja raises whatever the template's own checks raise
        raise RequestError(f"the chat template rejected these messages: {e}", param="messages") from None
    return text, tokenizer(text, add_special_tokens=False).input_ids
