"""Chat messages (OpenAI style) -> one prompt string with placeholders, plus items.

An ``input_embedding`` content part stands where its modality's placeholder
would; the rendered text then goes through the same rules as a plain prompt.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import ModalitySpec
from .inputs import InputError, is_single_item


def render_messages(messages: Sequence[Mapping], tokenizer, specs: Mapping[str, ModalitySpec],
                    embeddings: Mapping[str, object] | None = None) -> tuple[str, dict[str, list]]:
    """Apply the tokenizer's chat template; return (text, {modality: [raw items]}).

    Items come from ``input_embedding`` parts, or from ``embeddings`` when the
    messages carry placeholders as text (or none at all: then the items go at the
    start of the first user message). Mixing both sources is refused as ambiguous.
    """
    if not isinstance(messages, Sequence) or not messages:
        raise InputError("messages: expected a non-empty list of messages")
    items: dict[str, list] = {}
    flat: list[dict] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise InputError(f"messages[{i}]: expected an object with a string 'role'")
        flat.append({"role": msg["role"], "content": _flatten(i, msg.get("content"), specs, items)})
    if items and embeddings:
        raise InputError("multimodal_embeddings: give items either as input_embedding parts or separately, not both")
    if embeddings:
        items = {n: v for n, v in embeddings.items()}
        if not any(s.placeholder in m["content"] for m in flat for s in specs.values()):
            first_user = next((m for m in flat if m["role"] == "user"), flat[0])
            lead = "".join(specs[n].placeholder * _count(v) for n, v in items.items() if n in specs)
            first_user["content"] = lead + first_user["content"]
    text = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    return text, items


def _count(value: object) -> int:
    return 1 if is_single_item(value) else len(value or [])


def _flatten(i: int, content: object, specs: Mapping[str, ModalitySpec], items: dict[str, list]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise InputError(f"messages[{i}].content: expected a string or a list of parts")
    out = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InputError(f"{where}.text: expected a string")
            out.append(part["text"])
        elif kind == "input_embedding":
            name = part.get("modality")
            if name not in specs:
                raise InputError(f"{where}.modality: unknown modality {name!r}, this checkpoint has {sorted(specs)}")
            items.setdefault(name, []).append(part.get("embedding"))
            out.append(specs[name].placeholder)
        else:
            raise InputError(f"{where}.type: expected 'text' or 'input_embedding', got {kind!r}")
    return "".join(out)
