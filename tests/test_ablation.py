"""Input ablation (mmfuse.training.ablation): the replacements, and `mmfuse eval --ablate` on the shipped demo."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from mmfuse import demo as task
from mmfuse.training import DataError, EvalConfig
from mmfuse.training.ablation import ALL, ablate, modalities_present
from mmfuse.training.config import TrainConfigError


def _rows(n: int = 12) -> list[tuple[int, dict]]:
    """Rows with 1 or 2 items of a (n_i, 4) modality "a" and one vector of "b" on even rows."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {"prompt": "p", "response": "r",
               "mm_a": [(3.0 + rng.normal(size=(1 + i % 3, 4)) * [1, 2, 3, 4]).tolist() for _ in range(1 + i % 2)],
               "mm_b": [rng.normal(size=8).tolist()] if i % 2 == 0 else None}
        rows.append((i, row))
    return rows


def test_zero_keeps_shapes_and_other_modalities():
    rows = _rows()
    out = ablate(rows, ["a"], "zero")
    for (_, before), (_, after) in zip(rows, out):
        assert [np.shape(x) for x in after["mm_a"]] == [np.shape(x) for x in before["mm_a"]]
        assert all(not np.any(x) for x in after["mm_a"]) and after["mm_b"] is before["mm_b"]
    assert rows[0][1]["mm_a"][0][0][0] != 0.0  # the input rows are not modified


def test_shuffle_moves_every_row_s_items_to_another_row_with_as_many():
    rows = _rows()
    out = ablate(rows, ["a"], "shuffle", seed=1)

    def same(xs, ys) -> bool:
        return len(xs) == len(ys) and all(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
                                          for x, y in zip(xs, ys))

    for (i, before), (_, after) in zip(rows, out):
        donors = [j for j, row in rows if same(row["mm_a"], after["mm_a"])]
        assert len(donors) == 1 and donors[0] != i and len(rows[donors[0]][1]["mm_a"]) == len(before["mm_a"])
    again = ablate(rows, ["a"], "shuffle", seed=1)
    assert all(same(x["mm_a"], y["mm_a"]) for (_, x), (_, y) in zip(out, again))  # seeded


def test_noise_matches_each_dimension_s_mean_and_std():
    rows = _rows(200)
    vectors = np.concatenate([np.asarray(x) for _, r in rows for x in r["mm_a"]])
    noised = np.concatenate([x for _, r in ablate(rows, ["a"], "noise") for x in r["mm_a"]])
    assert noised.shape == vectors.shape
    np.testing.assert_allclose(noised.mean(0), vectors.mean(0), atol=0.2)
    np.testing.assert_allclose(noised.std(0), vectors.std(0), rtol=0.1)
    assert np.corrcoef(noised[:, 0], vectors[:, 0])[0, 1] < 0.2  # no information about the original left


def test_raw_media_and_bad_modes_are_refused():
    with pytest.raises(DataError, match=r"row 0: modality 'a' item 0: --ablate needs vectors"):
        ablate([(0, {"mm_a": [b"\x89PNG"]})], ["a"], "zero")
    with pytest.raises(TrainConfigError, match="ablate: expected some of"):
        EvalConfig(ablate=["blur"])
    assert modalities_present(_rows(), ["b", "a", "c"]) == ["b", "a"]


def test_ablate_without_any_vectors_is_refused(qwen3_ckpt, tmp_path):
    from mmfuse.training import evaluate, write_parquet

    write_parquet([{"prompt": "describe nothing", "response": "red"}] * 3, tmp_path / "text.parquet")
    with pytest.raises(DataError, match="--ablate found no items in any mm_NAME column"):
        evaluate(qwen3_ckpt, tmp_path / "text.parquet", EvalConfig(ablate=["zero"], loss=False))


@pytest.fixture(scope="module")
def demo_report():
    """`mmfuse eval demo/ckpt demo/heldout.parquet --limit 16 --ablate zero,shuffle,noise` (one JSON line)."""
    import contextlib
    import io

    from mmfuse.training.cli import add_eval_args, run_eval

    p = argparse.ArgumentParser()
    add_eval_args(p)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_eval(p.parse_args([str(task.CKPT_DIR), str(task.HELDOUT), "--limit", "16", "--no-loss",
                                      "--ablate", "zero,shuffle,noise"]))
    assert code == 0
    return json.loads(out.getvalue())


def test_demo_depends_on_its_vectors(demo_report):
    """Without sent + tok the demo cannot write the sentence back: exact match <= 0.1 for every ablation; each
    modality's own drop is reported (tok carries most of the sentence: alone it already breaks exact match)."""
    r = demo_report
    assert r["n"] == 16 and r["exact_match"] >= 0.9 and r["token_f1"] >= 0.95
    assert set(r["ablation"]) == {"zero", "shuffle", "noise"}
    for mode, targets in r["ablation"].items():
        assert set(targets) == {"sent", "tok", ALL}
        both = targets[ALL]
        assert both["scores"]["exact_match"] <= 0.1, (mode, both)
        assert both["drops"]["exact_match"] == pytest.approx(r["exact_match"] - both["scores"]["exact_match"])
        assert both["drops"]["token_f1"] > 0.3  # most words are wrong too, not only the exact string
        for name in ("sent", "tok"):
            scores, drops = targets[name]["scores"], targets[name]["drops"]
            assert set(scores) == set(drops) == {"exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL"}
            assert all(drops[k] == pytest.approx(r[k] - scores[k]) for k in scores)
        assert targets["tok"]["scores"]["exact_match"] <= 0.1  # the token states alone carry the sentence...
        assert targets["sent"]["drops"]["exact_match"] < targets["tok"]["drops"]["exact_match"]  # ...more than sent
