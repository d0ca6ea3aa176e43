"""The ``heterogeneous`` suite's report: targets, the Markdown table and plots (see components/evaluation/heterogeneous.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.evaluation.heterogeneous import METHODS, ROW_FIELDS

LABELS = {
    "local-only": "Local only (own architecture)",
    "fedavg-single": "FedAvg, smallest architecture for all",
    "ensemble-distillation": "Ensemble distillation (FedDF-style)",
    "shared-base": "Shared base + personal heads",
}
COLUMNS = {
    "test_accuracy": ("test accuracy", "{:.4f}"),
    "personalized_accuracy_mean": ("personalised accuracy, mean", "{:.4f}"),
    "personalized_accuracy_min": ("personalised accuracy, worst client", "{:.4f}"),
    "bytes_per_round": ("MB per round", "{:.2f}"),
}
FORGET_COLUMNS = {
    "forget_test_accuracy": ("test acc. after forget", "{:.4f}"),
    "recovered_test_accuracy": ("after recovery", "{:.4f}"),
    "retrain_test_accuracy": ("Retrain", "{:.4f}"),
    "recovered_target_accuracy": ("forgotten client's data, after recovery", "{:.4f}"),
    "retrain_target_accuracy": ("... Retrain", "{:.4f}"),
    "recovered_seconds": ("forget + recovery (s)", "{:.2f}"),
    "retrain_seconds": ("Retrain (s)", "{:.2f}"),
}


def targets(summary: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's targets, measured on means over seeds (points are percentage points)."""
    row = {(r["method"], r["alpha"]): r for r in summary["rows"]}

    def mean(method: str, alpha: float, metric: str) -> float:
        return row[(method, alpha)][metric]

    out = []
    for alpha in sorted({a for _, a in row}):
        if {("ensemble-distillation", alpha), ("fedavg-single", alpha)} <= row.keys():
            gap = 100 * (
                mean("ensemble-distillation", alpha, "test_accuracy") - mean("fedavg-single", alpha, "test_accuracy")
            )
            out.append({"target": f"alpha {alpha}: ensemble distillation's test accuracy >= fedavg-single's",
                        "measured": f"{gap:+.2f} pt", "met": gap >= 0})  # fmt: skip
    if {("shared-base", 0.1), ("fedavg-single", 0.1), ("local-only", 0.1)} <= row.keys():
        gain = 100 * (mean("shared-base", 0.1, "personalized_accuracy_mean")
                      - mean("fedavg-single", 0.1, "personalized_accuracy_mean"))  # fmt: skip
        worst = 100 * (mean("shared-base", 0.1, "personalized_accuracy_min")
                       - mean("local-only", 0.1, "personalized_accuracy_min"))  # fmt: skip
        out += [
            {"target": "alpha 0.1: shared base's mean personalised accuracy >= fedavg-single's + 5 pt",
             "measured": f"{gain:+.2f} pt", "met": gain >= 5},
            {"target": "alpha 0.1: shared base's worst client >= local-only's worst client",
             "measured": f"{worst:+.2f} pt", "met": worst >= 0},
        ]  # fmt: skip
    for f in summary.get("forgetting", []):
        gap, fraction = f["accuracy_gap_points"]["mean"], f["time_fraction"]["mean"]
        out.append({"target": f"alpha {f['alpha']}: {f['method']} forgetting within 1.5 pt of Retrain, <= 1/20 of its time",
                    "measured": f"{gap:+.2f} pt, {_fraction(fraction)} of the time",
                    "met": abs(gap) <= 1.5 and fraction <= 1 / 20})  # fmt: skip
    return out


def _fraction(value: float) -> str:
    return f"1/{1 / value:.0f}" if 0 < value < 1 else f"{value:.1f}x"


def _cell(stat: Mapping[str, float] | None, fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return "n/a"
    return f"{fmt.format(stat['mean'] * scale)} ± {fmt.format(stat['sd'] * scale)}"


def _row_stat(row: Mapping[str, Any], field: str) -> dict[str, float] | None:
    """A row's ``field`` (the mean) and ``<field>_sd`` as the ``{mean, sd}`` a cell shows."""
    return None if row[field] is None else {"mean": row[field], "sd": row[f"{field}_sd"]}


def render_markdown(result: Mapping[str, Any]) -> str:
    """The results table, the forgetting table and the targets, with the profile stated."""
    cfg = result.get("config", {})
    lines = [
        f"# Heterogeneous client models: {cfg.get('dataset', '?')}, profile {cfg.get('profile', '?')}",
        "",
        f"{cfg.get('clients', '?')} clients, {cfg.get('rounds', '?')} rounds, Dirichlet alpha "
        f"{', '.join(str(a) for a in cfg.get('alphas', []))}; architectures mixed round-robin: "
        f"{', '.join(cfg.get('architectures', []))} (ensemble and local-only; the student is "
        f"{cfg.get('student', '?')}); shared base with heads {', '.join(cfg.get('shared_base', []))}. "
        "Personalised accuracy: each client's own held-out split. Mean ± sd over "
        f"{cfg.get('seeds', '?')} seed(s).",
        "",
        "| method | alpha | " + " | ".join(label for label, _ in COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in sorted(result["rows"], key=lambda r: (METHODS.index(r["method"]), r["alpha"])):
        cells = [
            _cell(_row_stat(row, f), fmt, 1e-6 if f == "bytes_per_round" else 1.0) for f, (_, fmt) in COLUMNS.items()
        ]
        lines.append(f"| {LABELS[row['method']]} | {row['alpha']} | " + " | ".join(cells) + " |")
    if result.get("forgetting"):
        lines += ["", "## Forgetting the client with the most data, against retraining without it", "",
                  "| protocol | alpha | " + " | ".join(label for label, _ in FORGET_COLUMNS.values()) + " |",
                  "|---|---|" + "---|" * len(FORGET_COLUMNS)]  # fmt: skip
        for f in result["forgetting"]:
            cells = [_cell(f[k], fmt) for k, (_, fmt) in FORGET_COLUMNS.items()]
            lines.append(f"| {f['method']} | {f['alpha']} | " + " | ".join(cells) + " |")
        lines += ["", _recovery_line(result["forgetting"], cfg.get("recovery", "finetune"))]
    found = result.get("targets") or targets(result)
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in found]
    lines += ["", "![accuracy](heterogeneous_accuracy.png)", ""]
    if result.get("forgetting"):
        lines += ["![forgetting](heterogeneous_forgetting.png)", ""]
    return "\n".join(lines)


def _recovery_line(forgetting: Sequence[Mapping[str, Any]], recovery: str) -> str:
    """What recovered the model after the subtraction, and what its time includes."""
    if recovery == "clip":
        fits = [f["teacher_fit_seconds"]["mean"] for f in forgetting if f.get("teacher_fit_seconds")]
        fit = f" (its cold fit, {sum(fits) / len(fits):.1f} s, is not counted)" if fits else ""
        return ("Recovery: distillation from the CLIP-Adapter teacher fitted on the server's few-shot set, as "
                "in production, where the teacher is fitted when a federation ends; the deletion's time is "
                f"forget + teacher logits + distillation{fit}.")  # fmt: skip
    return {
        "finetune": "Recovery: fine-tuning on the server's few-shot labels (no teacher).",
        "global-model": "Recovery: distillation from the pre-deletion model (a baseline: it saw the client).",
        "none": "No recovery: the model right after the subtraction.",
    }[recovery]


def plot(result: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """Accuracy per method and alpha; forgetting against retraining. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    alphas = sorted({r["alpha"] for r in rows})
    metrics = [f for f in ROW_FIELDS if f != "bytes_per_round"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, metric in zip(axes[0], metrics):
        for i, method in enumerate(METHODS):
            found = {r["alpha"]: r for r in rows if r["method"] == method and r[metric] is not None}
            xs = [j + i * width for j, a in enumerate(alphas) if a in found]
            ax.bar(xs, [found[a][metric] for a in alphas if a in found], width,
                   yerr=[found[a][f"{metric}_sd"] for a in alphas if a in found], capsize=3, label=method)  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(alphas))], [f"alpha {a}" for a in alphas])
        ax.set(title=COLUMNS[metric][0], ylim=(0, 1))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths = [folder / "heterogeneous_accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if result.get("forgetting"):
        fig, (acc, secs) = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"{f['method']}\nalpha {f['alpha']}" for f in result["forgetting"]]
        for i, key in enumerate(("forget_test_accuracy", "recovered_test_accuracy", "retrain_test_accuracy")):
            acc.bar([j + i * 0.27 for j in range(len(labels))], [f[key]["mean"] for f in result["forgetting"]], 0.27,
                    label=key.removesuffix("_test_accuracy"))  # fmt: skip
        for i, key in enumerate(("recovered_seconds", "retrain_seconds")):
            secs.bar([j + i * 0.4 for j in range(len(labels))], [f[key]["mean"] for f in result["forgetting"]], 0.4,
                     label=key.removesuffix("_seconds"))  # fmt: skip
        for ax, title in ((acc, "test accuracy"), (secs, "wall time (s)")):
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(title)
            ax.legend(fontsize=8)
        secs.set_yscale("log")
        fig.tight_layout()
        paths.append(folder / "heterogeneous_forgetting.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
