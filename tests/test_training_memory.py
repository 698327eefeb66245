"""``mmfuse bench training-memory`` (mmfuse.bench.training_memory): checkpointing lowers the measured peak.

A smaller model than the documented run (docs/training.md, "Memory"), still one where activations
dominate: 8 layers of hidden 128, 4 heads, rows of 768 tokens, batch 4. Each setting is a fresh ``mmfuse train``
process; the peak is its own ``ru_maxrss``.
"""
from __future__ import annotations

import json

from mmfuse.bench.training_memory import main


def test_gradient_checkpointing_lowers_peak_memory_and_changes_no_loss(tmp_path, capsys):
    out = tmp_path / "mem.json"
    main(["--layers", "8", "--hidden", "128", "--heads", "4", "--rows", "768", "--batch-size", "4", "--steps", "1",
          "--out", str(out)])
    result = json.loads(out.read_text())
    off, on = result["runs"]
    assert (off["gradient_checkpointing"], on["gradient_checkpointing"]) == (False, True)
    assert on["peak_rss_mib"] < off["peak_rss_mib"] - 100, result  # measured: 210 MiB lower (of ~670 above the baseline)
    assert result["peak_saved_mib"] == round(off["peak_rss_mib"] - on["peak_rss_mib"], 1)
    assert off["losses"] == on["losses"] and result["max_loss_difference"] == 0.0
    printed = capsys.readouterr().out
    assert "peak RSS MiB" in printed and f"saved {result['peak_saved_mib']} MiB" in printed
