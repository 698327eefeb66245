"""Chat messages (OpenAI style) -> one prompt string with placeholders, plus items.

An ``input_embedding`` content part stands where its modality's placeholder
would; the rendered text then goes through the same rules as a plain prompt.
Message text is user text (``inputs.user_text``): valid UTF-8 only, and its
special-token strings are marked so that they tokenize as plain text unless the
caller allows special tokens; the chat template's own special tokens stay special.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, ModalitySpec
from .inputs import InputError, as_list, check_text, item_list, user_text

# apply_chat_template's own arguments: chat_template_kwargs may not set them (each has its own field, or none)
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})
MAX_TEMPLATE_KWARGS = 32


@dataclass
class ChatOptions:
    """How messages become one prompt string.

    ``template``: a Jinja chat template (None: the tokenizer's own). ``template_kwargs``: extra variables
    for it (vLLM's ``chat_template_kwargs``, e.g. Qwen3's ``{"enable_thinking": False}``).
    ``add_generation_prompt``: end with the opening of the assistant's turn (None: unless
    ``continue_final_message``); ``continue_final_message``: leave the final message open instead, so
    the model continues it (e.g. a prefilled assistant answer). Not both (vLLM's rule).
    """

    template: str | None = None
    template_kwargs: Mapping[str, object] = field(default_factory=dict)
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False

    def __post_init__(self) -> None:
        if self.add_generation_prompt is None:
            self.add_generation_prompt = self.continue_final_message is not True
        for name in ("add_generation_prompt", "continue_final_message"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected true or false, got {type(getattr(self, name)).__name__}", name)
        if self.add_generation_prompt and self.continue_final_message:
            raise InputError("continue_final_message: cannot be combined with add_generation_prompt (set it to "
                             "false): the final message is either continued or followed by a new turn",
                             "continue_final_message")
        kwargs = self.template_kwargs
        if not isinstance(kwargs, Mapping):
            raise InputError(f"chat_template_kwargs: expected an object, got {type(kwargs).__name__}",
                             "chat_template_kwargs")
        if len(kwargs) > MAX_TEMPLATE_KWARGS:
            raise InputError(f"chat_template_kwargs: expected at most {MAX_TEMPLATE_KWARGS} keys, got {len(kwargs)}",
                             "chat_template_kwargs")
        for key in kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                raise InputError(f"chat_template_kwargs: key {key!r:.40} is not a template variable name",
                                 "chat_template_kwargs")
            if key in RESERVED_TEMPLATE_KWARGS:
                raise InputError(f"chat_template_kwargs.{key}: an argument of the template call itself, not a "
                                 f"template variable", "chat_template_kwargs")


def read_chat_template(value: str | os.PathLike, tokenizer) -> str:
    """A chat template given as a file path or as the template text itself, checked by rendering one message."""
    path = Path(value)
    text = path.read_text() if len(str(value)) < 4096 and path.is_file() else str(value)
    if "{{" not in text and "{%" not in text:
        raise ConfigError(f"chat template: {str(value)[:80]!r} is neither a file nor a Jinja template")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=text, tokenize=False,
                                      add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja's errors: the template is unusable
        raise ConfigError(f"chat template {str(value)[:80]!r} does not render: {e}") from None
    return text


def render_messages(messages: Sequence[Mapping], tokenizer, specs: Mapping[str, ModalitySpec],
                    embeddings: Mapping[str, object] | None = None,
                    allow_special_tokens: bool = False,
                    options: ChatOptions = ChatOptions()) -> tuple[str, dict[str, list]]:
    """Apply the chat template (``options``); return (text, {modality: [raw items]}).

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
        text = tokenizer.apply_chat_template(flat, chat_template=options.template, tokenize=False,
                                             add_generation_prompt=options.add_generation_prompt,
                                             continue_final_message=options.continue_final_message,
                                             **options.template_kwargs)
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
