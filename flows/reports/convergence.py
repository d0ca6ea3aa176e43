"""The convergence plot of a federation (test accuracy, test and mean train loss per round)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def plot_convergence(rows: Sequence[Mapping[str, float]]) -> Any:
    from matplotlib.figure import Figure  # not pyplot: nothing keeps the figure alive once it is logged

    rounds = [r["round"] for r in rows]
    fig = Figure(figsize=(9, 3.5))
    acc_ax, loss_ax = fig.subplots(1, 2)
    acc_ax.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    loss_ax.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="test")
    loss_ax.plot(rounds, [r["train_loss"] for r in rows], marker="o", label="train (mean)")
    loss_ax.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    loss_ax.legend()
    fig.tight_layout()
    return fig
