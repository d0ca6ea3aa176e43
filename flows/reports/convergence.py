"""The convergence plot of a federation: test accuracy, test and mean train loss per round, and, for a
protocol that records convergence (few-shot), the federated objective, update norm, drift and gradient
dissimilarity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TRACKED = (  # (panel title, y label, [(metric, label)])
    ("Federated objective", "loss / accuracy", [("convergence.global_loss", "global loss"),
                                                ("convergence.client_loss_mean", "client loss (mean)"),
                                                ("convergence.global_accuracy", "global accuracy"),
                                                ("convergence.client_accuracy_mean", "client accuracy (mean)")]),
    ("Updates", "L2 norm", [("convergence.update_norm", "update norm"), ("convergence.drift_mean", "client drift (mean)")]),
    ("Gradient dissimilarity", "B^2", [("convergence.grad_dissimilarity", "B^2 estimate")]),
)  # fmt: skip


def plot_convergence(rows: Sequence[Mapping[str, float]]) -> Any:
    from matplotlib.figure import Figure  # not pyplot: nothing keeps the figure alive once it is logged

    rounds = [r["round"] for r in rows]
    tracked = any(key in rows[0] for _, _, lines in TRACKED for key, _ in lines) if rows else False
    fig = Figure(figsize=(13.5 if tracked else 9, 7 if tracked else 3.5))
    axes = fig.subplots(2, 3) if tracked else [fig.subplots(1, 2)]
    acc_ax, loss_ax = axes[0][0], axes[0][1]
    acc_ax.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    loss_ax.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="test")
    loss_ax.plot(rounds, [r["train_loss"] for r in rows], marker="o", label="train (mean)")
    loss_ax.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    loss_ax.legend()
    if tracked:
        axes[0][2].set_axis_off()
        for ax, (title, ylabel, lines) in zip(axes[1], TRACKED):
            for key, label in lines:
                points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
            ax.set(xlabel="round", ylabel=ylabel, title=title)
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
