"""Human-readable outputs of a run: the metrics table and the training-curve PNG."""

from __future__ import annotations

from pathlib import Path

REPORT_METRICS = ("hr@10", "hr@50", "hr@100", "ndcg@10", "ndcg@50", "mean_rank", "auc")


def metrics_table(results: dict[str, dict[str, dict[str, float]]], metrics: tuple[str, ...] = REPORT_METRICS) -> str:
    """A fixed-width table: one line per (split, ranker), one column per metric.
    ``results``: {split: {ranker: {metric: value}}}."""
    shown = [m for m in metrics if any(m in r for split in results.values() for r in split.values())]
    header = f"{'split':6s} {'ranker':10s} " + " ".join(f"{m:>9s}" for m in shown)
    lines = [header, "-" * len(header)]
    for split, rankers in results.items():
        for ranker, values in rankers.items():
            cells = []
            for m in shown:
                v = values.get(m)
                cells.append(f"{'':>9s}" if v is None else (f"{v:9.1f}" if m == "mean_rank" else f"{v:9.4f}"))
            lines.append(f"{split:6s} {ranker:10s} " + " ".join(cells))
    return "\n".join(lines)


def plot_training(history: list[dict], path: str | Path, metric: str = "recall@50") -> None:
    """Two panels: mean training loss per epoch, and validation ``metric`` per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(title="training loss", xlabel="epoch")
    right.plot(epochs, [h.get("valid", {}).get(metric, float("nan")) for h in history], marker="o", color="C2")
    right.set(title=f"validation {metric}", xlabel="epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
