"""Checkpoint init / save / load and load-time validation."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfuse import ConfigError, ModalitySpec, init_checkpoint, load
from mmfuse.checkpoint import INDEX_FILE, PROJECTOR_FILE, read_config
from mmfuse.tiny import make_base


def test_init_layout(qwen3_ckpt, qwen3_base):
    cfg = read_config(qwen3_ckpt)
    assert cfg["architectures"] == ["MMFuseQwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["mmfuse"]["format_version"] == 1
    assert cfg["mmfuse"]["modalities"]["m1"]["hidden_dim"] == cfg["hidden_size"]  # resolved, not implicit
    assert cfg["vocab_size"] == read_config(qwen3_base)["vocab_size"]  # spare rows: no resize
    index = json.loads((qwen3_ckpt / INDEX_FILE).read_text())["weight_map"]
    assert index["mm_projectors.m1.0.weight"] == PROJECTOR_FILE
    assert index["model.embed_tokens.weight"] == "model.safetensors"
    assert all(k.startswith("mm_projectors.") for k in load_file(qwen3_ckpt / PROJECTOR_FILE))


def test_llama_base_gets_its_wrapper_architecture(llama_ckpt):
    assert read_config(llama_ckpt)["architectures"] == ["MMFuseLlamaForCausalLM"]


def test_save_then_load_is_bit_identical(qwen3_ckpt, tmp_path):
    a = load(qwen3_ckpt)
    with torch.no_grad():  # make the weights differ from the init so the test means something
        for p in a.mm_projectors.parameters():
            p.add_(torch.randn_like(p))
    a.save(tmp_path / "out")
    b = load(tmp_path / "out")
    sa, sb = a.mm_projectors.state_dict(), b.mm_projectors.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    from mmfuse.inputs import prepare
    p = prepare("x <|m1|> y <|sensor|>", {"m1": [torch.randn(32)], "m2": [torch.randn(2, 16)]}, a.specs)
    ids = torch.tensor([a.encode(p).expanded_ids])
    with torch.no_grad():
        assert torch.equal(a(ids, p.items).logits, b(ids, p.items).logits)


def test_projector_only_update_leaves_lm_file_alone(qwen3_ckpt, tmp_path):
    out = shutil.copytree(qwen3_ckpt, tmp_path / "ck")
    lm_file = out / "model.safetensors"
    before = (lm_file.stat().st_mtime_ns, lm_file.read_bytes())
    m = load(out)
    with torch.no_grad():
        m.mm_projectors["m1"][0].weight.zero_()
    m.save(out, lm_weights=False)
    assert (lm_file.stat().st_mtime_ns, lm_file.read_bytes()) == before
    assert load(out).mm_projectors["m1"][0].weight.abs().sum() == 0


def test_link_mode_and_resize_when_no_spare_rows(tmp_path):
    from transformers import AutoTokenizer
    tok_dir = make_base(tmp_path / "b0")
    n = len(AutoTokenizer.from_pretrained(tok_dir))
    base = make_base(tmp_path / "tight", tokenizer_dir=tok_dir, vocab=n)  # no spare embedding row
    out = init_checkpoint(base, tmp_path / "ck", [ModalitySpec("m1", 8)])
    assert read_config(out)["vocab_size"] >= n + 1
    m = load(out)
    assert m.placeholder_ids["m1"] < m.lm.get_input_embeddings().weight.shape[0]
    linked = init_checkpoint(tmp_path / "b0", tmp_path / "ln", [ModalitySpec("m1", 8)], link=True)
    assert (linked / "model.safetensors").is_symlink()
    load(linked)


def _copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "bad")


def test_missing_projector_weights(qwen3_ckpt, tmp_path):
    ck = _copy(qwen3_ckpt, tmp_path)
    state = load_file(ck / PROJECTOR_FILE)
    save_file({k: v for k, v in state.items() if not k.startswith("mm_projectors.m2")}, ck / PROJECTOR_FILE)
    with pytest.raises(ConfigError, match=r"projector weights missing: \['mm_projectors.m2.0.bias'"):
        load(ck)


def test_misshaped_projector_weights(qwen3_ckpt, tmp_path):
    ck = _copy(qwen3_ckpt, tmp_path)
    cfg = read_config(ck)
    cfg["mmfuse"]["modalities"]["m1"]["input_dim"] = 33
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"mm_projectors.m1.0.weight has shape \(128, 32\), the config implies \(128, 33\)"):
        load(ck)


def test_placeholder_missing_from_tokenizer(qwen3_ckpt, tmp_path):
    ck = _copy(qwen3_ckpt, tmp_path)
    cfg = read_config(ck)
    cfg["mmfuse"]["modalities"]["m1"]["placeholder"] = "<|nothere|>"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"modality 'm1': placeholder <\|nothere\|> is not a single special token"):
        load(ck)


def test_not_a_checkpoint_and_unsupported_base(qwen3_base, qwen3_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no 'mmfuse' section"):
        load(qwen3_base)
    with pytest.raises(ConfigError, match="already an mmfuse checkpoint"):
        init_checkpoint(qwen3_ckpt, tmp_path / "x", [ModalitySpec("a", 2)])
    with pytest.raises(ConfigError, match="neither a local directory nor a reachable hub model"):
        load("no-such-org/no-such-model")
