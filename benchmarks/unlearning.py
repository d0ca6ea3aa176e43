"""Unlearning wall time by step vs the federation it undoes; teacher cost and memory.

Runs, in a scratch store and MLflow database, the real flows on a profile's data:

1. ``federate`` for R rounds from a fresh model (the federation to undo);
2. ``unlearn`` of the client with the most data, teacher fitted cold;
3. ``unlearn`` of a second client, reusing the fitted teacher (the steady state:
   a teacher is fitted once per few-shot data version);
4. first of all, in a separate clean process, the teacher alone: build, fit
   with cold and with cached features, peak memory.

Usage::

    .venv/bin/python benchmarks/unlearning.py --profile default --rounds 5

Writes ``benchmarks/results/unlearning-<profile>-<R>rounds.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEACHER_PROBE = r"""
import json, resource, sys, time
from components.config import Runtime, load_config
from components.data import FEDERATION_DIR, SERVER_DIR, FederationData, read_split
from components.teacher import FeatureCache, build_backbone, fit_teacher
profile, cache_dir = sys.argv[1], sys.argv[2]
runtime = Runtime.from_env()
config = load_config(runtime.params_path, profile)
spec = config.teacher.spec()
data = FederationData(runtime.data_dir(profile) / FEDERATION_DIR)
few = read_split(runtime.data_dir(profile) / SERVER_DIR / "few_shot.safetensors")
test = data.test().subset(range(min(config.teacher.test_subset, len(data.test()))))
t0 = time.perf_counter(); backbone = build_backbone(spec); build_s = time.perf_counter() - t0
cache = FeatureCache(cache_dir)
t0 = time.perf_counter(); cold = fit_teacher(spec, backbone, few, data.meta["class_names"], test, cache); cold_s = time.perf_counter() - t0
t0 = time.perf_counter(); warm = fit_teacher(spec, backbone, few, data.meta["class_names"], test, cache); warm_s = time.perf_counter() - t0
print(json.dumps({"preset": spec.preset, "image_size": backbone.image_size, "build_s": build_s,
  "fit_cold_total_s": cold_s, "fit_cached_total_s": warm_s, "head_fit_s": warm.metrics["fit_s"],
  "val_accuracy": warm.metrics["val_accuracy"], "test_accuracy": warm.metrics["test_accuracy"],
  "test_examples": warm.metrics["test_examples"],
  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fedforget-bench-"))
    env = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "FEDFORGET_PROJECT": str(REPO),
        "FEDFORGET_STORE": str(scratch / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}",
        "FEDFORGET_CACHE": str(scratch / "cache"),  # cold features for the first fit
    }
    os.environ.update(env)

    # The teacher alone first, in a clean process (its peak memory is the figure).
    probe = subprocess.run(
        [sys.executable, "-c", TEACHER_PROBE, args.profile, str(scratch / "probe-features")],
        check=False, capture_output=True, text=True, env=dict(os.environ), cwd=REPO,
    )  # fmt: skip
    if probe.returncode != 0:
        print(probe.stderr, file=sys.stderr)
        return 1
    teacher = json.loads(probe.stdout.strip().splitlines()[-1])

    from components.config.runtime import Runtime
    from components.data.layout import FederationData
    from flows.cli.data import prepare_data
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    runtime = Runtime.from_env()
    if not (runtime.data_dir(args.profile) / "federation" / "meta.json").is_file():
        prepare_data(args.profile)
    data = FederationData(runtime.data_dir(args.profile) / "federation")
    by_size = sorted(data.client_ids(), key=data.num_examples, reverse=True)

    started = time.perf_counter()
    # No teacher prefit: the first deletion below fits it, to measure the cold case too.
    federation = run_federate(
        profile=args.profile, rounds=args.rounds, fresh=True, overrides={"federate.prefit_teacher": False}
    )
    federation_flow_s = time.perf_counter() - started
    federation_rounds_s = sum(r["round_s"] for r in federation["rounds"])

    runs = {}
    for label, client in (("cold_teacher", by_size[0]), ("reused_teacher", by_size[1])):
        started = time.perf_counter()
        result = unlearn(client_id=client, profile=args.profile)
        flow_s = time.perf_counter() - started
        t = result["timings"]
        core = t["forget_s"] + t["teacher_s"] + t["distill_s"]
        runs[label] = {
            "client": client,
            "client_examples": data.num_examples(client),
            "timings": t,
            "core_s": core,
            "flow_s": flow_s,
            "core_vs_federation": core / federation_rounds_s,
            "flow_steps_vs_federation": t["total_s"] / federation_rounds_s,
            "metrics": result["metrics"],
            "teacher_test_accuracy": result["distill"].get("teacher_test_accuracy"),
            "teacher_val_accuracy": result["distill"].get("teacher_val_accuracy"),
        }

    result = {
        "profile": args.profile,
        "rounds": args.rounds,
        "clients": len(data.client_ids()),
        "federation_rounds_s": federation_rounds_s,
        "federation_flow_s": federation_flow_s,
        "federation_final_test_accuracy": federation["rounds"][-1]["test_accuracy"],
        "unlearning": runs,
        "teacher_probe": teacher,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"unlearning-{args.profile}-{args.rounds}rounds.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"federation: {len(data.client_ids())} clients x {args.rounds} rounds: {federation_rounds_s:.1f} s "
        f"(flow {federation_flow_s:.1f} s), test accuracy {result['federation_final_test_accuracy']:.4f}"
    )
    steps = [
        "validate_s",
        "forget_s",
        "teacher_s",
        "distill_s",
        "evaluate_s",
        "archive_s",
        "register_s",
        "finalise_s",
        "total_s",
    ]
    print(f"{'unlearning':>15} " + " ".join(f"{s[:-2]:>9}" for s in steps) + f" {'core/fed':>9} {'all/fed':>8}")
    for label, r in runs.items():
        t = r["timings"]
        print(
            f"{label:>15} "
            + " ".join(f"{t[s]:>9.2f}" for s in steps)
            + f" {'1/' + format(1 / r['core_vs_federation'], '.0f'):>9} {'1/' + format(1 / r['flow_steps_vs_federation'], '.0f'):>8}"
        )
    for label, r in runs.items():
        m = r["metrics"]
        print(
            f"{label} ({r['client']}, {r['client_examples']} examples): test accuracy {m['test_accuracy_before']:.4f} before, "
            f"{m['test_accuracy_forgotten']:.4f} after forgetting, {m['test_accuracy_after']:.4f} after distillation; "
            f"on the client's data {m['forgotten_client_accuracy_before']:.4f} -> {m['forgotten_client_accuracy_forgotten']:.4f} "
            f"-> {m['forgotten_client_accuracy_after']:.4f}"
        )
    print(
        f"teacher ({teacher['preset']}, {teacher['image_size']} px): build {teacher['build_s']:.2f} s, fit with cold features "
        f"{teacher['fit_cold_total_s']:.2f} s, with cached features {teacher['fit_cached_total_s']:.2f} s "
        f"(head {teacher['head_fit_s']:.2f} s); few-shot val {teacher['val_accuracy']:.3f}, "
        f"test ({teacher['test_examples']:.0f}) {teacher['test_accuracy']:.3f}; peak RSS {teacher['peak_rss_mib']:.0f} MiB"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
