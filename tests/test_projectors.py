"""Projector kinds (linear, mlp{N}x_{act}, identity, resampler), growing a checkpoint, and vLLM parity.

One session checkpoint (``kinds_ckpt``, the tiny Qwen3 base) holds every kind as its own
modality; the one vLLM engine of this file runs on it.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import conftest  # shared test helpers (tests/ is on sys.path)
from mmfuse import ModalitySpec, SamplingConfig, init_checkpoint
from mmfuse.config import ConfigError, parse_modality_arg
from mmfuse.inputs import prepare, rows_of
from mmfuse.projectors import QuickGELU, build_projector, project_items, resolve_spec

H = 128  # the tiny bases' hidden size
KINDS = [  # one modality per kind
    ModalitySpec("m_lin", 24, "linear", tokens_per_item=2),
    ModalitySpec("m_mlp", 24),  # mlp2x_gelu, the default
    ModalitySpec("m_mlp3_silu", 24, "mlp3x_silu", hidden_dim=64),
    ModalitySpec("m_qg", 24, "mlp2x_quick_gelu", hidden_dim=48, tokens_per_item=2),
    ModalitySpec("m_id", H, "identity"),
    ModalitySpec("m_res", 24, "resampler", tokens_per_item=4, resampler_heads=4),
]
K = 4  # m_res tokens_per_item


def vecs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def kinds_ckpt(qwen3_base, tmp_path_factory):
    return init_checkpoint(qwen3_base, tmp_path_factory.mktemp("kinds_ckpt"),
                           [ModalitySpec(**vars(s)) for s in KINDS], seed=5)


@pytest.fixture(scope="session")
def kinds_model(kinds_ckpt):
    from mmfuse import load
    return load(kinds_ckpt)


# ---------------------------------------------------------------- the registry, without an LM

def test_kinds_shapes_and_weight_names():
    def built(*args, **kw):
        spec = ModalitySpec("a", *args, **kw)
        return resolve_spec(spec, 16), build_projector(spec, 16)

    _, mlp = built(8, hidden_dim=32)
    assert sorted(mlp.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # LLaVA's names, unchanged
    assert isinstance(mlp[1], torch.nn.GELU) and mlp[0].out_features == 32
    spec, mlp4 = built(8, "mlp4x_tanh")
    assert spec.hidden_dim == 16 and [type(m).__name__ for m in mlp4] == \
        ["Linear", "Tanh", "Linear", "Tanh", "Linear", "Tanh", "Linear"]
    _, lin = built(8, "linear", tokens_per_item=3)
    _, ident = built(16, "identity")
    assert list(ident.state_dict()) == []
    x = torch.randn(5, 16)
    assert torch.equal(project_items(ident, [x])[0], x)
    assert [tuple(r.shape) for r in project_items(lin, [torch.randn(2, 8), torch.randn(1, 8)])] == [(6, 16), (3, 16)]
    for act in ("gelu", "silu", "relu", "tanh", "quick_gelu"):
        _, p = built(8, f"mlp3x_{act}", tokens_per_item=2)
        assert p(torch.randn(5, 8)).shape == (10, 16)
    x = torch.randn(7)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_rows_of_one_vector_are_contiguous():
    p = build_projector(ModalitySpec("a", 4, "linear", tokens_per_item=2), lm_hidden=3)
    x = torch.randn(2, 4)
    full = p[0](x)  # [2, 2*3]
    rows = p(x)     # [4, 3]
    assert torch.equal(rows[0:2].flatten(), full[0]) and torch.equal(rows[2:4].flatten(), full[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(projector="mlp1x_gelu"), "N >= 2"),
    (dict(projector="mlp2x_swish"), "is not one of"),
    (dict(projector="mlp"), "is not one of"),
    (dict(projector="identity", tokens_per_item=2), "tokens_per_item must be 1"),
    (dict(projector="linear", resampler_layers=2), "resampler_layers must be"),
    (dict(projector="resampler", resampler_heads=0), "resampler_heads must be"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModalitySpec("a", 8, **kwargs)


def test_specs_checked_against_the_lm():
    with pytest.raises(ConfigError, match="input_dim equal to the LM hidden size 16, got 8"):
        resolve_spec(ModalitySpec("a", 8, "identity"), 16)
    with pytest.raises(ConfigError, match="divisible by resampler_heads=3"):
        resolve_spec(ModalitySpec("a", 8, "resampler", resampler_heads=3), 16)
    spec = resolve_spec(ModalitySpec("a", 8, "resampler", tokens_per_item=2), 16)
    assert spec.to_dict() == {"input_dim": 8, "projector": "resampler", "hidden_dim": 16, "tokens_per_item": 2,
                                   "placeholder": "<|a|>", "max_items": 16, "resampler_layers": 2,
                                   "resampler_heads": 8}
    assert "resampler_layers" not in ModalitySpec("b", 8).to_dict()  # other kinds' config is unchanged
    assert parse_modality_arg("audio:512:resampler,tokens=4,layers=1,heads=4") == ModalitySpec(
        "audio", 512, "resampler", tokens_per_item=4, resampler_layers=1, resampler_heads=4)


def _resampler(n_layers=2, k=3, dim=32, d=12, seed=0):
    torch.manual_seed(seed)
    spec = ModalitySpec("r", d, "resampler", tokens_per_item=k, hidden_dim=dim, resampler_layers=n_layers,
                        resampler_heads=4)
    return spec, build_projector(spec, 16).eval()


@torch.no_grad()
def test_resampler_maps_any_n_to_k_rows_and_a_batch_equals_each_alone():
    spec, p = _resampler()
    items = [vecs(1, 1, 12), vecs(2, 7, 12), vecs(3, 300, 12)]
    alone = [project_items(p, [x])[0] for x in items]
    together = project_items(p, items)  # padded to 300 rows, padding keys masked
    assert [tuple(r.shape) for r in together] == [(3, 16)] * 3
    assert [rows_of(spec, x) for x in items] == [3, 3, 3]
    for a, b in zip(alone, together):
        assert (a - b).abs().max() < 1e-5
    # order matters (positions), and each item's output depends on its rows only
    assert (project_items(p, [items[1].flip(0)])[0] - alone[1]).abs().max() > 1e-4
    assert not torch.equal(alone[0], alone[1])


# ---------------------------------------------------------------- in an LM: round trip, fused forward

def _sinusoids(n: int, dim: int) -> torch.Tensor:
    pe = np.zeros((n, dim))
    for pos in range(n):
        for i in range(0, dim, 2):
            angle = pos / 10000 ** (i / dim)
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return torch.tensor(pe, dtype=torch.float32)


def manual_resampler(p, x: torch.Tensor) -> torch.Tensor:
    """The resampler from its raw weights, one item, no padding: [n, d] -> [K, H]."""
    dim = p.queries.shape[1]
    ln = lambda t, m: F.layer_norm(t, (dim,), m.weight, m.bias)  # noqa: E731
    h = F.linear(x, p.proj_in.weight, p.proj_in.bias) + _sinusoids(x.shape[0], dim)
    q = p.queries
    for b in p.blocks:
        heads = b.heads
        query = F.linear(ln(q, b.norm_q), b.q.weight, b.q.bias)
        key, value = F.linear(ln(h, b.norm_kv), b.kv.weight, b.kv.bias).chunk(2, -1)
        split = lambda t: t.reshape(t.shape[0], heads, -1).transpose(0, 1)  # noqa: E731  [heads, rows, D/h]
        attn = torch.softmax(split(query) @ split(key).transpose(1, 2) / math.sqrt(dim // heads), -1)
        q = q + F.linear((attn @ split(value)).transpose(0, 1).reshape(q.shape[0], dim), b.o.weight, b.o.bias)
        f = F.linear(F.gelu(F.linear(ln(q, b.norm_ff), b.ff[0].weight, b.ff[0].bias)), b.ff[2].weight, b.ff[2].bias)
        q = q + f
    return F.linear(ln(q, p.norm_out), p.proj_out.weight, p.proj_out.bias)


def manual_rows(model, name: str, x: torch.Tensor) -> torch.Tensor:
    """One item's rows from the raw weights, per kind."""
    proj, spec = model.mm_projectors[name], model.specs[name]
    if spec.projector == "identity":
        return x
    if spec.projector == "resampler":
        return manual_resampler(proj, x)
    act = {"linear": None, "mlp2x_gelu": F.gelu, "mlp3x_silu": F.silu,
           "mlp2x_quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[spec.projector]
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = F.linear(x, lin.weight, lin.bias)
        x = act(x) if i < len(linears) - 1 else x
    return x.reshape(-1, H)


def manual_embeds(model, token_ids, items) -> torch.Tensor:
    return conftest.manual_embeds(model, token_ids, items, manual_rows)


# every kind alone, all together, (n, d) items, and a resampler over items of different n
CASES = [
    ("lin <|m_lin|> end", {"m_lin": [vecs(1, 2, 24)]}),
    ("mlp <|m_mlp|> end", {"m_mlp": [vecs(2, 3, 24)]}),
    ("silu <|m_mlp3_silu|> end", {"m_mlp3_silu": [vecs(3, 24)]}),
    ("quick <|m_qg|> end", {"m_qg": [vecs(4, 2, 24)]}),
    ("identity <|m_id|> end", {"m_id": [vecs(5, 2, H)]}),
    ("res <|m_res|> end", {"m_res": [vecs(6, 5, 24)]}),
    ("res n=1 <|m_res|> n=7 <|m_res|> n=3 <|m_res|>", {"m_res": [vecs(7, 1, 24), vecs(8, 7, 24), vecs(9, 3, 24)]}),
    ("all <|m_lin|> <|m_mlp|> <|m_mlp3_silu|> <|m_qg|> <|m_id|> <|m_res|> done",
     {"m_lin": [vecs(10, 24)], "m_mlp": [vecs(11, 24)], "m_mlp3_silu": [vecs(12, 2, 24)], "m_qg": [vecs(13, 24)],
      "m_id": [vecs(14, H)], "m_res": [vecs(15, 6, 24)]}),
]


@pytest.mark.parametrize("text, items", CASES, ids=[c[0].split()[0] + str(i) for i, c in enumerate(CASES)])
@torch.no_grad()
def test_fused_forward_equals_hand_built_inputs_embeds(kinds_model, text, items):
    model = kinds_model
    p = prepare(text, items, model.specs)
    encoded = model.encode(p)
    fused = model(torch.tensor([encoded.expanded_ids]), p.items).logits
    ref = model.lm(inputs_embeds=manual_embeds(model, encoded.token_ids, p.items)).logits
    assert fused.shape == ref.shape
    assert (fused - ref).abs().max().item() < 1e-5


@torch.no_grad()
def test_save_load_round_trip_is_bit_identical(kinds_ckpt, kinds_model, tmp_path):
    from mmfuse import load

    stored = load_file(str(kinds_ckpt / "mm_projectors.safetensors"))
    state = kinds_model.mm_projectors.state_dict()
    assert {"mm_projectors." + k for k in state} == set(stored)
    assert all(torch.equal(stored["mm_projectors." + k], v) for k, v in state.items())
    kinds_model.save(tmp_path / "again")
    again = load(tmp_path / "again")
    assert again.specs == kinds_model.specs
    for k, v in again.mm_projectors.state_dict().items():
        assert torch.equal(v, state[k]), k
    text, items = CASES[-1]
    p = prepare(text, items, again.specs)
    ids = torch.tensor([again.encode(p).expanded_ids])
    assert torch.equal(again(ids, p.items).logits, kinds_model(ids, p.items).logits)


@torch.no_grad()
def test_resampler_prompt_length_is_k_per_item_whatever_n(kinds_model):
    lengths = []
    for n in (1, 7, 300):
        p = prepare("see <|m_res|> now", {"m_res": [vecs(n, n, 24)]}, kinds_model.specs)
        enc = kinds_model.encode(p)
        assert enc.expanded_ids.count(kinds_model.placeholder_ids["m_res"]) == K
        assert kinds_model(torch.tensor([enc.expanded_ids]), p.items).logits.shape[1] == enc.num_tokens
        lengths.append(enc.num_tokens)
    assert len(set(lengths)) == 1


def test_hf_batch_mixing_resampler_items_of_different_n_equals_each_alone(kinds_model):
    from mmfuse.backends.hf import generate

    sampling = SamplingConfig(max_tokens=8, logprobs=True)
    reqs = [("a <|m_res|>", {"m_res": [vecs(60, 1, 24)]}),
            ("b <|m_res|> and <|m_mlp|>", {"m_res": [vecs(61, 300, 24)], "m_mlp": [vecs(62, 24)]}),
            ("c <|m_res|>", {"m_res": [vecs(63, 7, 24)]})]
    prompts = [kinds_model.encode(prepare(t, e, kinds_model.specs)) for t, e in reqs]
    for p, together in zip(prompts, generate(kinds_model, prompts, sampling)):
        alone = generate(kinds_model, [p], sampling)[0][0]
        assert together[0].token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(together[0].logprobs, alone.logprobs)) < 1e-4


# ---------------------------------------------------------------- growing a trained checkpoint

def _digits_rows(n: int, seed: int) -> list[dict]:
    """The new modality's task: a noisy 20-d prototype of one of four classes -> its word."""
    from test_data import WORDS  # tests/ is on sys.path under pytest

    protos = np.random.default_rng(77).normal(size=(4, 20))
    rng = np.random.default_rng(seed)
    return [{"prompt": "hear <|audio|> :", "response": WORDS[c],
             "items": {"audio": [protos[c] + 0.1 * rng.normal(size=20)]}} for c in rng.integers(0, 4, size=n)]


@torch.no_grad()
def _old_logits(path) -> torch.Tensor:
    from mmfuse import load

    model = load(path)
    p = prepare("a <|m1|> b <|sensor|> c", {"m1": [vecs(40, 2, 32)], "m2": [vecs(41, 16)]}, model.specs)
    return model(torch.tensor([model.encode(p).expanded_ids]), p.items).logits


def test_add_modality_then_train_it_alone(qwen3_ckpt, tmp_path):
    from mmfuse.cli import main
    from mmfuse.training import EvalConfig, TrainConfig, evaluate, train, write_parquet

    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt, ckpt)
    before = {f.name: load_file(str(f)) for f in ckpt.glob("*.safetensors")}
    logits = _old_logits(ckpt)
    assert main(["add-modality", str(ckpt), "--modality", "audio:20:mlp2x_gelu,tokens=2"]) == 0
    assert main(["add-modality", str(ckpt), "--modality", "audio:20"]) == 2  # already there: refused
    after = {f.name: load_file(str(f)) for f in ckpt.glob("*.safetensors")}
    for name, tensors in before.items():  # every existing tensor bit-identical
        assert all(torch.equal(after[name][k], v) for k, v in tensors.items()), name
    assert sorted(set(after["mm_projectors.safetensors"]) - set(before["mm_projectors.safetensors"])) == \
        ["mm_projectors.audio.0.bias", "mm_projectors.audio.0.weight", "mm_projectors.audio.2.bias",
         "mm_projectors.audio.2.weight"]
    assert torch.equal(_old_logits(ckpt), logits)

    write_parquet(_digits_rows(128, 0), tmp_path / "train.parquet")
    write_parquet(_digits_rows(32, 1), tmp_path / "eval.parquet")
    untrained = evaluate(ckpt, tmp_path / "eval.parquet", EvalConfig(backend="hf", loss=False))
    result = train(TrainConfig(ckpt=str(ckpt), data=str(tmp_path / "train.parquet"), out=str(tmp_path / "out"),
                               stage=1, train_modalities=["audio"], max_steps=60, batch_size=16, lr=3e-3,
                               warmup=0.1, shuffle=True))
    trained = evaluate(result.out, tmp_path / "eval.parquet", EvalConfig(backend="hf", loss=False))
    assert untrained["exact_match"] <= 0.1 and trained["exact_match"] >= 0.9, (untrained, trained)
    new, old = load_file(str(result.out / "mm_projectors.safetensors")), after["mm_projectors.safetensors"]
    assert all(torch.equal(new[k], v) for k, v in old.items() if not k.startswith("mm_projectors.audio."))
    assert not torch.equal(new["mm_projectors.audio.2.weight"], old["mm_projectors.audio.2.weight"])
    assert torch.equal(_old_logits(result.out), logits)  # old modalities: bitwise the same outputs
    with pytest.raises(ValueError, match="train_modalities"):
        train(TrainConfig(ckpt=str(ckpt), data=str(tmp_path / "train.parquet"), out=str(tmp_path / "o2"),
                          train_modalities=["nope"], max_steps=1))


# ---------------------------------------------------------------- vLLM: the one engine of this file

@pytest.mark.vllm
def test_vllm_greedy_parity_for_every_kind(kinds_ckpt, kinds_model):
    """Every kind through one engine, all prompts submitted together (the resampler sees a batch of
    items of different n), against transformers one prompt at a time."""
    pytest.importorskip("vllm")
    from mmfuse.backends.hf import generate as hf_generate
    from mmfuse.backends.vllm import VLLMBackend, to_completion

    sampling = SamplingConfig(max_tokens=16, logprobs=True)
    cases = CASES + [("big <|m_res|> end", {"m_res": [vecs(50, 300, 24)]})]
    backend = VLLMBackend(kinds_ckpt, max_model_len=256)
    try:
        prompts = [backend.encode(prepare(t, e, backend.specs)) for t, e in cases]
        assert backend.llm.reset_prefix_cache()
        outs = backend.generate_outputs(prompts, sampling)
        for (text, _), p, o in zip(cases, prompts, outs):
            ref = hf_generate(kinds_model, [kinds_model.encode(prepare(text, p.items, kinds_model.specs))],
                              sampling)[0][0]
            got = to_completion(o.outputs[0], backend.tokenizer, sampling)
            assert len(o.prompt_token_ids) == p.num_tokens, text  # K rows per resampler item in vLLM too
            assert got.token_ids == ref.token_ids, text
            diff = max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs))
            assert diff < 1e-4, f"{text!r}: logprob difference {diff}"
        assert outs[-1].prompt_token_ids.count(backend.checkpoint.placeholder_ids["m_res"]) == K
    finally:
        backend.close()
