"""HF vs vLLM on runs that end by EOS and by stop strings, not only by length.

The shipped demo checkpoint (demo/ckpt) is trained to write a scene description and stop
by EOS, so greedy runs on held-out rows end well before ``max_tokens`` in both backends.
One vLLM engine on it for the session (``demo_vllm``).
"""
from __future__ import annotations

import pytest

from mmfuse import SamplingConfig
from mmfuse import demo as task
from mmfuse.inputs import prepare

pytestmark = pytest.mark.vllm

N_ROWS = 6
MAX_TOKENS = 24  # the demo's answers are ~10 tokens: an EOS stop comes long before this
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="session")
def demo_hf():
    from mmfuse.backends.hf import HFBackend
    return HFBackend(task.CKPT_DIR, device="cpu")


@pytest.fixture(scope="session")
def demo_vllm():
    pytest.importorskip("vllm")
    from mmfuse.backends.vllm import VLLMBackend
    backend = VLLMBackend(task.CKPT_DIR, max_model_len=128)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def rows():
    return task.heldout_rows(task.HELDOUT, N_ROWS)


def cold_vllm(backend, encoded, sampling):
    """vLLM completions computed from scratch: prefix cache emptied first, no cached token used."""
    from mmfuse.backends.vllm import to_completion

    assert backend.llm.reset_prefix_cache()
    outs = backend.generate_outputs(encoded, sampling)
    assert [o.num_cached_tokens for o in outs] == [0] * len(outs)
    return [[to_completion(c, backend.tokenizer, sampling) for c in o.outputs] for o in outs], outs


def both(demo_hf, demo_vllm, rows, sampling):
    prepared = [prepare(task.PROMPT, r["items"], demo_hf.specs) for r in rows]
    hf = demo_hf.generate([demo_hf.encode(p) for p in prepared], sampling)
    vl, raw = cold_vllm(demo_vllm, [demo_vllm.encode(p) for p in prepared], sampling)
    return [h[0] for h in hf], [v[0] for v in vl], raw


def test_greedy_runs_that_end_by_eos_are_token_identical(demo_hf, demo_vllm, rows):
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, logprobs=True)
    hf, vl, raw = both(demo_hf, demo_vllm, rows, sampling)
    eos = demo_hf.checkpoint.eos_token_ids
    for r, h, v, o in zip(rows, hf, vl, raw):
        where = r["response"]
        assert h.finish_reason == v.finish_reason == "stop", where
        assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason in (None, *eos), where  # EOS
        assert h.token_ids[-1] in eos and v.token_ids[-1] in eos, where
        assert len(h.token_ids) < MAX_TOKENS, where
        assert v.token_ids == h.token_ids, where
        assert v.text == h.text and h.text.strip() == r["response"], where  # the trained answer, then EOS
        assert max(abs(a - b) for a, b in zip(v.logprobs, h.logprobs)) < LOGPROB_TOL, where


@pytest.mark.parametrize("cut", ["word", "inside a token"])
def test_greedy_runs_that_end_by_a_stop_string_are_identical(demo_hf, demo_vllm, rows, cut):
    """Stop at the shape word ("a huge purple| sphere ..."), or at letters inside a token ("a huge p|urple")."""
    prepared = [prepare(task.PROMPT, r["items"], demo_hf.specs) for r in rows]
    full = [c[0] for c in demo_hf.generate([demo_hf.encode(p) for p in prepared],
                                           SamplingConfig(max_tokens=MAX_TOKENS))]  # HF, ends by EOS
    eos = demo_hf.checkpoint.eos_token_ids
    for r, whole in zip(rows, full):
        words = r["response"].split()
        stop = " " + words[3] if cut == "word" else words[2][1:3]  # " sphere" / "ur" of "purple"
        (h,), (v,), (o,) = both(demo_hf, demo_vllm, [r], SamplingConfig(max_tokens=MAX_TOKENS, stop=[stop]))
        where = f"{r['response']!r} stop {stop!r}"
        assert h.finish_reason == v.finish_reason == "stop", where
        assert o.outputs[0].stop_reason == stop, where  # vLLM stopped on the string, not by EOS
        assert v.text == h.text == whole.text[: whole.text.find(stop)], where
        assert v.token_ids == h.token_ids, where
        # both stopped at the token that completed the string: a strict prefix of the EOS run, no EOS
        n = len(h.token_ids)
        assert 0 < n < len(whole.token_ids) - 1 and h.token_ids == whole.token_ids[:n], where
        assert h.token_ids[-1] not in eos and stop in demo_hf.tokenizer.decode(h.token_ids), where
