"""Rendering an audit: Markdown report, lineage graph (PNG), JSON (see components/audit/schemas/)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from components.audit.audit import AuditReport

VERDICTS = {
    "verified": "every archived object and tag checked out",
    "client_absent": "the client's contributions are absent, and every check passed",
    "client_present": "the client's contributions are PRESENT in this version",
    "findings": "FINDINGS: some claims cannot be verified (see Findings)",
}


def report_schema() -> dict[str, Any]:
    """The JSON schema that ``fedforget audit --json`` output follows."""
    return json.loads(resources.files("components.audit").joinpath("schemas/audit-report.schema.json").read_text())


def _short(value: str | None, n: int = 12) -> str:
    return "-" if not value else (value if len(value) <= n else value[:n] + "…")


def _decision_row(node: Any) -> str:
    d = node.decisions
    # soft labels record the grouping mode as a string next to groups and picks; other rules nest them
    grouping = d.get("grouping") if isinstance(d.get("grouping"), Mapping) else {}
    groups = d.get("groups") or grouping.get("groups")
    thresholds = d.get("thresholds")
    dp = d.get("dp")
    picks = d.get("picks") or grouping.get("picks")

    def show(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, Mapping):
            return ", ".join(f"{k}: {_number(v)}" for k, v in value.items()) or "-"
        if isinstance(value, list):
            return " / ".join(show(v) if isinstance(v, list) else _number(v) for v in value) or "none"
        return _number(value)

    dp_cell = f"{dp['noise_std']:.3g}, {show(dp.get('clipped'))}" if dp else "-"
    return (
        f"| {node.server_round} | {node.version or 'unregistered'} | {node.method or '-'} | {show(groups)} | "
        f"{show(d.get('scores'))} | {show(d.get('excluded')) if 'excluded' in d else '-'} | {show(thresholds)} | "
        f"{dp_cell} | {show(picks)} |"
    )


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: AuditReport, graph_file: str | None = "lineage.png") -> str:
    data = report.to_dict()
    lines = [
        f"# Audit of model version {report.version} ({report.version_kind})",
        "",
        f"Generated {report.generated_at}. Verdict: **{data['verdict']}**: {VERDICTS[data['verdict']]}.",
        "",
    ]
    if report.client is not None:
        lines += [
            f"**Client `{report.client}`: {'PRESENT' if report.client_present else 'absent'}** "
            "(decided from the lineage: it trained in a round that no later deletion removed; "
            "cross-checked with the version's running-sum index).",
            "",
        ]
    lines += [
        f"- Clients whose contributions are in this version: {', '.join(report.present_clients) or 'none'}",
        f"- Forgotten (tombstoned) clients in the store: {', '.join(report.tombstoned_clients) or 'none'}",
        f"- Archived objects checked: {data['objects']['checked']} (ok {data['objects']['ok']}, purged "
        f"{data['objects']['purged']}, retired {data['objects']['retired']}, dropped by retention "
        f"{data['objects']['dropped']}, missing {data['objects']['missing']}, "
        f"changed {data['objects']['mismatch']})",
        f"- Retired versions (weights deleted because their lineage holds a forgotten client): "
        f"{', '.join(report.retired_versions) or 'none'}",
        "",
    ]
    if graph_file:
        lines += [f"![lineage]({graph_file})", ""]
    lines += [
        "## Lineage (newest first)",
        "",
        "| step | version | round | federation | clients (examples, weight) | data version |",
        "|---|---|---|---|---|---|",
    ]
    for node in report.nodes:
        if node.deletion:
            d = node.deletion
            what = (f"deletion of **{d['client_id']}** ({d.get('guarantee', 'unrecorded')}, {d['variant']}, "
                    f"teacher {d['teacher']})")  # fmt: skip
        else:
            what = ", ".join(
                f"{c['client_id']} ({c['num_examples']}, {c['weight']:.3f}{_model(c.get('model'))}{_mode(c)})"
                for c in node.clients
            )
        flag = (
            f" ⚠ contains forgotten {', '.join(node.contains_forgotten_clients)}"
            if node.contains_forgotten_clients
            else ""
        )
        lines.append(
            f"| {node.kind} | {node.version or 'unregistered'}{flag} | {node.server_round} | "
            f"{_short(node.federation_id, 26)} | {what} | {_short(node.data_version)} |"
        )
    decided = [n for n in report.nodes if n.decisions]
    if decided:
        lines += [
            "",
            "## Round decisions (the server step's record)",
            "",
            "| round | version | method | groups | scores | excluded | thresholds | DP noise std, clipped | "
            "soft-label picks |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_decision_row(n) for n in decided]
    lines += ["", "## Deletions applied", ""]
    if report.deletions:
        lines += [
            "| request | time | client | guarantee | variant | source version | teacher run | data version |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in report.deletions:
            lines.append(
                f"| {d['request_id']} | {d['time']} | {d['client_id']} | {d.get('guarantee', 'unrecorded')} | "
                f"{d['variant']} | {d['source_version']} | "
                f"{_short(d['teacher_run_id'])} | {_short(d['data_version'])} |"
            )
    else:
        lines.append("None in this lineage.")
    lines += ["", "## Findings", ""]
    lines += [f"- **{f.kind}**: {f.message}" for f in report.findings] or ["None."]
    titles = (("purged", "Purged objects (by deletion requests)"), ("retired", "Retired states"),
              ("dropped", "Dropped by retention (history.retention: sums)"))  # fmt: skip
    for status, title in titles:
        gone = [c for c in report.objects if c.status == status]
        if gone:
            lines += [
                "",
                f"## {title}",
                "",
                f"| object | recorded sha256 | record's sha256 | {'reason' if status == 'dropped' else 'request'} |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {c.key} | {_short(c.sha256, 16)} | {_short(c.tombstone_sha256, 16)} | {c.purged_by} |" for c in gone
            ]
    return "\n".join(lines) + "\n"


def plot_lineage(report: AuditReport, path: str | Path) -> Path:
    """Versions as nodes (oldest at the top), rounds and deletions as edges."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = list(reversed(report.nodes))  # oldest first
    labels = ["initial model"] + [f"v{n.version or '?'}" + (" (unlearned)" if n.deletion else "") for n in steps]
    edges = [
        f"delete {n.deletion['client_id']}" if n.deletion else f"round {n.server_round}: {len(n.clients)} clients"
        for n in steps
    ]
    height = max(2.5, 0.75 * len(labels))
    fig, ax = plt.subplots(figsize=(6.5, height))
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.5, len(labels) - 0.5)
    ax.invert_yaxis()
    ax.axis("off")
    for i, label in enumerate(labels):
        node = steps[i - 1] if i else None
        face = "#f6d5d5" if node is not None and node.deletion else "#d9e6f5"
        edge = "#d9822b" if node is not None and node.contains_forgotten_clients else "#35527a"
        ax.text(3, i, label, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": face, "ec": edge, "lw": 2 if edge == "#d9822b" else 1})  # fmt: skip
        if node is not None and node.contains_forgotten_clients:
            ax.text(
                5.2,
                i,
                "contains " + ", ".join(node.contains_forgotten_clients),
                va="center",
                fontsize=7,
                color="#d9822b",
            )
        if i:
            ax.annotate("", xy=(3, i - 0.28), xytext=(3, i - 0.72), arrowprops={"arrowstyle": "->", "color": "#555"})
            ax.text(
                3.25,
                i - 0.5,
                edges[i - 1],
                va="center",
                fontsize=7,
                color="#b03030" if steps[i - 1].deletion else "#333",
            )
    ax.set_title(f"Lineage of version {report.version}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mode(client: dict[str, Any]) -> str:
    """A few-shot client's fine-tuning mode and device profile (nothing for the other protocols)."""
    if not client.get("mode"):
        return ""
    return f", {client['mode']}" + (f" on {client['device']}" if client.get("device") else "")


def _model(spec: dict[str, Any] | None) -> str:
    """A heterogeneous client's own model, as the lineage table shows it (nothing for the global one)."""
    if not spec:
        return ""
    args = {k: v for k, v in spec.get("args", {}).items() if k not in ("num_classes", "in_channels", "image_size")}
    return f", {spec.get('name')} {args}" if args else f", {spec.get('name')}"
