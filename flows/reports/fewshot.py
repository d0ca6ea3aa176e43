"""The ``fewshot`` suite's Markdown table and convergence plots (see components/evaluation/fewshot.py).

``result`` is ``summarise(seed_results)`` plus ``config`` (the settings'
``record()`` with ``profile`` and ``seeds``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.evaluation.fewshot import FEDERATED

COLUMNS = {
    "client_accuracy_mean": ("client acc. (mean)", "{:.4f}"),
    "client_accuracy_min": ("client acc. (min)", "{:.4f}"),
    "test_accuracy": ("test acc.", "{:.4f}"),
    "rounds_to_plateau": ("rounds to plateau", "{:.1f}"),
    "client_compute_s": ("client compute (s)", "{:.3f}"),
}
PANELS = {
    "client_accuracy_mean": "mean client accuracy (own held-out)",
    "test_accuracy": "global test accuracy",
    "global_loss": "global loss (clients' data)",
    "client_loss_mean": "mean client loss (after local training)",
    "drift_mean": "client drift ||Δi − mean Δ||",
    "update_norm": "update norm",
    "grad_dissimilarity": "gradient dissimilarity B²",
}
COLOURS = {"linear-probe": "#4c72b0", "full": "#c44e52", "meta": "#55a868", "per-device": "#8172b2",
           "local-only": "#dd8452", "zero-shot": "#937860"}  # fmt: skip


def _cell(value: Mapping[str, float] | None, fmt: str) -> str:
    if value is None:
        return "n/a"
    return f"{fmt.format(value['mean'])} ± {fmt.format(value['sd'])}"


def _row_stat(row: Mapping[str, Any], name: str) -> dict[str, float] | None:
    """A row's ``name`` (the mean) and ``<name>_sd`` as the ``{mean, sd}`` a cell shows."""
    return None if row[name] is None else {"mean": row[name], "sd": row[f"{name}_sd"]}


def render_markdown(result: Mapping[str, Any]) -> str:
    """The rows table (profile stated above it), the targets and forgetting against retraining."""
    cfg = result.get("config", {})
    teacher, local = cfg.get("teacher", {}), cfg.get("local", {})
    seeds = max((r["seeds"] for r in result["rows"]), default=0)
    lines = [
        f"# Few-shot federated fine-tuning: {cfg.get('dataset', '?')}, {cfg.get('num_clients', '?')} clients, "
        f"{cfg.get('rounds', '?')} rounds, {seeds} seed(s)",
        "",
        f"Profile **{cfg.get('profile', '?')}**: Dirichlet alpha {cfg.get('alpha', '?')}, k labelled examples per class "
        f"per client (the remainder is the client's held-out split), tower `{teacher.get('preset', '?')}` at "
        f"{teacher.get('image_size') or 'default'} px; device profiles in turn {', '.join(cfg.get('profiles', []))} "
        f"(weak: linear-probe, medium: meta, strong: full); local: {local.get('steps', '?')} steps at lr "
        f"{local.get('lr', '?')}, meta {local.get('meta_algorithm', '?')} {local.get('meta_steps', '?')}x"
        f"{local.get('inner_steps', '?')} (inner lr {local.get('inner_lr', '?')}, meta lr {local.get('meta_lr', '?')}, "
        f"adapted in {local.get('adapt_steps', '?')} steps). Mean ± sd over seeds; n/a where a field does not apply.",
        "",
        "| method | k | " + " | ".join(label for label, _ in COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in result["rows"]:
        cells = [_cell(_row_stat(row, name), fmt) for name, (_, fmt) in COLUMNS.items()]
        lines.append(f"| {row['method']} | {row['shots']} | " + " | ".join(cells) + " |")
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    if result.get("forgetting"):
        lines += [
            "",
            "## Forgetting the largest client against retraining without it",
            "",
            "Subtraction of its running sum of applied contributions (exact), before any recovery by distillation.",
            "",
            "| method | k | L2 forgotten → retrain | L2 original → retrain | test acc. original / forgotten / retrain "
            "| others' acc. original / forgotten / retrain | forget (s) | retrain (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, f in result["forgetting"].items():
            test = " / ".join(_cell(f[f"{m}_test_accuracy"], "{:.3f}") for m in ("original", "forgotten", "retrain"))
            others = " / ".join(
                _cell(f[f"{m}_others_accuracy_mean"], "{:.3f}") for m in ("original", "forgotten", "retrain")
            )
            lines.append(
                f"| {method} | {f['shots']} | {_cell(f['l2_forgotten_to_retrain'], '{:.3f}')} | "
                f"{_cell(f['l2_original_to_retrain'], '{:.3f}')} | {test} | {others} | "
                f"{_cell(f['forget_s'], '{:.3f}')} | {_cell(f['retrain_s'], '{:.1f}')} |"
            )
    shots = sorted({r["shots"] for r in result["rows"]})
    lines += ["", "![client accuracy by shots](accuracy_by_shots.png)", ""]
    lines += [f"![convergence at k={k}](convergence_k{k}.png)" for k in shots if _has_curves(result, k)]
    return "\n".join(lines) + "\n"


def _has_curves(result: Mapping[str, Any], k: int) -> bool:
    return any(str(k) in result.get("curves", {}).get(m, {}) for m in FEDERATED)


def plot(result: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """``accuracy_by_shots.png`` and one ``convergence_k<k>.png`` per shot count (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        points = [(r["shots"], _row_stat(r, "client_accuracy_mean")) for r in result["rows"] if r["method"] == method]
        points = [(k, v) for k, v in points if v is not None]
        ax.errorbar([k for k, _ in points], [v["mean"] for _, v in points], yerr=[v["sd"] for _, v in points],
                    marker="o", capsize=3, label=method, color=COLOURS.get(method))  # fmt: skip
    ax.set(xlabel="labelled examples per class (k)", ylabel="mean client accuracy", title="Own held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "accuracy_by_shots.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for k in sorted({r["shots"] for r in result["rows"]}):
        if not _has_curves(result, k):
            continue
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        for ax, (name, title) in zip(axes.flat, PANELS.items()):
            for method in FEDERATED:
                curve = result["curves"].get(method, {}).get(str(k), {}).get(name)
                points = [(i + 1, p) for i, p in enumerate(curve or []) if p is not None]
                if points:
                    rounds = [r for r, _ in points]
                    mean = [p["mean"] for _, p in points]
                    sd = [p["sd"] for _, p in points]
                    ax.plot(rounds, mean, marker=".", label=method, color=COLOURS[method])
                    ax.fill_between(rounds, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                    alpha=0.15, color=COLOURS[method])  # fmt: skip
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("round")
        axes.flat[-1].axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"Convergence at k={k} (mean ± sd over seeds)")
        fig.tight_layout()
        paths.append(folder / f"convergence_k{k}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
