"""A ``messages`` row (chat, OpenAI style) -> token ids with loss on the assistant turns.

The conversation goes through the pipeline's and server's own chat rendering
(``chat.render_messages``, the tokenizer's chat template, then ``inputs.prepare``
and the checkpoint's tokenization), so the ids before an assistant answer are
exactly what ``MultimodalPipeline`` renders for the conversation up to that
answer with ``add_generation_prompt``. For assistant turn k:

- ``P_k``: the tokens of messages[:k] with the generation prompt (what the pipeline feeds the model);
- ``F_k``: the tokens of messages[:k+1] without it;

both must be prefixes of the whole conversation's tokens (a template that renders
earlier turns differently once later ones follow, e.g. one that drops old
reasoning, is refused: split such a conversation into one row per answer). The
labelled span of turn k is ``F_k`` minus ``P_k``, without trailing whitespace
tokens (the template's separator between turns, which generation never produces:
it stops at the end-of-turn token). ``loss_on="all"`` labels every token but the
soft tokens of items.

Content is a string or a list of parts: ``{"type": "text", "text"}``,
``{"type": "input_embedding", "modality", "embedding"}`` (the wire format:
``{dtype, shape, data}`` base64, or nested lists) and, for a modality with an
encoder, ``image_url`` (a ``data:`` URL) and ``input_audio`` parts routed as the
server routes them (``server.parts``). Items sit in non-assistant turns only.
The column holds a JSON string per row (``write_parquet`` writes that) or
native structs (parts' null fields are ignored). mm_NAME columns may add items
for placeholders written in the text, as ``multimodal_embeddings`` does at inference.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from ..chat import ChatOptions, render_messages
from ..inputs import InputError, encode_token_ids, prepare, rows_of, tokenize
from ..server.wire import decode_embedding
from .encode import IGNORE, UNBOUNDED, Example

MEDIA_PARTS = ("image_url", "input_audio")


def conversation(value: object) -> list[dict]:
    """The column's value as a list of ``{"role", "content"}`` dicts (JSON text parsed, null fields dropped)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InputError(f"column 'messages': not valid JSON ({e})", "messages") from None
    if not isinstance(value, list) or not value:
        raise InputError(f"column 'messages': expected a non-empty list of messages, got "
                         f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}", "messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise InputError(f"messages[{i}]: expected an object with 'role' and 'content', got "
                             f"{type(msg).__name__}", "messages")
        content = msg.get("content")
        if isinstance(content, list):  # parquet structs give every part every field, null where unused
            content = [{k: v for k, v in p.items() if v is not None} if isinstance(p, Mapping) else p
                       for p in content]
            for j, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") == "input_embedding" and \
                        isinstance(part.get("embedding"), (dict, list)):
                    part["embedding"] = decode_embedding(f"messages[{i}].content[{j}].embedding", part["embedding"])
        out.append({"role": msg.get("role"), "content": content})
    return out


def to_json(messages: list) -> str:
    """A conversation as the column's JSON text; arrays and tensors in ``embedding`` fields become the wire
    format's ``{dtype, shape, data}`` (float32, exact and compact). JSON text stays as it is."""
    if isinstance(messages, str):
        return messages
    import base64

    import numpy as np

    def default(value):
        arr = np.ascontiguousarray(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value,
                                              dtype=np.float32))
        return {"dtype": "float32", "shape": list(arr.shape), "data": base64.b64encode(arr.astype("<f4").tobytes())
                .decode("ascii")}
    return json.dumps(messages, default=default)


def _media_items(messages: list[dict], specs) -> list[dict]:
    """image_url / input_audio parts -> input_embedding parts holding the decoded medium, routed and
    decoded by the server's own code (a ``data:`` URL only: training data never reaches the network)."""
    if not any(isinstance(p, Mapping) and p.get("type") in MEDIA_PARTS
               for m in messages if isinstance(m["content"], list) for p in m["content"]):
        return messages
    from pydantic import ValidationError

    from ..media import MediaLimits
    from ..server import parts, protocol

    media = parts.modality_media(specs)
    for i, m in enumerate(messages):
        if not isinstance(m["content"], list):
            continue
        for j, part in enumerate(m["content"]):
            if not (isinstance(part, Mapping) and part.get("type") in MEDIA_PARTS):
                continue
            where = f"messages[{i}].content[{j}]"
            model = protocol.ImagePart if part["type"] == "image_url" else protocol.AudioPart
            try:
                typed = model.model_validate(part)
            except ValidationError as e:
                raise InputError(f"{where}: not a valid {part['type']} part ({e.errors()[0]['msg']})",
                                 "messages") from None
            name = parts.route(where, typed, media)
            medium = parts.load(where, typed, MediaLimits())  # a PIL image or a 16 kHz waveform
            m["content"][j] = {"type": "input_embedding", "modality": name, "embedding": medium}
    return messages


def _check_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant turns; the conversation must end with one, and none may hold items."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant or assistant[-1] != len(messages) - 1:
        raise InputError("messages: the last message must be an assistant turn (the answer to learn), got "
                         f"role {messages[-1]['role']!r}", "messages")
    if assistant[0] == 0:
        raise InputError("messages[0]: an assistant turn needs a message before it to answer", "messages")
    for i in assistant:
        content = messages[i]["content"]
        if isinstance(content, list) and any(not isinstance(p, Mapping) or p.get("type") != "text" for p in content):
            raise InputError(f"messages[{i}]: an assistant turn holds text only (items go in the turns before "
                             f"it)", "messages")
    return assistant


def _answer_text(content: object) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content)
    return content or ""


def encode_chat(encoder, row: Mapping, index: int) -> Example:
    """One ``messages`` row as an ``Example`` (``encoder``: the ``RowEncoder``); errors are ``InputError``
    naming the message and part, which ``RowEncoder.encode`` prefixes with the row."""
    tok, specs = encoder.tokenizer, encoder.specs
    messages = _media_items(conversation(row.get("messages")), specs)
    for i, m in enumerate(messages):
        if not isinstance(m["role"], str):
            raise InputError(f"messages[{i}]: expected an object with a string 'role'", "messages")
    assistant = _check_turns(messages)
    extra = encoder.items_of(row) or None

    def render(msgs: list[dict], generation_prompt: bool):
        return render_messages(msgs, tok, specs, extra, options=ChatOptions(add_generation_prompt=generation_prompt))

    text, items = render(messages, False)
    prepared = prepare(text, items, specs)
    full = encode_token_ids(tokenize(tok, text), prepared.items, specs, encoder.placeholder_ids, UNBOUNDED,
                            encoder.checkpoint.bos_token_id)
    starts = _starts(full.token_ids, prepared.items, specs, encoder.placeholder_ids)
    labels = [IGNORE] * len(full.expanded_ids)
    soft_ids = set(encoder.placeholder_ids.values())
    if encoder.loss_on == "all":
        labels = [IGNORE if t in soft_ids else t for t in full.expanded_ids]
    prompt_ids: list[int] = []
    for k in assistant:
        prompt_ids = _prefix(tok, render(messages[:k], True)[0], full.token_ids, k, "with the generation prompt")
        turn_ids = _prefix(tok, render(messages[:k + 1], False)[0], full.token_ids, k, "as one turn")
        end = len(turn_ids)
        while end > len(prompt_ids) and tok.decode([turn_ids[end - 1]]).strip() == "" and \
                turn_ids[end - 1] not in tok.all_special_ids:
            end -= 1
        if end <= len(prompt_ids):
            raise InputError(f"messages[{k}]: the assistant turn renders to no tokens", "messages")
        a, b = starts[len(prompt_ids)], starts[end]
        labels[a:b] = full.expanded_ids[a:b]
    # the last answer's prompt is what a backend generates from (eval's exact match); items all lie before it
    prompt = encode_token_ids(prompt_ids, prepared.items, specs, encoder.placeholder_ids, UNBOUNDED,
                              encoder.checkpoint.bos_token_id)
    return Example(row=index, input_ids=full.expanded_ids, labels=labels, prompt=prompt,
                   response=_answer_text(messages[-1]["content"]))


def _starts(token_ids: list[int], items, specs, placeholder_ids) -> list[int]:
    """Where each token (one id per item) begins among the expanded ids (an item spans its soft tokens),
    plus the end: ``starts[i]:starts[i + 1]`` are token i's positions."""
    soft = {pid: name for name, pid in placeholder_ids.items()}
    seen = {n: 0 for n in specs}
    starts, pos = [], 0
    for t in token_ids:
        starts.append(pos)
        if t in soft:
            name = soft[t]
            pos += rows_of(specs[name], items[name][seen[name]])
            seen[name] += 1
        else:
            pos += 1
    return starts + [pos]


def _prefix(tok, text: str, full_ids: list[int], k: int, how: str) -> list[int]:
    ids = tokenize(tok, text)
    if full_ids[:len(ids)] != ids:
        raise InputError(f"messages[{k}]: the chat template renders the conversation up to this turn ({how}) "
                         f"differently from the start of the whole conversation, so its prompt at inference would "
                         f"differ from training's; give one row per assistant answer", "messages")
    return ids
