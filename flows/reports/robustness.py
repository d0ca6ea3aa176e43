"""The Markdown table and plots of the ``robustness`` suite (see components/evaluation/robustness.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STRATEGY_LABELS = {
    "fedavg": "FedAvg",
    "median": "Median",
    "trimmed-mean": "Trimmed mean",
    "krum": "Multi-Krum",
    "fltrust": "FLTrust",
    "credit": "Credit",
}


def _label(strategy: str, sigma: float | None = None) -> str:
    name = STRATEGY_LABELS.get(strategy, strategy)
    return name if sigma is None else f"{name} + DP (σ={sigma:g})"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(result: dict[str, Any]) -> str:
    """The results table with the profile and grid it was measured on, forgetting, and the issue's targets."""
    cfg = result.get("config", {})
    model = cfg.get("model", {})
    lines = [
        f"# Robust and private aggregation under attack: {cfg.get('dataset', '?')}, {cfg.get('clients', '?')} "
        f"clients, {cfg.get('rounds', '?')} rounds, {cfg.get('seeds', '?')} seed(s)",
        "",
        f"Profile: `{cfg.get('profile', '?')}`; Dirichlet alpha {cfg.get('alpha', '?')}, at most "
        f"{cfg.get('max_train_examples') or 'all'} training examples; model {model.get('name', '?')} "
        f"{model.get('args', {})}; the server's set (FLTrust): {cfg.get('server_set', '?')} labelled examples per "
        "class.",
        "",
        f"Grid: strategies {', '.join(cfg.get('strategies', []))} × attacks {', '.join(cfg.get('attacks', []))} × "
        f"malicious fractions {cfg.get('fractions', [])} (fraction 0: no attack), plus central DP around credit "
        f"(no attack) at σ ∈ {cfg.get('sigmas', [])}, clipping norm {cfg.get('clipping_norm', '?')}, "
        f"δ = {cfg.get('dp_delta', '?')}. Attack settings: scaling ×{cfg.get('scaling_factor', '?')}, gaussian std "
        f"{cfg.get('gaussian_std', '?')}, backdoor on {_pct(cfg.get('backdoor_fraction'))} of an attacker's images "
        f"(a {cfg.get('trigger_size', '?')}px trigger → class {cfg.get('target_class', '?')}). Strategy settings: "
        f"trimmed mean β = {cfg.get('trimmed_beta', '?')}, Multi-Krum tolerates {_pct(cfg.get('krum_fraction'))} "
        f"of the clients (and so always leaves that many out), credit with {cfg.get('credit_groups', '?')} groups, "
        f"FLTrust's server update {cfg.get('server_epochs', '?')} epochs.",
        "",
        f"Federated split learning (`splitfed`, the model cut after {cfg.get('split_cut', '?')} stage(s)): "
        f"{_splitfed_runs(cfg.get('splitfed', []))}. "
        "Its bytes are what crosses the link: activations and labels per batch and the client part once, up; "
        "the activations' gradients and the client part, down. The weight protocol uploads the model's delta "
        "and downloads the model.",
        "",
        "Test accuracy of the global model (mean ± sd over seeds). Backdoor ASR: triggered test images (true class ≠ "
        "target) classified as the target class; without a backdoor attacker it is the baseline rate. Excluded: "
        "the share of malicious / benign client-rounds given weight 0 (– for rules that exclude nobody). ε: "
        "(ε, δ)-DP after all rounds (Opacus RDP, every client every round). Bytes: what all clients upload per round.",
        "",
        "| protocol | strategy | attack | malicious | test accuracy | backdoor ASR | malicious excluded | "
        "benign excluded | ε | upload bytes / round | download bytes / round | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        down = r.get("download_bytes_per_round")
        lines.append(
            f"| {r['protocol']} | {_label(r['strategy'], r['sigma'])} | {r['attack']} | {_pct(r['malicious_fraction'])} | "
            f"{r['test_accuracy']:.4f} ± {r['test_accuracy_sd']:.4f} | {_pct(r['backdoor_asr'])} | "
            f"{_pct(r['malicious_excluded_rate'])} | {_pct(r['benign_excluded_rate'])} | {_num(r['epsilon'])} | "
            f"{r['bytes_per_round'] / 1024:,.1f} KiB | {'–' if down is None else f'{down / 1024:,.1f} KiB'} | "
            f"{r['seeds']} |"
        )
    curve = result.get("accuracy_epsilon") or []
    if curve:
        lines += ["", "## Accuracy against epsilon (credit + central DP, no attack)", "",
                  "| σ | ε | test accuracy |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {p['sigma']:g} | {_num(p['epsilon'])} | {p['test_accuracy']:.4f} |" for p in curve]
        lines += ["", "σ = 0 clips without noise: no privacy guarantee (ε = ∞), shown as –."]
    f = result.get("forgetting")
    if f:
        lines += [
            "",
            f"## Forgetting the backdoor attackers ({_label(f['strategy'])}, {f['attack']}, "
            f"{_pct(f['malicious_fraction'])} malicious)",
            "",
            f"All {f['forgotten_clients']:g} attacker(s) forgotten one after another, each deletion subtracting "
            "exactly what the strategy applied for that client (its running sum of weight × delta), against "
            "retraining the same strategy without them. Largest gap between the original model and its initial "
            f"state plus every client's running sum: {f.get('attribution_error', float('nan')):.2e} (0 up to "
            "floating point: the attribution is exact). Subtraction alone, without recovery training.",
            "",
            "| model | test accuracy | backdoor ASR |",
            "|---|---|---|",
        ]
        for name, label in (("original", "original (attackers in)"), ("forgotten", "attackers forgotten"),
                            ("retrain", "retrained without the attackers")):  # fmt: skip
            lines.append(f"| {label} | {f[f'{name}_test_accuracy']:.4f} | {_pct(f[f'{name}_asr'])} |")
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    lines += ["", "![accuracy by malicious fraction](accuracy_by_fraction.png)", "",
              "![accuracy against epsilon](accuracy_epsilon.png)", ""]  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """Test accuracy against the malicious fraction (one panel per attack), and accuracy against epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result["rows"] if r["sigma"] is None]
    attacks = [a for a in dict.fromkeys(r["attack"] for r in rows) if a != "none"] or ["none"]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for strategy in strategies:
            points = sorted(
                (r["malicious_fraction"], r["test_accuracy"])
                for r in rows
                if r["strategy"] == strategy and r["attack"] in (attack, "none")
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=_label(strategy))
        ax.set(xlabel="malicious fraction", ylabel="test accuracy", title=attack, ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    by_fraction = folder / "accuracy_by_fraction.png"
    fig.savefig(by_fraction, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    curve = [p for p in result.get("accuracy_epsilon") or [] if p["epsilon"] is not None]
    if curve:
        ax.plot([p["epsilon"] for p in curve], [p["test_accuracy"] for p in curve], marker="o", label="credit + DP")
        for p in curve:
            ax.annotate(f"σ={p['sigma']:g}", (p["epsilon"], p["test_accuracy"]), fontsize=8)
    clean = [p for p in result.get("accuracy_epsilon") or [] if p["epsilon"] is None]
    for p in clean:
        ax.axhline(p["test_accuracy"], linestyle="--", color="grey", label=f"σ={p['sigma']:g} (clipping only)")
    ax.set(xlabel="ε", ylabel="test accuracy", title="Accuracy against ε (no attack)")
    if curve or clean:
        ax.legend(fontsize=8)
    fig.tight_layout()
    epsilon = folder / "accuracy_epsilon.png"
    fig.savefig(epsilon, dpi=110)
    plt.close(fig)
    return [by_fraction, epsilon]


def _splitfed_runs(runs: list[list[Any]]) -> str:
    """The splitfed runs of the profile, e.g. "credit (no attack), credit (label-flip at 0.2)"."""
    if not runs:
        return "none in this profile"
    return ", ".join(f"{s} ({f'{a} at {f:g}' if a else 'no attack'})" for s, a, f in runs)
