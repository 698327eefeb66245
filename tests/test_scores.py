"""Text scores (mmfuse.training.scores) on hand-computed cases."""
from __future__ import annotations

import pytest

from mmfuse.training.scores import SCORES, text_scores, token_f1


def test_token_f1_counts_shared_tokens_as_multisets():
    assert token_f1("a small red cube", "a small red cube") == 1.0
    # 3 of 4 tokens shared both ways: precision = recall = 3/4
    assert token_f1("a small blue cube", "a small red cube") == pytest.approx(0.75)
    # "the the" shares one "the" with "the cat": precision 1/2, recall 1/2
    assert token_f1("the the", "the cat") == pytest.approx(0.5)
    assert token_f1("Red", " red ") == 1.0  # lower-cased, whitespace-split
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_text_scores_perfect_and_partial():
    refs = ["a small red cube on the left", "a huge blue ring at the top"]
    perfect = text_scores(refs, refs)
    assert set(perfect) == set(SCORES) and all(v == pytest.approx(1.0) for v in perfect.values())
    partial = text_scores(["a small red cube on the right", "nothing at all"], refs)
    assert partial["exact_match"] == 0.0
    # row 1: 6 of 7 tokens; row 2: "at" shared, 1/3 precision, 1/7 recall -> F1 0.2
    assert partial["token_f1"] == pytest.approx((6 / 7 + 0.2) / 2)
    assert partial["rouge1"] == pytest.approx((6 / 7 + 0.2) / 2)  # unigram F-measure is token F1 here
    # bigrams: row 1 shares 5 of 6, row 2 none
    assert partial["rouge2"] == pytest.approx((5 / 6 + 0) / 2)
    assert 0.0 < partial["bleu"] < perfect["bleu"]


def test_text_scores_keep_non_latin_text():
    """rouge-score's own tokenizer would drop these characters; the shared whitespace tokenization keeps them."""
    scores = text_scores(["красный куб"], ["красный куб"])
    assert scores["rougeL"] == pytest.approx(1.0) and scores["token_f1"] == 1.0


def test_text_scores_refuse_unpaired_input():
    with pytest.raises(ValueError, match="2 generations for 1 references"):
        text_scores(["a", "b"], ["a"])
