"""Scores of generated texts against references: exact match, token F1, BLEU and ROUGE.

One tokenization for every score but exact match: lower-cased, split on whitespace
(``tokens``). Punctuation stays attached to its word and non-Latin scripts keep their
characters (rouge-score's own tokenizer would drop everything outside ``[a-z0-9]``).

- ``exact_match``: the share of rows whose text equals the reference up to surrounding whitespace;
- ``token_f1``: mean over rows of the F1 of the two token multisets (SQuAD's definition; two empty
  texts score 1);
- ``bleu``: corpus BLEU-4 (NLTK's ``corpus_bleu``: clipped n-gram precisions pooled over all rows,
  brevity penalty over the total length), with NLTK's smoothing method 1 so that a short
  response with no 4-gram match does not zero the corpus;
- ``rouge1`` / ``rouge2`` / ``rougeL``: mean over rows of the F-measure from Google's ``rouge-score``
  (the reference reimplementation of ROUGE-1.5.5 that Hugging Face ``evaluate`` also wraps), no stemming.

Every score lies in [0, 1]; higher is better.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

SCORES = ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL")


def tokens(text: str) -> list[str]:
    return text.lower().split()


def is_exact(generated: str, reference: str) -> bool:
    """Exact match up to surrounding whitespace (EOS and padding are already stripped)."""
    return generated.strip() == reference.strip()


def token_f1(generated: str, reference: str) -> float:
    got, want = tokens(generated), tokens(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


class _Whitespace:
    """rouge-score's tokenizer interface over ``tokens``."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def text_scores(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every score of ``SCORES`` over paired generations and references (at least one pair)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
    from rouge_score.rouge_scorer import RougeScorer

    if len(generated) != len(references) or not references:
        raise ValueError(f"text_scores: {len(generated)} generations for {len(references)} references")
    n = len(references)
    rouge = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=_Whitespace())
    sums = Counter()
    for g, r in zip(generated, references):
        for name, score in rouge.score(r, g).items():  # (target, prediction)
            sums[name] += score.fmeasure
    bleu = corpus_bleu([[tokens(r)] for r in references], [tokens(g) for g in generated],
                       smoothing_function=SmoothingFunction().method1)
    return {"exact_match": sum(map(is_exact, generated, references)) / n,
            "token_f1": sum(map(token_f1, generated, references)) / n,
            "bleu": float(bleu), **{k: sums[k] / n for k in ("rouge1", "rouge2", "rougeL")}}
