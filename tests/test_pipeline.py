"""MultimodalPipeline (hf backend) and the original sketch's API."""
import numpy as np
import pytest
import torch

from mmfuse import InputError, MultimodalPipeline


@pytest.fixture(scope="module")
def pipe(qwen3_ckpt):
    return MultimodalPipeline(qwen3_ckpt, backend="hf")


def test_single_in_str_out_list_in_list_out(pipe):
    req = {"text": "Compare <|m1|> with <|m1|>.",
           "multimodal_data": {"multimodal_embeddings": {"m1": [np.ones(32), np.zeros(32)]}}}
    one = pipe.generate(req, max_tokens=8)
    assert isinstance(one, str)
    assert pipe.generate([req, req], max_new_tokens=8) == [one, one]
    assert len(pipe.generate(req, max_tokens=8, temperature=0.8, seed=1, n=2)) == 2
    assert pipe.generate(req, max_tokens=8, n=3) == [one] * 3  # greedy n: copies of the greedy answer


def test_messages_with_embedding_parts_equal_text_with_placeholders(pipe):
    v = torch.randn(32)
    parts = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is "},
        {"type": "input_embedding", "modality": "m1", "embedding": v},
        {"type": "text", "text": "?"}]}]}
    rendered = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "What is <|m1|>?"}],
                                                  tokenize=False, add_generation_prompt=True)
    # a prompt rendered by the chat template carries its special tokens on purpose
    text = {"text": rendered, "multimodal_data": {"multimodal_embeddings": {"m1": [v]}}, "allow_special_tokens": True}
    assert pipe.prepare(parts).text == rendered
    assert pipe.generate(parts, max_tokens=10) == pipe.generate(text, max_tokens=10)
    # plain-string messages + separate items: items go to the start of the first user message
    sep = {"messages": [{"role": "user", "content": "What?"}],
           "multimodal_data": {"multimodal_embeddings": {"m1": v}}}
    assert "<|im_start|>user\n<|m1|>What?" in pipe.prepare(sep).text


def test_bad_requests_name_the_field(pipe):
    with pytest.raises(InputError, match="modality 'm1' item 0: wrong last dimension"):
        pipe.generate({"text": "<|m1|>", "multimodal_data": {"multimodal_embeddings": {"m1": [np.ones(3)]}}})
    with pytest.raises(InputError, match=r"messages\[0\].content\[0\].type"):
        pipe.generate({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    with pytest.raises(InputError, match="'text' or a 'messages'"):
        pipe.generate({"prompt": "x"})


@pytest.mark.parametrize("fields, needle", [
    ({"presence_penalty": 3.0}, r"presence_penalty: expected a number in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty: expected a number in \[0.01, 2\]"),
    ({"frequency_penalty": "1"}, "frequency_penalty: expected a number, got str"),
    ({"min_p": True}, "min_p: expected a number, got bool"),
    ({"min_tokens": 9, "max_tokens": 8}, r"min_tokens: expected an integer in \[0, 8\]"),
    ({"logit_bias": {5: 200}}, r"logit_bias\[5\]: expected a bias in \[-100, 100\]"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias.*expected an integer, got str"),
    ({"logit_bias": {10**6: 1.0}}, "outside the model's vocabulary"),
    ({"stop_token_ids": [1, -1]}, r"stop_token_ids\[1\]: expected an integer in"),
    ({"top_logprobs": 3}, "top_logprobs: needs logprobs=True"),
    ({"logprobs": True, "top_logprobs": 21}, r"top_logprobs: expected an integer in \[0, 20\]"),
    ({"best_of": 2}, "best_of: not a sampling option"),
])
def test_bad_sampling_fields_name_the_field(pipe, fields, needle):
    with pytest.raises(InputError, match=needle):
        pipe.generate({"text": "hi"}, **fields)


@pytest.mark.vllm  # backend "auto": a vLLM engine per pipeline when vllm is installed
def test_original_sketch_basic_example_through_both_import_names(qwen3_base, tmp_path, monkeypatch):
    """The sketch's Basic Example with a local base LM: new projectors, real generation."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path))
    import mmfuse
    import multimodal_qwen3
    from multimodal_qwen3 import MultimodalQwen3Pipeline

    assert MultimodalQwen3Pipeline is mmfuse.MultimodalQwen3Pipeline
    configs = {"m1": {"input_dim": 768, "hidden_dim": 4096}, "m2": {"input_dim": 512, "hidden_dim": 4096}}
    input_data = {"text": "Compare these: ",
                  "multimodal_data": {"multimodal_embeddings": {"m1": torch.randn(768), "m2": torch.randn(512)}}}
    outs = []
    for cls in (multimodal_qwen3.MultimodalQwen3Pipeline, mmfuse.MultimodalQwen3Pipeline):
        pipeline = cls(model_name=str(qwen3_base), modality_configs=configs, device="cpu")
        outs.append(pipeline.generate(input_data, max_tokens=12))
        assert pipeline.specs["m1"].hidden_dim == 4096 and pipeline.specs["m2"].input_dim == 512
        pipeline.close()
    assert isinstance(outs[0], str) and outs[0] == outs[1]  # same cached checkpoint, greedy
    # the answer depends on the vectors, i.e. the projectors are really in the path
    other = dict(input_data, multimodal_data={"multimodal_embeddings": {"m1": torch.randn(768) * 5,
                                                                         "m2": torch.randn(512) * 5}})
    ref = MultimodalPipeline(next((tmp_path / "compat").iterdir()), backend="hf")
    assert ref.generate(input_data, max_tokens=12) == outs[0]
    assert ref.generate(other, max_tokens=12) != outs[0]
