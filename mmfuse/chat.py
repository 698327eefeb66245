"""Chat messages (OpenAI style) -> one prompt string with placeholders, plus items.

An ``input_embedding`` content part stands where its modality's placeholder
would; the rendered text then goes through the same rules as a plain prompt.
Message text is user text (``inputs.user_text``): valid UTF-8 only, and its
special-token strings are marked so that they tokenize as plain text unless the
caller allows special tokens; the chat template's own special tokens stay special.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import ModalitySpec
from .inputs import InputError, as_list, check_text, item_list, user_text


def render_messages(messages: Sequence[Mapping], tokenizer, specs: Mapping[str, ModalitySpec],
                    embeddings: Mapping[str, object] | None = None,
                    allow_special_tokens: bool = False) -> tuple[str, dict[str, list]]:
    """Apply the tokenizer's chat template; return (text, {modality: [raw items]}).

    Items come from ``input_embedding`` parts, or from ``embeddings`` when the
    messages carry placeholders as text (or none at all: then the items go at the
    start of the first user message). Mixing both sources is refused as ambiguous.
    """
    listed = as_list(messages)
    if not listed:
        raise InputError("messages: expected a non-empty list of messages", "messages")
    if embeddings is not None and not isinstance(embeddings, Mapping):
        raise InputError(f"multimodal_embeddings: expected a mapping of modality name to items, got "
                         f"{type(embeddings).__name__}", "multimodal_embeddings")
    items: dict[str, list] = {}
    flat: list[dict] = []
    for i, msg in enumerate(listed):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise InputError(f"messages[{i}]: expected an object with a string 'role'", "messages")
        role = check_text(f"messages[{i}].role", msg["role"])
        content = _flatten(i, msg.get("content"), specs, items, tokenizer, allow_special_tokens)
        flat.append({"role": role, "content": content})
    if items and embeddings:
        raise InputError("multimodal_embeddings: give items either as input_embedding parts or separately, not both",
                         "multimodal_embeddings")
    if embeddings:
        items = {n: v for n, v in embeddings.items()}
        if not any(s.placeholder in m["content"] for m in flat for s in specs.values()):
            first_user = next((m for m in flat if m["role"] == "user"), flat[0])
            lead = "".join(specs[n].placeholder * len(item_list(n, v)) for n, v in items.items() if n in specs)
            first_user["content"] = lead + first_user["content"]
    try:
        text = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError (and what templates raise) is the caller's input
        raise InputError(f"messages: the chat template refused them: {e}", "messages") from None
    return text, items


def _flatten(i: int, content: object, specs: Mapping[str, ModalitySpec], items: dict[str, list], tokenizer,
             allow_special_tokens: bool) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return user_text(f"messages[{i}].content", content, tokenizer, specs, allow_special_tokens)
    parts = as_list(content)
    if parts is None:
        raise InputError(f"messages[{i}].content: expected a string or a list of parts", "messages")
    out = []
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            out.append(user_text(f"{where}.text", part.get("text"), tokenizer, specs, allow_special_tokens))
        elif kind == "input_embedding":
            name = part.get("modality")
            if not isinstance(name, str) or name not in specs:
                raise InputError(f"{where}.modality: unknown modality {name!r}, this checkpoint has {sorted(specs)}",
                                 "messages")
            items.setdefault(name, []).append(part.get("embedding"))
            out.append(specs[name].placeholder)
        else:
            raise InputError(f"{where}.type: expected 'text' or 'input_embedding', got {kind!r:.40}", "messages")
    return "".join(out)
