"""Per-round wall time: client compute vs everything else (orchestration, tracking, archive).

Runs the real ``federate`` flow (Prefect + MLflow + store) on a profile's data in
a scratch store and MLflow database, then splits every round's wall time:

- client phase: from submitting the client tasks to having every result
  (the clients' own compute plus task dispatch);
- everything else: aggregation, archiving, evaluation, registration, logging;
  ``ovh %`` is the part of it that is orchestration, tracking and archiving
  (everything else minus the server's evaluation of the test set).

Usage::

    .venv/bin/python benchmarks/federation_overhead.py --profile default --rounds 3
    .venv/bin/python benchmarks/federation_overhead.py --store s3://bucket/bench   # against S3

Writes ``benchmarks/results/federation_overhead-<profile>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", help="store location (default: a scratch folder)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: a scratch sqlite file)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fedforget-bench-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ["FEDFORGET_PROJECT"] = str(REPO)
    os.environ["FEDFORGET_STORE"] = args.store or str(scratch / "store")
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri or f"sqlite:///{scratch / 'mlflow.db'}"

    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from flows.cli.data import prepare_data
    from flows.federate import run_federate

    runtime = Runtime.from_env()
    if not (runtime.data_dir(args.profile) / "federation" / "meta.json").is_file():
        prepare_data(args.profile)
    config = load_config(runtime.params_path, args.profile)

    started = time.perf_counter()
    summary = run_federate(profile=args.profile, rounds=args.rounds, fresh=True)
    total = time.perf_counter() - started

    rows = []
    for r in summary["rounds"]:
        other = r["round_s"] - r["train_phase_s"]
        overhead = other - r["evaluate_s"]  # orchestration, tracking, archiving
        rows.append({
            "round": int(r["round"]),
            "round_s": r["round_s"],
            "client_phase_s": r["train_phase_s"],
            "client_compute_sum_s": r["client_compute_s_sum"],
            "client_compute_max_s": r["client_compute_s_max"],
            "everything_else_s": other,
            "everything_else_pct_of_client_phase": 100 * other / r["train_phase_s"],
            "overhead_excl_eval_s": overhead,
            "overhead_excl_eval_pct_of_client_phase": 100 * overhead / r["train_phase_s"],
            "aggregate_s": r["aggregate_s"],
            "archive_s": r["archive_s"],
            "evaluate_s": r["evaluate_s"],
            "register_s": r["register_s"],
            "test_accuracy": r["test_accuracy"],
        })  # fmt: skip
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "profile": args.profile,
        "dataset": config.data.dataset,
        "clients": config.data.num_clients,
        "local_epochs": config.train.local_epochs,
        "max_workers": config.federate.max_workers,
        "task_runner": config.federate.task_runner,
        "store": summary["store"],
        "tracking_uri": summary["tracking_uri"].split("@")[-1],
        "cpu_count": os.cpu_count(),
        "flow_total_s": total,
        "peak_rss_mib": peak_self,
        "peak_rss_children_mib": peak_children,
        "rounds": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"federation_overhead-{args.profile}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{config.data.dataset}, {config.data.num_clients} clients, {config.train.local_epochs} local epoch(s), "
        f"{config.federate.max_workers} parallel ({config.federate.task_runner}), store {summary['store']}"
    )
    header = (
        f"{'round':>5} {'round s':>8} {'clients s':>9} {'compute sum':>11} {'else s':>7} {'else %':>7} "
        f"{'aggr':>5} {'archive':>7} {'eval':>5} {'register':>8} {'ovh %':>6} {'acc':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['round']:>5} {r['round_s']:>8.2f} {r['client_phase_s']:>9.2f} {r['client_compute_sum_s']:>11.2f} "
            f"{r['everything_else_s']:>7.2f} {r['everything_else_pct_of_client_phase']:>6.1f}% "
            f"{r['aggregate_s']:>5.2f} {r['archive_s']:>7.2f} {r['evaluate_s']:>5.2f} {r['register_s']:>8.2f} "
            f"{r['overhead_excl_eval_pct_of_client_phase']:>5.1f}% "
            f"{r['test_accuracy']:>6.3f}"
        )
    print(f"flow total {total:.1f} s (incl. Prefect/MLflow start-up); peak RSS {peak_self:.0f} MiB")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
