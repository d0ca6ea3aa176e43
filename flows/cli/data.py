"""``fedforget prepare``: validate params and raw data, then reproduce (and push) the DVC stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.app import ProfileOpt, UsageError, app, out, quiet, run_verb


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run DVC with this interpreter's scripts first on PATH (stage commands use them)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], check=False, cwd=root, env=env, text=True, capture_output=True
    )


def _ensure_remote_bucket(root: Path, remote: str | None) -> None:
    """DVC does not create buckets: create the S3 remote's bucket if it is missing."""
    listed = _dvc(root, "remote", "list")
    remotes = dict(line.split()[:2] for line in listed.stdout.splitlines() if len(line.split()) >= 2)
    if remote is None:
        default = _dvc(root, "remote", "default").stdout.strip()
        remote = default or None
    url = remotes.get(remote or "", "")
    if url.startswith("s3://"):
        from components.lineage.store import S3Store

        S3Store(url[len("s3://") :].split("/", 1)[0])._ensure_bucket()


def stage_name(profile: str) -> str:
    """The dvc.yaml stage that prepares ``profile``'s data."""
    return "prepare" if profile == "default" else f"prepare_{profile}"


def prepare_data(profile: str, use_dvc: bool = True, push: bool = True) -> dict[str, Any]:
    """Validate params and raw data, then reproduce the DVC stage (and push it)."""
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.data.layout import FEDERATION_DIR, SERVER_DIR, dvc_dir_hash
    from components.data.prepare import check, client_models, prepare

    runtime = Runtime.from_env()
    config = load_config(runtime.params_path, profile)  # every section, not just data
    raw = check(config.data, runtime.raw_dir)  # fails before DVC deletes any old output
    out_dir = runtime.data_dir(profile)
    dvc_used = use_dvc and (runtime.root / ".dvc").is_dir() and (runtime.root / "dvc.yaml").is_file()
    if dvc_used:
        result = _dvc(runtime.root, "repro", stage_name(profile))
        if result.returncode != 0:
            raise UsageError(
                f"`dvc repro {stage_name(profile)}` failed:\n{result.stderr.strip() or result.stdout.strip()}"
            )
        if push:
            remote = os.environ.get("FEDFORGET_DVC_REMOTE") or None
            _ensure_remote_bucket(runtime.root, remote)
            pushed = _dvc(runtime.root, "push", *(["-r", remote] if remote else []), stage_name(profile))
            if pushed.returncode != 0:
                raise UsageError(f"`dvc push` failed:\n{pushed.stderr.strip() or pushed.stdout.strip()}")
    else:  # what the DVC stage runs, in process
        prepare(config.data, out_dir, raw, client_models(runtime.params_path, profile, config.data, raw))
    meta = json.loads((out_dir / FEDERATION_DIR / "meta.json").read_text())
    return {
        "profile": profile,
        "dataset": meta["dataset"],
        "clients": len(meta["clients"]),
        "label_skew": meta["label_skew"],
        "test": meta["test"]["num_examples"],
        "data_dir": str(out_dir),
        "data_version": dvc_dir_hash(out_dir / FEDERATION_DIR),
        "server_data_version": dvc_dir_hash(out_dir / SERVER_DIR),
        "dvc": dvc_used,
    }


@app.command()
def prepare(
    profile: ProfileOpt = "default",
    dvc: Annotated[bool, typer.Option(help="run through DVC (dvc repro + dvc push)")] = True,
    push: Annotated[
        bool, typer.Option(help="push the data to the DVC remote ($FEDFORGET_DVC_REMOTE, else DVC's default)")
    ] = True,
) -> None:
    """Prepare the data: client shards, test set and few-shot server set under data/<profile>/."""
    quiet(False)
    summary = run_verb(prepare_data, profile, dvc, push)
    out.print(
        f"prepared [bold]{summary['dataset']}[/bold] ({summary['profile']}): {summary['clients']} clients "
        f"(label skew {summary['label_skew']:.2f}), {summary['test']} test examples -> {summary['data_dir']}\n"
        f"data version {summary['data_version']}" + ("" if summary["dvc"] else " (without DVC)")
    )
