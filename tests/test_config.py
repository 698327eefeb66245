"""Modality specs and the mmfuse config section."""
import pytest

from mmfuse import ConfigError, MMFuseConfig, ModalitySpec
from mmfuse.config import parse_modality_arg


def test_defaults_and_round_trip():
    s = ModalitySpec("vision", 768)
    assert (s.projector, s.tokens_per_item, s.placeholder, s.max_items) == ("mlp2x_gelu", 1, "<|vision|>", 16)
    cfg = MMFuseConfig({"vision": s, "audio": ModalitySpec("audio", 128, "linear", tokens_per_item=4)})
    again = MMFuseConfig.from_dict(cfg.to_dict())
    assert again == cfg and list(again.modalities) == ["vision", "audio"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": "Vision", "input_dim": 3}, "must match"),
    ({"name": "v", "input_dim": 0}, "input_dim must be a positive int"),
    ({"name": "v", "input_dim": 3, "projector": "mlp9"}, "projector 'mlp9'"),
    ({"name": "v", "input_dim": 3, "tokens_per_item": 0}, "tokens_per_item"),
    ({"name": "v", "input_dim": 3, "placeholder": "a b"}, "placeholder"),
])
def test_bad_specs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ModalitySpec(**kwargs)


def test_duplicate_placeholders_and_unknown_fields():
    with pytest.raises(ConfigError, match="unique"):
        MMFuseConfig({"a": ModalitySpec("a", 2, placeholder="<x>"), "b": ModalitySpec("b", 2, placeholder="<x>")})
    with pytest.raises(ConfigError, match="unknown fields"):
        MMFuseConfig.from_dict({"modalities": {"a": {"input_dim": 2, "dim": 3}}})
    with pytest.raises(ConfigError, match="no 'mmfuse' section"):
        MMFuseConfig.from_hf_config({"model_type": "qwen3"})


def test_cli_modality_arg():
    assert parse_modality_arg("m1:768").input_dim == 768
    assert parse_modality_arg("m2:512:linear").projector == "linear"
    with pytest.raises(ConfigError, match="NAME:DIM"):
        parse_modality_arg("m1")
