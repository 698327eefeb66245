"""mmfuse.client encodings round-trip through the server's wire decoder."""
import numpy as np
import pytest
import torch

from mmfuse.client import embedding_part, encode_embedding
from mmfuse.inputs import InputError
from mmfuse.server.wire import decode_base64, decode_embedding


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_round_trip_equals_torch_rounding(dtype, shape):
    a = torch.randn(*shape) * 100
    enc = encode_embedding(a, dtype)
    assert enc["shape"] == list(shape) and enc["dtype"] == dtype
    back = decode_embedding("x", enc)
    assert back.dtype == np.float32 and back.shape == (shape if len(shape) == 2 else (1, *shape))  # always rows
    np.testing.assert_array_equal(back, a.to(getattr(torch, dtype)).float().numpy().reshape(back.shape))


def test_embedding_part_shape():
    part = embedding_part(np.ones(4), "vision")
    assert part["type"] == "input_embedding" and part["modality"] == "vision"
    assert part["embedding"]["shape"] == [4]
    with pytest.raises(ValueError, match="dtype"):
        encode_embedding(np.ones(4), "float64")


def test_decoder_refuses_before_allocating():
    small = encode_embedding(np.ones(8))["data"]
    with pytest.raises(InputError, match=r"x\.data: shape \[1000000000000, 8\] of float32 needs"):
        decode_base64("x", "float32", [10**12, 8], small)
    with pytest.raises(InputError, match="x.shape"):
        decode_base64("x", "float32", [2, 2, 2], small)
    with pytest.raises(InputError, match="not valid base64"):
        decode_base64("x", "float32", [8], small[:-1])
    with pytest.raises(InputError, match="x.dtype"):
        decode_base64("x", "int8", [8], small)
