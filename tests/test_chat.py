"""Chat rendering options (``mmfuse.chat.ChatOptions``): a custom chat template, its variables
(``chat_template_kwargs``), ``add_generation_prompt`` and ``continue_final_message``, through the
Python API and a transformers-backed server started with ``--chat-template``."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import KEY

from mmfuse import InputError
from mmfuse.bench.serve_load import start_server
from mmfuse.chat import read_chat_template
from mmfuse.config import ConfigError
from mmfuse.pipeline import MultimodalPipeline
from mmfuse.tiny import CHAT_TEMPLATE

# the tiny tokenizers' template plus Qwen3's switch: enable_thinking=false pre-fills an empty thought
THINKING = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
ITEM = np.random.default_rng(3).standard_normal(32).astype(np.float32)
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "what is "},
                                         {"type": "input_embedding", "modality": "m1", "embedding": ITEM}]}]
PREFILL = MESSAGES + [{"role": "assistant", "content": "it is a"}]


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "thinking.jinja"
    path.write_text(THINKING)
    return path


@pytest.fixture(scope="module")
def pipe(qwen3_ckpt, template_file):
    return MultimodalPipeline(qwen3_ckpt, backend="hf", chat_template=str(template_file))


def test_template_kwargs_reach_the_template(pipe):
    plain = pipe.prepare({"messages": MESSAGES}).text
    off = pipe.prepare({"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}}).text
    assert plain.endswith("<|m1|><|im_end|>\n<|im_start|>assistant\n")
    assert off == plain + "<think>\n\n</think>\n\n"
    assert pipe.generate({"messages": MESSAGES}, max_tokens=8) != pipe.generate(
        {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}}, max_tokens=8)


def test_generation_prompt_and_continuing_the_final_message(pipe):
    closed = pipe.prepare({"messages": MESSAGES, "add_generation_prompt": False}).text
    assert closed.endswith("<|m1|><|im_end|>\n")
    cont = pipe.prepare({"messages": PREFILL, "continue_final_message": True}).text
    assert cont.endswith("<|im_end|>\n<|im_start|>assistant\nit is a")  # open: no <|im_end|> after it
    as_text = {"text": cont, "allow_special_tokens": True,
               "multimodal_data": {"multimodal_embeddings": {"m1": [ITEM]}}}
    assert pipe.generate({"messages": PREFILL, "continue_final_message": True}, max_tokens=8) == pipe.generate(
        as_text, max_tokens=8)


@pytest.mark.parametrize("request_fields, needle", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message: cannot be combined"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs: key"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs: expected an object"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt: expected true or false"),
])
def test_bad_chat_options_name_the_field(pipe, request_fields, needle):
    with pytest.raises(InputError, match=needle):
        pipe.prepare({"messages": MESSAGES} | request_fields)


def test_a_chat_template_that_does_not_render_is_refused(pipe, tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"), pipe.tokenizer)
    with pytest.raises(ConfigError, match="does not render"):
        read_chat_template("{% for m in messages %}{{ m.content }", pipe.tokenizer)


@pytest.mark.server
def test_server_chat_template_option_and_fields(qwen3_ckpt, template_file, pipe, tmp_path):
    srv = start_server(qwen3_ckpt, "--backend", "hf", "--torch-threads", "1", "--served-model-name", "tiny",
                       "--chat-template", str(template_file), log=tmp_path / "server.log", api_key=KEY)
    try:
        wire = [{"role": "user", "content": [{"type": "text", "text": "what is "},
                                             {"type": "input_embedding", "modality": "m1", "embedding": ITEM.tolist()}]}]
        url, headers = f"{srv.url}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}

        def chat(**fields):
            r = httpx.post(url, headers=headers, timeout=60, json={"model": "tiny", "max_tokens": 8, "temperature": 0,
                                                                   "messages": wire} | fields)
            return r.status_code, r.json()

        for fields in ({}, {"chat_template_kwargs": {"enable_thinking": False}}, {"add_generation_prompt": False}):
            status, body = chat(**fields)
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == pipe.generate({"messages": MESSAGES} | fields,
                                                                             max_tokens=8)
        wire.append({"role": "assistant", "content": "it is a"})
        status, body = chat(continue_final_message=True)
        assert body["choices"][0]["message"]["content"] == pipe.generate(
            {"messages": PREFILL, "continue_final_message": True}, max_tokens=8)
        for fields, param in (({"continue_final_message": True, "add_generation_prompt": True},
                               "continue_final_message"),
                              ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
                              ({"chat_template": "{{ 1 }}"}, "chat_template")):
            status, body = chat(**fields)
            assert status == 400 and param in body["error"]["message"], body
    finally:
        assert srv.stop() == 0
