"""Scale benchmark: rounds of 10, 50 and 100 clients on threads and on Dask; retention; forgetting time.

Three parts, each in fresh processes (a scratch project, store and MLflow sqlite
database per federation, so peak RSS is the flow process's own):

``rounds``
    The real ``federate`` flow (Prefect tasks, streaming FedAvg, archive,
    registration) with N clients per round on the ``threads`` runner and on
    ``dask`` (a LocalCluster of 2 single-threaded worker processes). Every
    client holds the same number of examples, so client compute grows with N.
    Reported per round: wall time, client compute, the orchestration overhead
    as a share of client compute, i.e. ``(client phase wall x workers - client
    compute) / client compute`` (worker time not spent training; the first
    round, which also starts the workers, on its own), and the flow process's
    peak RSS.
``retention``
    The same federation under ``history.retention: full`` and ``sums`` (and
    ``full`` with ``history.update_dtype: float16``): archive objects and bytes
    after each round; forgetting a client from the final version under each,
    compared bit for bit; fp16's effect on the model and on exactness.
``forgetting``
    One lineage grown to 100 rounds (sums retention); forgetting a client from
    its head (lineage guard + subtraction + the forgotten state's hash) timed
    at round 10 and at round 100.

Usage::

    .venv/bin/python benchmarks/scale.py                 # the full profile (~30-40 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick --out /tmp/scale.json   # smoke test (~2 min)

Writes ``benchmarks/results/scale.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

FULL = {
    "clients": [10, 50, 100],
    "runners": ["threads", "dask"],
    "rounds": 3,
    "examples_per_client": 400,
    "local_epochs": 1,
    "retention_clients": 10,
    "retention_rounds": 6,
    "keep_rounds": 2,
    "forget_rounds": [10, 100],
    "forget_clients": 10,
    "forget_examples_per_client": 30,
}
QUICK = {
    "clients": [4, 8],
    "runners": ["threads", "dask"],
    "rounds": 1,
    "examples_per_client": 40,
    "local_epochs": 1,
    "retention_clients": 3,
    "retention_rounds": 3,
    "keep_rounds": 1,
    "forget_rounds": [2, 6],
    "forget_clients": 3,
    "forget_examples_per_client": 20,
}


def project(root: Path, clients: int, examples: int, overrides: dict[str, Any]) -> Path:
    """A scratch project: params.yaml (the repo's, resized) and its prepared data."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.pop("profiles", None)
    params["data"].update({
        "dataset": "fashion-mnist", "num_clients": clients, "alpha": 1000.0, "shots": 2,
        "min_client_examples": 5, "max_train_examples": clients * examples, "test_size": 500,
    })  # fmt: skip
    params["federate"].update({"prefit_teacher": False, "max_workers": 2, "archive_retry_delay_s": 0})
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def prepare(root: Path) -> None:
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.data.prepare import check
    from components.data.prepare import prepare as prepare_data

    runtime = Runtime.from_env(root)
    config = load_config(runtime.params_path)
    prepare_data(config.data, runtime.data_dir("default"), check(config.data, runtime.raw_dir))


def store_usage(store_dir: Path) -> dict[str, int]:
    files = [p for p in store_dir.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]
    return {"objects": len(files), "bytes": sum(p.stat().st_size for p in files)}


# --------------------------------------------------------------------------- child: one federation


def child_federate(args: argparse.Namespace) -> None:
    """Run one federation in this process; print a JSON line with its rounds and this process's peak RSS."""
    root = Path(args.project)
    prepare(root)
    from flows.federate import run_federate

    started = time.perf_counter()
    summary = run_federate(project=str(root), fresh=True, promote="always")
    wall = time.perf_counter() - started
    usage = store_usage(Path(os.environ["FEDFORGET_STORE"]))
    out = {
        "rounds": summary["rounds"],
        "wall_s": wall,
        "final_version": summary["final_version"],
        "federation_id": summary["federation_id"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "store": usage,
    }
    print("RESULT " + json.dumps(out))


def run_child(root: Path, extra_env: dict[str, str] | None = None, *command: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "FEDFORGET_PROJECT": str(root),
        "FEDFORGET_STORE": str(root / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_HOME": str(root / "prefect"),  # its own ephemeral API database: nothing shared between runs
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    proc = subprocess.run(
        [sys.executable, __file__, *command, "--project", str(root)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} in {root} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def model_mb() -> float:
    from components.config.sections import load_config
    from components.models.students import build_model

    spec = load_config(REPO / "params.yaml").model.spec(10, (28, 28))
    return sum(p.numel() * p.element_size() for p in build_model(spec).state_dict().values()) / MB


# --------------------------------------------------------------------------- part 1: rounds at scale


def part_rounds(profile: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    rows = []
    for runner in profile["runners"]:
        for clients in profile["clients"]:
            root = project(scratch / f"rounds-{runner}-{clients}", clients, profile["examples_per_client"], {
                "federate.rounds": profile["rounds"], "federate.task_runner": runner,
                "train.local_epochs": profile["local_epochs"],
            })  # fmt: skip
            result = run_child(root, None, "_federate")
            per_round = result["rounds"]
            overhead = [
                (r["train_phase_s"] * 2 - r["client_compute_s_sum"]) / r["client_compute_s_sum"] for r in per_round
            ]
            # The first round also pays for starting the workers (imports, first model build): reported
            # on its own; the steady state is the rounds after it.
            steady = overhead[1:] or overhead
            row = {
                "runner": runner,
                "clients_per_round": clients,
                "rounds": len(per_round),
                "round_s_mean": statistics.fmean(r["round_s"] for r in per_round),
                "train_phase_s_mean": statistics.fmean(r["train_phase_s"] for r in per_round),
                "client_compute_s_mean": statistics.fmean(r["client_compute_s_sum"] for r in per_round),
                "aggregate_s_mean": statistics.fmean(r["aggregate_s"] for r in per_round),
                "archive_s_mean": statistics.fmean(r["archive_s"] for r in per_round),
                "register_s_mean": statistics.fmean(r["register_s"] for r in per_round),
                "orchestration_overhead_share": statistics.fmean(steady),
                "orchestration_overhead_share_first_round": overhead[0],
                "orchestration_overhead_share_per_round": overhead,
                "peak_rss_mb": result["peak_rss_mb"],
                "archive_bytes_per_round": result["store"]["bytes"] / len(per_round),
                "test_accuracy": per_round[-1]["test_accuracy"],
            }
            rows.append(row)
            print(f"rounds: {runner:7s} {clients:4d} clients: round {row['round_s_mean']:.1f} s, overhead "
                  f"{100 * row['orchestration_overhead_share']:.1f}%, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
            shutil.rmtree(root, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- part 2: retention and fp16


def child_retention(args: argparse.Namespace) -> None:
    """One federation, the store measured after every round (a federation of one round at a time)."""
    root = Path(args.project)
    prepare(root)
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from flows.federate import run_federate

    runtime = Runtime.from_env(root)
    rounds = load_config(runtime.params_path).federate.rounds
    per_round = []
    summary: dict[str, Any] = {}
    for _ in range(rounds):  # resume from the champion each time: one lineage, measured per round
        summary = run_federate(project=str(root), rounds=1, promote="always")
        per_round.append(
            store_usage(Path(os.environ["FEDFORGET_STORE"])) | {"test_accuracy": summary["rounds"][-1]["test_accuracy"]}
        )
    print("RESULT " + json.dumps({"per_round": per_round, "final_version": summary["final_version"]}))


def forget_from(root: Path, version: str, client: str) -> dict[str, Any]:
    """Forget ``client`` from ``version`` of the scratch project at ``root`` (subtract; state and timing)."""
    os.environ.update({"FEDFORGET_PROJECT": str(root), "FEDFORGET_STORE": str(root / "store"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})  # fmt: skip
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.lineage.history import UpdateHistory
    from components.lineage.store import open_store
    from components.lineage.tags import manifest_ref_from_tags
    from components.unlearning.forget import forget_client
    from flows.tracking import Tracker

    runtime = Runtime.from_env(root)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    history = UpdateHistory(open_store(runtime.store))
    ref = manifest_ref_from_tags(tracker.version(version).tags)
    manifest = history.read_manifest(ref)
    return {
        "state": forget_client(history, ref, manifest, client).state,
        "global": history.read_state(manifest.global_state),
    }


def part_retention(profile: dict[str, Any], scratch: Path) -> dict[str, Any]:
    import torch

    settings = {
        "full": {},
        "sums": {"history.retention": "sums", "history.keep_rounds": profile["keep_rounds"]},
        "full-fp16": {"history.update_dtype": "float16"},
    }
    runs, roots = {}, {}
    for name, overrides in settings.items():
        root = project(scratch / f"retention-{name}", profile["retention_clients"], profile["examples_per_client"],
                       {"federate.rounds": profile["retention_rounds"], **overrides})  # fmt: skip
        runs[name] = run_child(root, None, "_retention")
        roots[name] = root
    forgotten = {name: forget_from(roots[name], runs[name]["final_version"], "client_01") for name in runs}
    full, sums, fp16 = forgotten["full"], forgotten["sums"], forgotten["full-fp16"]
    identical = all(torch.equal(full["state"][k], sums["state"][k]) for k in full["state"])
    max_diff = lambda a, b: max(float((a[k].double() - b[k].double()).abs().max()) for k in a)  # noqa: E731
    out = {
        "clients": profile["retention_clients"],
        "rounds": profile["retention_rounds"],
        "keep_rounds": profile["keep_rounds"],
        "per_round": {name: run["per_round"] for name, run in runs.items()},
        "forget_from_champion_bit_identical_full_vs_sums": identical,
        "fp16": {
            "archive_bytes_ratio_vs_full": runs["full-fp16"]["per_round"][-1]["bytes"]
            / runs["full"]["per_round"][-1]["bytes"],
            "final_model_max_abs_diff_vs_fp32": max_diff(fp16["global"], full["global"]),
            "forgotten_model_max_abs_diff_vs_fp32": max_diff(fp16["state"], full["state"]),
            "test_accuracy_fp32": runs["full"]["per_round"][-1]["test_accuracy"],
            "test_accuracy_fp16": runs["full-fp16"]["per_round"][-1]["test_accuracy"],
        },
    }
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- part 3: forgetting at 10 vs 100 rounds


def child_forgetting(args: argparse.Namespace) -> None:
    """Grow one lineage (sums retention) and time forgetting from its head at each checkpoint round."""
    root = Path(args.project)
    prepare(root)
    import hashlib

    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.core.serialize import state_to_bytes
    from components.lineage.history import UpdateHistory
    from components.lineage.store import open_store
    from components.lineage.tags import manifest_ref_from_tags
    from components.unlearning.forget import forget_client
    from components.unlearning.guard import present_clients
    from components.unlearning.tombstones import tombstoned_clients
    from flows.federate import run_federate
    from flows.tracking import Tracker

    runtime = Runtime.from_env(root)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    done, timings = 0, []
    for checkpoint in checkpoints:
        summary = run_federate(project=str(root), rounds=checkpoint - done, promote="always")
        done = checkpoint
        samples = []
        for _ in range(5):  # fresh reader objects each time: no cache carries over
            history = UpdateHistory(open_store(runtime.store))
            started = time.perf_counter()
            ref = manifest_ref_from_tags(tracker.version(summary["final_version"]).tags)
            manifest = history.read_manifest(ref)
            tombstoned_clients(history.store, tracker.registry.model_name)
            present = present_clients(history, ref)  # the lineage guard's walk
            result = forget_client(history, ref, manifest, "client_01")
            hashlib.sha256(state_to_bytes(result.state, {})).hexdigest()
            samples.append(time.perf_counter() - started)
        timings.append({"rounds": checkpoint, "forget_s_median": statistics.median(samples), "forget_s": samples,
                        "present_clients": len(present)})  # fmt: skip
    print("RESULT " + json.dumps({"checkpoints": timings}))


def part_forgetting(profile: dict[str, Any], scratch: Path) -> dict[str, Any]:
    root = project(scratch / "forgetting", profile["forget_clients"], profile["forget_examples_per_client"], {
        "history.retention": "sums", "history.keep_rounds": 2, "federate.max_workers": 2,
    })  # fmt: skip
    checkpoints = ",".join(str(r) for r in profile["forget_rounds"])
    result = run_child(root, None, "_forgetting", "--checkpoints", checkpoints)
    shutil.rmtree(root, ignore_errors=True)
    first, last = result["checkpoints"][0], result["checkpoints"][-1]
    return result | {"ratio_last_vs_first": last["forget_s_median"] / first["forget_s_median"]}


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "_federate", "_retention", "_forgetting"])
    parser.add_argument("--quick", action="store_true", help="the smoke-test profile (minutes)")
    parser.add_argument("--parts", default="rounds,retention,forgetting")
    parser.add_argument("--merge", action="store_true", help="keep the other parts already in --out")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--project", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "_federate":
        child_federate(args)
        return 0
    if args.command == "_retention":
        child_retention(args)
        return 0
    if args.command == "_forgetting":
        child_forgetting(args)
        return 0

    profile = QUICK if args.quick else FULL
    scratch = Path(tempfile.mkdtemp(prefix="fedforget-scale-"))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "profile": "quick" if args.quick else "full",
        "settings": profile,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model_mb": model_mb(),
    }
    if args.merge and args.out.is_file():  # keep the parts measured by an earlier run
        previous = json.loads(args.out.read_text())
        result |= {k: previous[k] for k in ("rounds", "retention", "forgetting", "notes") if k in previous}

    def save() -> None:  # after every part: a later part's failure loses nothing measured
        result["targets"] = targets(result)
        result["wall_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        parts = args.parts.split(",")
        for name, part in (("rounds", part_rounds), ("retention", part_retention), ("forgetting", part_forgetting)):
            if name in parts:
                result[name] = part(profile, scratch)
                save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    save()
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, measured (``met`` is a plain comparison, nothing tuned)."""
    out: dict[str, Any] = {}
    model = result["model_mb"]
    for runner in {r["runner"] for r in result.get("rounds", [])}:
        rows = sorted((r for r in result["rounds"] if r["runner"] == runner), key=lambda r: r["clients_per_round"])
        if len(rows) >= 2:
            growth = (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / (
                (rows[-1]["clients_per_round"] - rows[0]["clients_per_round"]) / 10
            )
            out[f"rss_growth_mb_per_10_clients_{runner}"] = {
                "measured": round(growth, 2), "target": f"<= one model ({model:.2f} MB)", "met": growth <= model,
            }  # fmt: skip
    dask = {r["clients_per_round"]: r for r in result.get("rounds", []) if r["runner"] == "dask"}
    if 50 in dask:
        share = dask[50]["orchestration_overhead_share"]
        out["dask_overhead_at_50_clients"] = {"measured": round(share, 3), "target": "<= 0.15", "met": share <= 0.15}
    retention = result.get("retention")
    if retention:
        full, sums = retention["per_round"]["full"], retention["per_round"]["sums"]
        out["sums_retention_objects"] = {
            "measured": {"full": [r["objects"] for r in full], "sums": [r["objects"] for r in sums]},
            "target": "sums grows with clients, not rounds x clients",
            "met": (sums[-1]["objects"] - sums[len(sums) // 2]["objects"]) < (full[-1]["objects"] - full[len(full) // 2]["objects"]),
        }  # fmt: skip
        out["forget_bit_identical_full_vs_sums"] = {
            "measured": retention["forget_from_champion_bit_identical_full_vs_sums"], "target": True,
            "met": retention["forget_from_champion_bit_identical_full_vs_sums"],
        }  # fmt: skip
    forgetting = result.get("forgetting")
    if forgetting:
        ratio = forgetting["ratio_last_vs_first"]
        out["forget_time_ratio"] = {"measured": round(ratio, 3), "target": "<= 1.2", "met": ratio <= 1.2}
    return out


if __name__ == "__main__":
    sys.exit(main())
