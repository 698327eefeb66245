"""The shipped demo (demo/ckpt, demo/heldout.parquet): it loads, it works, and it works *because of the vectors*.

Full numbers (240 rows, both backends, untrained projectors) come from
``scripts/eval_demo.py``; this checks the first 20 held-out rows in the HF backend.
"""
from __future__ import annotations

import pytest

from mmfuse import demo as task

N = 20


@pytest.fixture(scope="module")
def pipe():
    from mmfuse import MultimodalPipeline

    return MultimodalPipeline(task.CKPT_DIR, backend="hf")


@pytest.fixture(scope="module")
def rows():
    return task.heldout_rows(task.HELDOUT, N)


def _generate(pipe, rows):
    return pipe.generate([task.request(r["items"]) for r in rows], max_tokens=24)


def test_checkpoint_is_small_and_has_both_modalities():
    size = sum(f.stat().st_size for f in task.CKPT_DIR.iterdir() if f.is_file())
    assert size <= 25 * 2**20, f"shipped checkpoint is {size / 2**20:.1f} MiB"
    from mmfuse.checkpoint import read_config
    mods = read_config(task.CKPT_DIR)["mmfuse"]["modalities"]
    assert {n: m["input_dim"] for n, m in mods.items()} == {"sent": task.EMBED_DIM, "tok": task.EMBED_DIM}


def test_heldout_split_is_the_seeded_split_and_never_seen_in_training():
    train, heldout = task.split()
    shipped = [r["response"] for r in task.heldout_rows(task.HELDOUT)]
    assert shipped == heldout and len(shipped) >= 200
    assert not set(shipped) & set(train)
    assert not set(task.DEMO_SENTENCES) & (set(train) | set(shipped))


def test_heldout_rows_have_one_sent_vector_and_token_states(rows):
    for r in rows:
        (sent,), (tok,) = r["items"]["sent"], r["items"]["tok"]
        assert sent.shape == (1, task.EMBED_DIM)
        assert tok.shape[1] == task.EMBED_DIM and tok.shape[0] >= len(r["response"].split()) + 2  # + CLS, SEP


def test_shipped_checkpoint_reproduces_heldout_exact_match(pipe, rows):
    outputs = _generate(pipe, rows)
    hits = sum(o.strip() == r["response"] for o, r in zip(outputs, rows))
    assert hits >= N - 1, list(zip(outputs, [r["response"] for r in rows]))


def test_swapped_vectors_break_it_and_the_output_follows_the_vectors(pipe, rows):
    swapped = [rows[(i + 1) % N]["items"] for i in range(N)]
    outputs = pipe.generate([task.request(x) for x in swapped], max_tokens=24)
    own = sum(o.strip() == r["response"] for o, r in zip(outputs, rows))
    donor = sum(o.strip() == rows[(i + 1) % N]["response"] for i, o in enumerate(outputs))
    assert own <= 2
    assert donor >= N - 1


def test_minilm_encoding_matches_the_shipped_vectors(rows):
    import numpy as np

    fresh = task.encode([r["response"] for r in rows[:4]])
    for r, x in zip(rows, fresh):
        for name in ("sent", "tok"):
            np.testing.assert_allclose(x[name][0], r["items"][name][0], atol=2e-4, rtol=1e-3)


def test_checkpoint_encoder_makes_the_demo_vectors(rows):
    """Both modalities declare MiniLM as their encoder; on raw sentences it makes ``mmfuse.demo.encode``'s
    vectors (the ones the checkpoint was trained on) to 1e-5."""
    import numpy as np
    import torch

    from mmfuse.checkpoint import open_checkpoint
    from mmfuse.encoders import encode_items, preprocess

    specs = open_checkpoint(task.CKPT_DIR).specs
    sentences = [r["response"] for r in rows[:4]]
    fresh = task.encode(sentences)
    for name, spec in specs.items():
        assert spec.encoder.to_dict() == task.ENCODER[name]
        vectors = encode_items(spec, [preprocess(spec, i, s) for i, s in enumerate(sentences)], "cpu", torch.float32)
        for v, x in zip(vectors, fresh):
            np.testing.assert_allclose(v.numpy(), x[name][0], atol=1e-5, rtol=0)


def test_raw_sentences_give_the_same_tokens_as_their_vectors(pipe, rows):
    """A held-out row's sentence as raw text (encoded inside the backend) and the row's shipped vectors: identical
    greedy tokens with log-probs within 1e-4, the sentence written back."""
    import numpy as np

    from mmfuse import SamplingConfig

    few, config = rows[:4], SamplingConfig(max_tokens=24, logprobs=True)
    vectors = pipe.generate_completions([task.request(r["items"]) for r in few], config)
    raw = pipe.generate_completions([task.request(task.raw_items(r["response"])) for r in few], config)
    for r, [v], [w] in zip(few, vectors, raw):
        assert w.token_ids == v.token_ids and w.text.strip() == r["response"], (w.text, v.text)
        np.testing.assert_allclose(w.logprobs, v.logprobs, atol=1e-4, rtol=0)
