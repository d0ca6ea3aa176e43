"""The Markdown table and plots of the ``distillation`` suite (see components/evaluation/distillation.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHOD_LABELS = {
    "fedavg": "FedAvg",
    "soft-labels": "Soft labels (plain FD)",
    "soft-labels-grouped": "Soft labels, grouped",
    "soft-labels-calibrated": "Soft labels, grouped rule without grouping (ablation)",
}


def _kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def render_markdown(result: dict[str, Any]) -> str:
    """The results table with the profile it was measured on, forgetting, and the issue's targets."""
    cfg = result.get("config", {})
    soft = cfg.get("soft_labels", {})
    lines = [
        f"# Soft-label federated distillation: {cfg.get('dataset', '?')}, {cfg.get('clients', '?')} clients, "
        f"{cfg.get('rounds', '?')} rounds, {cfg.get('seeds', '?')} seed(s)",
        "",
        f"Profile: `{cfg.get('profile', '?')}`; public set D: {cfg.get('public_size', '?')} unlabeled images; "
        f"model {cfg.get('model', {}).get('name', '?')} {cfg.get('model', {}).get('args', {})}; "
        f"T={soft.get('temperature', '?')}, JS threshold {soft.get('distance_threshold', '?')}, "
        f"soft labels in {soft.get('precision', '?')}. Test accuracy of the global model (mean ± sd over seeds); "
        "client accuracy: each client's own model (FedAvg: the global one) on its own held-out split; "
        "bytes: what all clients upload per round.",
        "",
        "| method | alpha | test accuracy | client accuracy | upload bytes / round | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {METHOD_LABELS.get(row['method'], row['method'])} | {row['alpha']} | "
            f"{row['test_accuracy']:.4f} ± {row['test_accuracy_sd']:.4f} | {row['client_accuracy_mean']:.4f} | "
            f"{_kib(row['bytes_per_round'])} | {row['seeds']} |"
        )
    forgetting = result.get("forgetting")
    if forgetting:
        f = forgetting
        lines += [
            "",
            f"## Forgetting under the grouped protocol (alpha {cfg.get('forget_alpha', '?')}, the largest client)",
            "",
            "Every round's consensus recomputed without the client (re-group, re-pick), then the student "
            "re-distilled: `final` (from the initial state on the last consensus), `replay` (every round again) or "
            "`rewind` (the first round the client took part in: exact, later rounds given up). No teacher recovery "
            f"here (the unlearn flow adds the CLIP-Adapter step); the protocol's default is `{soft.get('redistil', '?')}`. "
            "Accuracy on the client's data far above the retrained model's is influence the other clients keep.",
            "",
            "| model | test accuracy | accuracy on the client's data | wall time (s) |",
            "|---|---|---|---|",
        ]
        for name, label in (("original", "original"), ("retrain", "retrained without the client"),
                            ("final", "forgotten: final"), ("replay", "forgotten: replay"),
                            ("rewind", "forgotten: rewind")):  # fmt: skip
            if f"{name}_test_accuracy" in f:
                lines.append(f"| {label} | {f[f'{name}_test_accuracy']:.4f} | {f[f'{name}_target_accuracy']:.4f} | "
                             f"{f[f'{name}_s']:.2f} |")  # fmt: skip
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    lines += ["", "![accuracy per round](accuracy_per_round.png)", "", "![bytes per round](bytes.png)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """Accuracy per round (one panel per alpha) and upload bytes per round per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphas = sorted({row["alpha"] for row in result["rows"]})
    methods = list(dict.fromkeys(row["method"] for row in result["rows"]))
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for method in methods:
            curve = result["accuracy_per_round"].get(f"{method}@{alpha}")
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, marker="o", label=METHOD_LABELS.get(method, method))
        ax.set(xlabel="round", ylabel="test accuracy", title=f"Dirichlet alpha {alpha}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    accuracy = folder / "accuracy_per_round.png"
    fig.savefig(accuracy, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result["rows"] if r["alpha"] == alphas[0]]
    ax.bar([METHOD_LABELS.get(r["method"], r["method"]) for r in rows], [r["bytes_per_round"] for r in rows])
    ax.set_yscale("log")
    ax.set(ylabel="bytes uploaded per round (all clients)", title="Communication")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    bytes_png = folder / "bytes.png"
    fig.savefig(bytes_png, dpi=110)
    plt.close(fig)
    return [accuracy, bytes_png]
