"""Input rules (shared by both backends): coercion, validation and placeholder placement."""
import numpy as np
import pytest
import torch

from mmfuse import InputError, ModalitySpec
from mmfuse.inputs import coerce_items, encode_token_ids, prepare, rows_of

SPECS = {"m1": ModalitySpec("m1", 4), "m2": ModalitySpec("m2", 3, tokens_per_item=2, placeholder="<|s|>", max_items=2)}
PIDS = {"m1": 100, "m2": 101}  # placeholder token ids
WORD = {"a": 1, "b": 2, "first": 3, "then": 4, "and": 5, "describe": 6, "<|m1|>": 100, "<|s|>": 101}


def encode(text: str, embeddings, bos=None, max_len=64):
    """The placeholder rule on token ids, with a whitespace 'tokenizer' standing in for a real one."""
    p = prepare(text, embeddings, SPECS)
    ids = ([bos] if bos is not None else []) + [WORD[w] for w in text.split()]
    return encode_token_ids(ids, p.items, SPECS, PIDS, max_len, bos)


def test_item_forms_coerce_to_float32_2d():
    items = coerce_items(SPECS, {"m1": [torch.ones(4, dtype=torch.float16), np.zeros((2, 4)), [1, 2, 3, 4.5]]})
    assert [tuple(t.shape) for t in items["m1"]] == [(1, 4), (2, 4), (1, 4)]
    assert all(t.dtype == torch.float32 for t in items["m1"])
    assert items["m1"][2].tolist() == [[1.0, 2.0, 3.0, 4.5]]
    # a bare tensor/array or a flat float list is one item
    assert len(coerce_items(SPECS, {"m1": np.ones((3, 4))})["m1"]) == 1
    assert len(coerce_items(SPECS, {"m1": [0.0, 1.0, 2.0, 3.0]})["m1"]) == 1
    assert len(coerce_items(SPECS, {"m1": [[0.0] * 4, [1.0] * 4]})["m1"]) == 2


def test_rows_of_counts_vectors_times_tokens_per_item():
    items = coerce_items(SPECS, {"m2": [np.ones((3, 3))]})
    assert rows_of(SPECS["m2"], items["m2"][0]) == 6


@pytest.mark.parametrize("embeddings, needle", [
    ({"m9": [np.ones(4)]}, "modality 'm9' item 0: unknown modality"),
    ({"m1": [np.ones(4), np.ones(5)]}, "modality 'm1' item 1: wrong last dimension, expected 4, got shape (1, 5)"),
    ({"m1": [np.ones((2, 2, 4))]}, "modality 'm1' item 0: expected rank 1 or 2"),
    ({"m1": [np.ones((0, 4))]}, "modality 'm1' item 0: empty item"),
    ({"m1": [np.zeros(0)]}, "modality 'm1' item 0: empty item"),
    ({"m1": [np.ones(4), np.array([1, np.nan, 0, 0])]}, "modality 'm1' item 1: contains NaN or Inf"),
    ({"m1": [torch.tensor([1.0, float("inf"), 0, 0])]}, "modality 'm1' item 0: contains NaN or Inf"),
    ({"m2": [np.ones(3)] * 3}, "modality 'm2' item 2: too many items, expected at most 2, got 3"),
    ({"m1": [["a", "b", "c", "d"]]}, "modality 'm1' item 0: expected numbers"),
    ({"m1": [torch.ones(4, dtype=torch.bool)]}, "modality 'm1' item 0: expected a real float tensor"),
])
def test_bad_items_raise_input_error_naming_modality_and_index(embeddings, needle):
    with pytest.raises(InputError) as e:
        prepare("x", embeddings, SPECS)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("text, embeddings, needle", [
    ("a <|m1|> b", {"m1": [np.ones(4), np.ones(4)]}, "modality 'm1' item 1: no placeholder <|m1|>"),
    ("a <|m1|> <|m1|>", {"m1": [np.ones(4)]}, "modality 'm1' item 1: placeholder <|m1|> #1 has no item"),
    ("a <|s|> <|m1|>", {"m1": [np.ones(4)]}, "modality 'm2' item 0: placeholder <|s|> #0 has no item"),
    ("<|m1|>", {"m1": [np.ones(4)], "m2": [np.ones(3)]}, "modality 'm2' item 0: no placeholder <|s|>"),
])
def test_placeholder_count_mismatch(text, embeddings, needle):
    with pytest.raises(InputError) as e:
        encode(text, embeddings)
    assert needle in str(e.value)


def test_placeholders_keep_text_and_items_in_order():
    a, b = np.full(4, 1.0), np.full(4, 2.0)
    e = encode("first <|m1|> then <|s|> and <|m1|>", {"m1": [a, b], "m2": [np.ones((2, 3))]})
    assert e.token_ids == [3, 100, 4, 101, 5, 100]
    assert e.expanded_ids == [3, 100, 4] + [101] * 4 + [5, 100]  # (2, 3) item x 2 tokens per vector
    assert [t[0, 0].item() for t in e.items["m1"]] == [1.0, 2.0]


def test_no_placeholder_puts_items_before_text_in_given_order():
    embeddings = {"m2": [np.ones(3)], "m1": [np.ones(4), np.ones(4)]}
    assert encode("describe", embeddings).token_ids == [101, 100, 100, 6]
    assert encode("describe", embeddings, bos=0).token_ids == [0, 101, 100, 100, 6]  # after a leading BOS


def test_empty_and_too_long_prompts():
    with pytest.raises(InputError, match="the prompt is empty"):
        encode("", None)
    with pytest.raises(InputError, match=r"prompt too long: 9 tokens .*at most 8"):
        encode("a <|s|>", {"m2": [np.ones((4, 3))]}, max_len=8)


def test_text_only_and_non_string_text():
    assert prepare("just text", None, SPECS).text == "just text"
    with pytest.raises(InputError, match="text: expected a string"):
        prepare(123, None, SPECS)
