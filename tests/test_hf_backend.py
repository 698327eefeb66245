"""The transformers reference: fused forward, batching, sensitivity to the vectors."""
import pytest
import torch
import torch.nn.functional as F

import conftest  # shared test helpers (tests/ is on sys.path)
from mmfuse import InputError, SamplingConfig
from mmfuse.backends.hf import generate
from mmfuse.inputs import prepare

torch.manual_seed(0)
V1 = [torch.randn(32) for _ in range(4)]
V2 = [torch.randn(3, 16), torch.randn(16), torch.randn(2, 16)]


def manual_rows(model, name, item):
    """Project by hand from the raw weights: [n, d] -> [n * k, H]."""
    proj, spec = model.mm_projectors[name], model.specs[name]
    x = item.reshape(-1, spec.input_dim)
    if spec.projector == "linear":
        y = F.linear(x, proj[0].weight, proj[0].bias)
    else:
        y = F.linear(F.gelu(F.linear(x, proj[0].weight, proj[0].bias)), proj[2].weight, proj[2].bias)
    return y.reshape(x.shape[0] * spec.tokens_per_item, -1)


def manual_embeds(model, token_ids, items) -> torch.Tensor:
    return conftest.manual_embeds(model, token_ids, items, manual_rows)


CASES = [
    ("single vector", "hello <|m1|> world", {"m1": [V1[0]]}),
    ("(n, d) item", "look <|m1|> here", {"m1": [torch.stack(V1[:3])]}),
    ("tokens_per_item 2", "sensor <|sensor|> reading", {"m2": [V2[0]]}),
    ("two modalities", "a <|m1|> b <|sensor|> c <|m1|> d <|sensor|>", {"m1": V1[:2], "m2": V2[:2]}),
    ("no placeholder: items first", "describe these", {"m1": [V1[3]], "m2": [V2[2]]}),
]


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama", "mistral"])
@pytest.mark.parametrize("label, text, items", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_fused_forward_equals_hand_built_inputs_embeds(request, family, label, text, items):
    model = request.getfixturevalue(f"{family}_model")
    p = prepare(text, items, model.specs)
    encoded = model.encode(p)
    ids = torch.tensor([encoded.expanded_ids])
    fused = model(ids, p.items).logits
    ref = model.lm(inputs_embeds=manual_embeds(model, encoded.token_ids, p.items)).logits
    assert fused.shape == ref.shape
    assert (fused - ref).abs().max().item() < 1e-5
    if label.startswith("no placeholder"):
        pid = model.placeholder_ids
        assert encoded.token_ids[:2] == [pid["m1"], pid["m2"]]


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama", "mistral"])
def test_batch_with_different_item_counts_equals_each_alone(request, family):
    model = request.getfixturevalue(f"{family}_model")
    reqs = [("one <|m1|>", {"m1": [V1[0]]}),
            ("two <|m1|> and <|m1|> then <|sensor|>", {"m1": V1[1:3], "m2": [V2[0]]}),
            ("just text, a longer prompt than the others in this batch", None),
            ("", {"m2": [V2[1], V2[2]], "m1": [torch.stack(V1)]})]
    prompts = [prepare(t, e, model.specs) for t, e in reqs]
    sampling = SamplingConfig(max_tokens=12, logprobs=True)
    prompts = [model.encode(p) for p in prompts]
    together = generate(model, prompts, sampling)
    for p, batched in zip(prompts, together):
        alone = generate(model, [p], sampling)[0][0]
        assert batched[0].token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(batched[0].logprobs, alone.logprobs)) < 1e-4


@torch.no_grad()
def test_changing_one_vector_changes_logits(qwen3_model):
    m = qwen3_model
    a = prepare("compare <|m1|> with <|m1|>", {"m1": [V1[0], V1[1]]}, m.specs)
    b = prepare("compare <|m1|> with <|m1|>", {"m1": [V1[0], V1[1] + 0.5]}, m.specs)
    ids = torch.tensor([m.encode(a).expanded_ids])
    la, lb = m(ids, a.items).logits[0, -1], m(ids, b.items).logits[0, -1]
    assert (la - lb).abs().max().item() > 1e-3
    same = m(ids, prepare("compare <|m1|> with <|m1|>", {"m1": [V1[0], V1[1]]}, m.specs).items).logits[0, -1]
    assert torch.equal(la, same)


def test_sampling_seed_n_and_stop(qwen3_model):
    p = [qwen3_model.encode(prepare("<|m1|> tell me", {"m1": [V1[0]]}, qwen3_model.specs))]
    s = SamplingConfig(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, n=3)
    a, b = generate(qwen3_model, p, s)[0], generate(qwen3_model, p, s)[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and len(a) == 3
    assert len({tuple(c.token_ids) for c in a}) > 1  # n samples differ
    greedy = generate(qwen3_model, p, SamplingConfig(max_tokens=16))[0][0]
    stop = greedy.text[3:6]
    cut = generate(qwen3_model, p, SamplingConfig(max_tokens=16, stop=[stop]))[0][0]
    assert cut.text == greedy.text[:greedy.text.find(stop)] and cut.finish_reason == "stop"


def test_prompt_too_long_is_an_input_error(qwen3_model):
    p = prepare("x", {"m1": [torch.randn(16, 32)] * 16}, qwen3_model.specs)
    p.text = p.text + " word" * 900
    with pytest.raises(InputError, match=r"prompt too long: .*'m1': 256.*at most 1024"):
        qwen3_model.encode(p)


@pytest.mark.parametrize("family, arch", [("qwen3", "Qwen3"), ("qwen2", "Qwen2"), ("llama", "Llama"),
                                          ("mistral", "Mistral")])
def test_each_family_checkpoint_is_that_architecture_with_a_real_eos_row(request, family, arch):
    """The tiny bases are what their names say (Qwen2 with q/k/v biases), and EOS has a row of its own, not the (zeroed) pad row."""
    model = request.getfixturevalue(f"{family}_model")
    assert type(model.lm).__name__ == f"{arch}ForCausalLM"
    assert model.checkpoint.config["architectures"] == [f"MMFuse{arch}ForCausalLM"]
    assert (model.lm.model.layers[0].self_attn.q_proj.bias is not None) == (family == "qwen2")
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    assert eos != 0 and pad != eos and model.checkpoint.eos_token_ids == {eos}
    assert model.lm.get_output_embeddings().weight[eos].abs().sum() > 0  # EOS can win a greedy step
