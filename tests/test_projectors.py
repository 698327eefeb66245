"""Projector kinds and their output layout."""
import torch

from mmfuse import ModalitySpec
from mmfuse.projectors import build_projector


def test_linear_and_mlp_shapes_and_param_names():
    lin = build_projector(ModalitySpec("a", 8, "linear", tokens_per_item=3), lm_hidden=16)
    mlp = build_projector(ModalitySpec("b", 8, hidden_dim=32), lm_hidden=16)
    assert lin(torch.randn(5, 8)).shape == (15, 16)
    assert mlp(torch.randn(5, 8)).shape == (5, 16)
    assert sorted(mlp.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert mlp[0].out_features == 32


def test_rows_of_one_vector_are_contiguous():
    p = build_projector(ModalitySpec("a", 4, "linear", tokens_per_item=2), lm_hidden=3)
    x = torch.randn(2, 4)
    full = p[0](x)  # [2, 2*3]
    rows = p(x)     # [4, 3]
    assert torch.equal(rows[0:2].flatten(), full[0]) and torch.equal(rows[2:4].flatten(), full[1])
