"""What a run leaves beside the checkpoint: ``metrics.json`` and ``loss_curve.png``."""
from __future__ import annotations

import json
from pathlib import Path

from .config import TrainConfig


def write_report(out: Path, config: TrainConfig, progress, processes: int, seconds: float, strategy: str,
                 data: dict | None = None) -> None:
    """``data``: what the dataset checks found (``plan.DataPlan.summary``: rows kept, dropped)."""
    metrics = {"config": config.to_dict(), "processes": processes, "strategy": strategy, "steps": progress.step,
               "data": data,
               "train_seconds_this_session": round(seconds, 3),
               "final_loss": progress.history[-1]["loss"] if progress.history else None,
               "final_eval": progress.evals[-1] if progress.evals else None,
               "history": progress.history, "evals": progress.evals}
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    plot_loss(out / "loss_curve.png", progress.history, progress.evals, f"stage {config.stage} ({config.trainable})")


def plot_loss(path: Path, history: list[dict], evals: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
