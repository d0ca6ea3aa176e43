"""Prefect flow ``audit``: what is in a model version, verified against the archive.

The lineage comes from the registry's tags and the archived manifests alone.
The report (Markdown, lineage graph, JSON) is written to a folder and logged
to MLflow as the artifacts of an audit run tagged with the audited version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.audit.audit import AuditReport, ServedWeights, audit
from components.config.runtime import Runtime
from components.config.sections import load_config, registered_model_profiles
from components.lineage.store import open_store
from components.lineage.tags import audit_run_tags
from components.unlearning.tombstones import validate_client_id
from flows.reports.audit import plot_lineage, render_markdown
from flows.tracking import Tracker


class AuditTargetError(ValueError):
    """The version or alias to audit does not exist."""


@task(name="verify-lineage", cache_policy=NO_CACHE)
def verify_task(
    store_url: str, version: str, tags: dict[str, str], index: dict[str, dict[str, str]], client: str | None,
    model: str | None = None, served_weights: ServedWeights | None = None,
) -> AuditReport:  # fmt: skip
    return audit(open_store(store_url), version, tags, index, client, model, served_weights)


@task(name="render-report", cache_policy=NO_CACHE)
def render_task(report: AuditReport, out_dir: str) -> dict[str, str]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    graph = plot_lineage(report, folder / "lineage.png")
    markdown = folder / "audit.md"
    markdown.write_text(render_markdown(report, graph.name))
    data = folder / "audit.json"
    data.write_text(report.to_json() + "\n")
    return {"markdown": str(markdown), "graph": str(graph), "json": str(data)}


@task(name="log-audit", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def log_task(tracker: Tracker, report: AuditReport, files: dict[str, str]) -> str:
    tags = audit_run_tags(
        version=report.version, verdict=report.verdict, findings=len(report.findings), client=report.client
    )
    run_id = tracker.start_run(f"audit-v{report.version}", tags=tags)
    for path in files.values():
        tracker.log_file(run_id, path, "audit")
    tracker.log_metrics(run_id, {"objects_checked": len(report.objects), "findings": len(report.findings)}, step=0)
    tracker.end_run(run_id)
    return run_id


@flow(name="audit")
def audit_flow(
    version: str | None = None,
    alias: str | None = None,
    client: str | None = None,
    profile: str = "default",
    out_dir: str | None = None,
    project: str | None = None,
) -> dict[str, Any]:
    """Audit a version (default: the champion); optionally answer whether ``client`` is in it."""
    logger = get_run_logger()
    if version and alias:
        raise AuditTargetError("give --version or --alias, not both")
    if client is not None:
        validate_client_id(client)
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile)
    tracker = Tracker(runtime, config.registry)
    versions = tracker.versions()
    by_number = {v.version: v for v in versions}
    if version:
        target = by_number.get(str(version))
        what = f"version {version}"
    else:
        target = tracker.alias(alias)
        what = f"alias {alias or config.registry.champion_alias!r}"
    if target is None:
        raise AuditTargetError(tracker.missing(what, registered_model_profiles(runtime.params_path)))
    index = {v.tags["manifest_key"]: {**v.tags, "_version": v.version} for v in versions if "manifest_key" in v.tags}
    served = partial(tracker.served_weights, target.version)  # what the registry serves, bound to the archive
    report = verify_task(
        runtime.store, target.version, dict(target.tags), index, client, tracker.registry.model_name, served
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder = out_dir or _fresh_folder(
        runtime.state_dir / "audits" / f"{config.registry.model_name}-v{target.version}-{stamp}"
    )
    files = render_task(report, folder)
    run_id = log_task(tracker, report, files)
    logger.info("audit of version %s: %s, %d findings", target.version, report.verdict, len(report.findings))
    return {"report": report.to_dict(), "exit_code": report.exit_code(), "files": files, "run_id": run_id}


def _fresh_folder(base: Path) -> str:
    """``base``, or ``base-2``, ``base-3``... : a second audit in the same second keeps the first's report."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)
