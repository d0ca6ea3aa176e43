"""Tables and plain-text output of the verbs (presentation only)."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from flows.cli.app import out


def rounds_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"federation {summary['federation_id']}")
    for column in ("round", "clients", "test acc", "test loss", "round s", "version"):
        table.add_column(column, justify="right")
    for row in summary["rounds"]:
        table.add_row(
            str(int(row["round"])),
            str(int(row["clients"])),
            f"{row['test_accuracy']:.4f}",
            f"{row['test_loss']:.4f}",
            f"{row['round_s']:.1f}",
            row["version"],
        )
    return table


def unlearn_table(result: dict[str, Any]) -> Table:
    m = result["metrics"]
    table = Table(title=f"forgot {result['client_id']}: version {result['source_version']} -> {result['version']}")
    table.add_column("")
    table.add_column("test accuracy", justify="right")
    table.add_column(f"accuracy on {result['client_id']}'s data", justify="right")
    rows = [("before (source version)", "before"), ("after subtraction", "forgotten"), ("after recovery", "after")]
    for label, suffix in rows:
        client_acc = m.get(f"forgotten_client_accuracy_{suffix}")
        table.add_row(label, f"{m[f'test_accuracy_{suffix}']:.4f}", "-" if client_acc is None else f"{client_acc:.4f}")
    return table


def out_console_json(data: dict[str, Any]) -> None:
    # Plain print: rich would wrap long lines of machine-readable output.
    print(json.dumps(data, indent=2, sort_keys=True))


def print_audit(report: dict[str, Any], result: dict[str, Any]) -> None:
    from flows.reports.audit import VERDICTS

    out.print(f"[bold]version {report['version']}[/bold] ({report['version_kind']}): {VERDICTS[report['verdict']]}")
    if report["client"] is not None:
        c = report["client"]
        out.print(f"client {c['client_id']}: {'[red]PRESENT[/red]' if c['present'] else '[green]absent[/green]'}")
    table = Table(title="lineage (newest first)")
    for column in ("step", "version", "round", "clients / deletion", "flags"):
        table.add_column(column)
    for node in report["lineage"]:
        if node["deletion"]:
            what = f"deleted {node['deletion']['client_id']} (request {node['deletion']['request_id']})"
        else:
            what = ", ".join(f"{c['client_id']}:{c['weight']:.2f}" for c in node["clients"])
        flags = (
            ("contains forgotten " + ",".join(node["contains_forgotten_clients"]))
            if node["contains_forgotten_clients"]
            else ""
        )
        table.add_row(node["kind"], node["version"] or "-", str(node["server_round"]), what, flags)
    out.print(table)
    o = report["objects"]
    out.print(
        f"objects: {o['checked']} checked, {o['ok']} ok, {o['purged']} purged, {o['retired']} retired, "
        f"{o['missing']} missing, {o['mismatch']} changed"
    )
    for finding in report["findings"]:
        out.print(f"[red]finding[/red] {finding['kind']}: {finding['message']}")
    out.print(f"report: {result['files']['markdown']} (logged to MLflow run {result['run_id']})")
