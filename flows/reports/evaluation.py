"""Summaries, the Markdown table and plots of an evaluation (see components/evaluation.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.evaluation.unlearning import METHOD_LABELS, METHODS, mean_std

METRICS = {
    "test_accuracy": ("test accuracy", "{:.4f}"),
    "target_accuracy": ("accuracy on target's clean data", "{:.4f}"),
    "backdoor_asr": ("backdoor ASR", "{:.4f}"),
    "mia_auc": ("MIA AUC", "{:.3f}"),
    "mia_advantage": ("MIA advantage", "{:.3f}"),
    "lira_auc": ("LiRA AUC", "{:.3f}"),
    "lira_tpr_at_1fpr": ("LiRA TPR at 1% FPR", "{:.3f}"),
    "l2_to_retrain": ("L2 to Retrain", "{:.3f}"),
    "agreement_with_retrain": ("agreement with Retrain", "{:.4f}"),
    "seconds": ("wall time (s)", "{:.2f}"),
    "speedup_vs_retrain": ("speed-up vs Retrain", "{:.1f}x"),
}


def summarise(seeds: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation over seeds, per method and metric."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in METHODS:
        out[method] = {}
        for metric in METRICS:
            if metric not in seeds[0]["metrics"][method]:  # e.g. LiRA without shadow models
                continue
            mean, std = mean_std([s["metrics"][method][metric] for s in seeds])
            out[method][metric] = {"mean": mean, "std": std}
    return out


def targets(
    summary: dict[str, dict[str, dict[str, float]]], cold_teacher_s: float | None = None
) -> list[dict[str, Any]]:
    """The targets of the CLIP-Adapter method, measured against Retrain (points are percentage points)."""
    m, r = summary["kd-clip"], summary["retrain"]
    unlearning_s = m["seconds"]["mean"]
    retrain_s = r["seconds"]["mean"]
    noise = 2 * math.hypot(m["mia_advantage"]["std"], r["mia_advantage"]["std"])
    rows = [
        ("unlearning wall time <= 1/50 of Retrain (teacher fitted ahead, as federate does)",
         _ratio(unlearning_s, retrain_s), unlearning_s <= retrain_s / 50),
    ]  # fmt: skip
    if cold_teacher_s is not None:
        rows.append(
            ("... including a cold teacher fit", _ratio(cold_teacher_s, retrain_s), cold_teacher_s <= retrain_s / 50)
        )
    rows += [
        ("test accuracy >= Retrain - 0.5 pt", f"{100 * (m['test_accuracy']['mean'] - r['test_accuracy']['mean']):+.2f} pt",
         m["test_accuracy"]["mean"] >= r["test_accuracy"]["mean"] - 0.005),
        ("backdoor ASR <= Retrain + 1.0 pt", f"{100 * (m['backdoor_asr']['mean'] - r['backdoor_asr']['mean']):+.2f} pt",
         m["backdoor_asr"]["mean"] <= r["backdoor_asr"]["mean"] + 0.01),
        ("MIA advantage within noise of Retrain (2 sd)", f"{m['mia_advantage']['mean'] - r['mia_advantage']['mean']:+.3f} (2 sd {noise:.3f})",
         abs(m["mia_advantage"]["mean"] - r["mia_advantage"]["mean"]) <= noise),
    ]  # fmt: skip
    if "lira_auc" in m:
        o = summary["original"]
        rows += [
            ("calibrated attack has power: Original's LiRA AUC >= 0.60", f"{o['lira_auc']['mean']:.3f}",
             o["lira_auc"]["mean"] >= 0.60),
            ("unlearned LiRA AUC within 0.03 of Retrain's", f"{m['lira_auc']['mean'] - r['lira_auc']['mean']:+.3f}",
             abs(m["lira_auc"]["mean"] - r["lira_auc"]["mean"]) <= 0.03),
        ]  # fmt: skip
    return [{"target": t, "measured": v, "met": bool(ok)} for t, v, ok in rows]


def _setting(cfg: dict[str, Any], seeds: Sequence[dict[str, Any]]) -> str:
    """The run's setting in one sentence: participation, deletions, the membership attacks."""
    parts = [
        f"clients per round: {cfg.get('clients_per_round') or 'all'}",
        f"deletions: {len(seeds[0].get('targets', [seeds[0]['target_client']]))} "
        f"({', '.join(seeds[0].get('targets', [seeds[0]['target_client']]))} in seed {seeds[0]['seed']}), "
        "each from the previous one's result; Retrain leaves all of them out",
        f"target: {seeds[0]['target_examples']} examples"
        + (f", {cfg['target_local_epochs']} local epochs" if cfg.get("target_local_epochs") else ""),
        "MIA: loss threshold (Yeom et al.)"
        + (f" and offline LiRA with {cfg['mia_shadows']} shadow federations" if cfg.get("mia_shadows") else ""),
    ]
    return "Setting: " + "; ".join(parts) + "."


def _ratio(part: float, whole: float) -> str:
    """``part`` as a fraction of ``whole``: '1/83' or, when larger, '2.4x'."""
    return f"1/{whole / part:.0f}" if part < whole else f"{part / whole:.1f}x"


def render_markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    cfg = result["config"]
    lines = [
        f"# Unlearning evaluation: {cfg['dataset']}, {cfg['clients']} clients, {cfg['rounds']} rounds, {cfg['seeds']} seeds",
        "",
        f"Target client: the one with the most data unless set (per seed: {', '.join(s['target_client'] for s in result['seeds'])}); "
        f"{int(100 * cfg['backdoor_fraction'])}% of its examples carry a {cfg['trigger_size']}x{cfg['trigger_size']} trigger "
        f"relabelled to class {cfg['backdoor_target_class']}. Teacher: CLIP-Adapter, preset {cfg['teacher_preset']}. "
        f"Mean ± standard deviation over seeds.",
        "",
        _setting(cfg, result["seeds"]),
        "",
        "| method | "
        + " | ".join(label for metric, (label, _) in METRICS.items() if metric in summary["original"])
        + " |",
        "|---|" + "---|" * len([m for m in METRICS if m in summary["original"]]),
    ]
    for method in METHODS:
        cells = []
        for metric, (_, fmt) in METRICS.items():
            if metric not in summary[method]:
                continue
            v = summary[method][metric]
            cells.append(f"{fmt.format(v['mean'])} ± {fmt.format(v['std']).rstrip('x')}")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    teacher = [s["teacher"]["test_accuracy"] for s in result["seeds"]]
    mean, std = mean_std(teacher)
    lines += [
        "",
        f"Teacher's own test accuracy (the ceiling KD can restore; {int(result['seeds'][0]['teacher']['test_examples'])} test images): "
        f"{mean:.4f} ± {std:.4f}; few-shot validation accuracy "
        f"{mean_std([s['teacher']['val_accuracy'] for s in result['seeds']])[0]:.4f}.",
        "",
        "## Targets (Subtract + KD with the CLIP-Adapter teacher vs Retrain)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    lines += ["", "![metrics](metrics.png)", "", "![accuracy per round](accuracy_per_round.png)", ""]
    return "\n".join(lines)


def plot_metrics(result: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    summary = result["summary"]
    shown = [m for m in METRICS if m != "speedup_vs_retrain" and m in summary["original"]]
    fig, axes = plt.subplots(2, (len(shown) + 1) // 2, figsize=(4 * ((len(shown) + 1) // 2), 7))
    colours = ["#4c72b0", "#55a868", "#c44e52", "#937860", "#8172b2", "#dd8452", "#da8bc3"]
    for ax, metric in zip(axes.flat, shown):
        means = [summary[m][metric]["mean"] for m in METHODS]
        stds = [summary[m][metric]["std"] for m in METHODS]
        ax.bar(range(len(METHODS)), means, yerr=stds, color=colours, capsize=3)
        ax.set_xticks(range(len(METHODS)), [m for m in METHODS], rotation=30, fontsize=8)
        ax.set_title(METRICS[metric][0], fontsize=10)
        if metric == "seconds":
            ax.set_yscale("log")
    fig.suptitle(
        f"{result['config']['dataset']}: unlearning vs retraining (mean ± sd over {len(result['seeds'])} seeds)"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_per_round(result: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in (("original", "#4c72b0"), ("retrain", "#55a868")):
        curves = np.array([s["accuracy_per_round"][name] for s in result["seeds"]])
        rounds = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(
            rounds,
            mean,
            marker="o",
            color=colour,
            label="Original (all clients)" if name == "original" else "Retrain (without target)",
        )
        ax.fill_between(rounds, mean - std, mean + std, color=colour, alpha=0.2)
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_finite(value: Any) -> bool:
    """Whether every number in a (nested) result is finite."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True
