"""The ``fewshot`` suite: few-shot federated fine-tuning by mode, against local-only and zero-shot.

For every shot count k (``data.client_shots``: each client keeps k labelled
examples per class of its Dirichlet-skewed shard; the remainder is its own
held-out split), from one pretrained starting point (the frozen tower, the
adapter, the text head):

``linear-probe`` / ``full`` / ``meta``
    Every client fine-tunes in that mode (few-shot protocol).
``per-device``
    Each client in its device profile's mode (``profiles`` assigned in turn;
    weak -> linear-probe, medium -> meta, strong -> full).
``local-only``
    Each client fine-tunes alone, as many steps as a federated client does
    in all rounds (``local_only_mode``).
``zero-shot``
    The frozen teacher's text classifier, no training.

Frozen features are computed once per image for the whole raw dataset
(:class:`~components.federation.fewshot.features.FeatureBank`, on disk through
``FeatureCache``). A row's ``client_accuracy_*`` is each client's deployed
model on its own held-out split (a meta client adapts the global
initialisation first), ``test_accuracy`` the global model on the test set,
``client_compute_s`` a client's local fine-tuning time summed over rounds
(mean over clients), ``rounds_to_plateau`` the first round within
``plateau_tolerance`` of the best mean client accuracy. Forgetting is measured
against retraining at ``forget_shots``: the largest client is removed by
subtraction from each federated method's model and compared with a
federation retrained without it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.data.datasets import RawDataset
from components.data.layout import FederationData, PrepareSettings, prepare_data
from components.evaluation.unlearning import stat as _stat
from components.evaluation.unlearning import stat_fields
from components.federation.fewshot.convergence import rounds_to_plateau
from components.federation.fewshot.features import FeatureBank
from components.federation.fewshot.model import initial_model, shared_backbone, zero_shot_logits
from components.federation.fewshot.modes import DEVICE_MODES, LocalSettings, check_mode
from components.federation.fewshot.protocol import FewShotProtocol
from components.federation.fewshot.simulate import (
    ClientData,
    FewShotRun,
    forgetting_against_retraining,
    local_only,
    simulate,
)
from components.learning.train import torch_threads
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore
from components.models.clip_backbone import ClipBackbone, TeacherSpec
from components.models.clip_teacher import FeatureCache

METHODS = ("linear-probe", "full", "meta", "per-device", "local-only", "zero-shot")
FEDERATED = ("linear-probe", "full", "meta", "per-device")
ROW_FIELDS = ("client_accuracy_mean", "client_accuracy_min", "test_accuracy", "rounds_to_plateau", "client_compute_s")


@dataclass(frozen=True)
class FewshotSettings:
    """One seed of the suite (defaults: the full profile; :meth:`quick` for the CI smoke test)."""

    dataset: str = "fashion-mnist"
    num_clients: int = 10
    alpha: float = 0.5
    shots: tuple[int, ...] = (5, 10, 20)
    min_client_examples: int = 20
    max_train_examples: int | None = 6000
    test_size: int | None = 2000
    server_shots: int = 1  # prepare's server few-shot set (unused by this suite)
    rounds: int = 20  # measured on Fashion-MNIST (1 seed): every federated method plateaus by round 12
    # 64 px: as accurate as 112 on digits for a 5-shot probe (0.75 vs 0.71) at a quarter of the tower's time.
    teacher: TeacherSpec = field(
        default_factory=lambda: TeacherSpec(preset="offline", train_projection=False, image_size=64)
    )
    local: LocalSettings = field(default_factory=LocalSettings)
    profiles: tuple[str, ...] = ("weak", "medium", "strong")  # client i gets profiles[i % len(profiles)]
    methods: tuple[str, ...] = METHODS
    local_only_mode: str = "full"
    head_init: str = "text"
    plateau_tolerance: float = 0.01
    forget_shots: int | None = 5  # the k at which forgetting is measured against retraining (None: never)
    track_gradients: bool = True
    threads: int = 1  # torch threads: on 2 shared cores one is faster, even for the tower (measured)
    data_seed: int = 42
    federate_seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown fewshot methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if not self.shots or min(self.shots) < 1 or self.rounds < 1:
            raise ValueError("shots must be positive and rounds >= 1")
        check_mode(self.local_only_mode)
        for profile in self.profiles:
            if profile not in DEVICE_MODES:
                raise ValueError(f"unknown device profile {profile!r}; choose from {', '.join(DEVICE_MODES)}")

    @classmethod
    def quick(cls, **overrides: Any) -> FewshotSettings:
        """The CI smoke profile: digits, 4 clients, 8 rounds (a few minutes on 2 cores)."""
        base = {"dataset": "digits", "num_clients": 4, "max_train_examples": None, "test_size": None, "rounds": 8}
        return cls(**(base | overrides))

    def modes(self, client_ids: Sequence[str], method: str) -> dict[str, str]:
        """Each client's mode under ``method`` (a federated one)."""
        if method == "per-device":
            return {cid: DEVICE_MODES[self.profiles[i % len(self.profiles)]] for i, cid in enumerate(client_ids)}
        return dict.fromkeys(client_ids, check_mode(method))

    def record(self) -> dict[str, Any]:
        """JSON-ready settings, stated next to the results."""
        return asdict(self)


def _clients(fed: FederationData, bank: FeatureBank, backbone: ClipBackbone) -> dict[str, ClientData]:
    out = {}
    for cid in fed.client_ids():
        shard, held = fed.client(cid), fed.holdout(cid)
        out[cid] = ClientData(shard, bank.get(backbone, shard), bank.get(backbone, held), held.labels)
    return out


def _accuracy(accuracy: Mapping[str, float]) -> dict[str, Any]:
    """Per-client accuracies with their mean and minimum (``None`` when no client holds a held-out split)."""
    values = list(accuracy.values())
    return {
        "client_accuracy": dict(accuracy),
        "client_accuracy_mean": float(np.mean(values)) if values else None,
        "client_accuracy_min": float(min(values)) if values else None,
    }


def _federated_entry(run: FewShotRun, tolerance: float) -> dict[str, Any]:
    return {
        **_accuracy(run.client_accuracy),
        "test_accuracy": run.curves["test_accuracy"][-1],
        "rounds_to_plateau": rounds_to_plateau(run.curves["client_accuracy_mean"], tolerance),
        "client_compute_s": float(np.mean(list(run.compute_s.values()))),
        "seconds": run.seconds,
        "curves": run.curves,
    }


def run_seed(
    settings: FewshotSettings, raw: RawDataset, seed: int, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every method at every shot count for one seed: raw numbers, per-round curves, forgetting."""
    if raw.name != settings.dataset:
        raise ValueError(f"settings name dataset {settings.dataset!r} but the raw data is {raw.name!r}")
    root = Path(workdir) / f"seed-{seed}"
    out: dict[str, Any] = {
        "seed": seed,
        "methods": {m: {} for m in settings.methods},
        "forgetting": {},
        "features_s": {},
    }
    with torch_threads(settings.threads):
        backbone = shared_backbone(settings.teacher)
        # Every k splits the same images differently: the tower sees each image once.
        bank = FeatureBank(FeatureCache(Path(workdir) / "features"))
        for k in settings.shots:
            _run_shots(settings, raw, seed, k, root / f"k{k}", backbone, bank, out, log)
    return out


def _run_shots(
    settings: FewshotSettings, raw: RawDataset, seed: int, k: int, folder: Path, backbone: ClipBackbone, bank: FeatureBank,
    out: dict[str, Any], log: Callable[[str], None],
) -> None:  # fmt: skip
    data = PrepareSettings(
        dataset=raw.name, num_clients=settings.num_clients, alpha=settings.alpha, shots=settings.server_shots,
        seed=settings.data_seed + seed, min_client_examples=settings.min_client_examples,
        max_train_examples=settings.max_train_examples, test_size=settings.test_size, client_shots=k,
    )  # fmt: skip
    prepare_data(data, folder / "data", raw)
    fed = FederationData(folder / "data" / "federation")
    started = time.perf_counter()
    clients = _clients(fed, bank, backbone)
    test_split = fed.test()
    test = (bank.get(backbone, test_split), test_split.labels)
    out["features_s"][str(k)] = time.perf_counter() - started
    names = fed.meta["class_names"]
    spec, initial = initial_model(backbone, names, settings.federate_seed + seed, settings.head_init)
    fseed = settings.federate_seed + seed
    for method in settings.methods:
        log(f"seed {seed}, k={k}: {method}")
        if method == "zero-shot":
            logits = zero_shot_logits(backbone, test[0], names)
            accuracy = {c: float((zero_shot_logits(backbone, d.holdout_features, names).argmax(1) == d.holdout_labels).float().mean())
                        for c, d in clients.items() if len(d.holdout_labels)}  # fmt: skip
            entry = _accuracy(accuracy) | {"rounds_to_plateau": None, "client_compute_s": None,
                                           "test_accuracy": float((logits.argmax(1) == test[1]).float().mean())}  # fmt: skip
        elif method == "local-only":
            steps = settings.rounds * settings.local.steps
            alone = local_only(spec, initial, clients, test, settings.local_only_mode, settings.local, steps, fseed)
            entry = alone | _accuracy(alone["client_accuracy"]) | {"rounds_to_plateau": None,
                                                                   "client_compute_s": alone["compute_s"]}  # fmt: skip
        else:
            protocol = FewShotProtocol(settings.teacher, settings.local, settings.modes(sorted(clients), method),
                                       track_gradients=settings.track_gradients, features=bank)  # fmt: skip
            store_dir = folder / "store" / method
            history = UpdateHistory(LocalStore(store_dir))
            run = simulate(protocol, spec, initial, clients, test, settings.rounds, fseed, history, "fewshot")
            entry = _federated_entry(run, settings.plateau_tolerance) | {"modes": protocol.modes}
            if settings.forget_shots == k:
                target = max(clients, key=lambda c: (len(clients[c].shard), c))
                out["forgetting"][method] = forgetting_against_retraining(
                    protocol, spec, initial, clients, test, run, settings.rounds, fseed, history, target
                ) | {"shots": k}
            shutil.rmtree(store_dir, ignore_errors=True)  # archives are large and measured already
        out["methods"][method][str(k)] = entry


def summarise(seed_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows ``{method, shots, <field>, <field>_sd (None where n/a), seeds}``, mean curves and forgetting over seeds."""
    rows, curves = [], {}
    first = seed_results[0]["methods"]
    for method in first:
        for shots in first[method]:
            entries = [s["methods"][method][shots] for s in seed_results]
            row: dict[str, Any] = {"method": method, "shots": int(shots)}
            for name in ROW_FIELDS:
                row |= stat_fields(name, [e[name] for e in entries])
            rows.append(row | {"seeds": len(entries)})
            if "curves" in entries[0]:
                names = entries[0]["curves"]
                curves.setdefault(method, {})[shots] = {
                    n: [_stat([e["curves"][n][i] for e in entries]) for i in range(len(names[n]))] for n in names
                }
    forgetting = {}
    for method in first:
        runs = [s["forgetting"][method] for s in seed_results if method in s.get("forgetting", {})]
        if runs:
            forgetting[method] = {
                "shots": runs[0]["shots"],
                **{n: _stat([r[n] for r in runs]) for n in ("l2_forgotten_to_retrain", "l2_original_to_retrain", "forget_s", "retrain_s")},
                **{f"{model}_{n}": _stat([r[model][n] for r in runs]) for model in ("original", "forgotten", "retrain")
                   for n in ("test_accuracy", "others_accuracy_mean", "target_accuracy")},
            }  # fmt: skip
    return {"rows": rows, "curves": curves, "forgetting": forgetting, "targets": targets(rows)}


def targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, measured (points are percentage points of mean client accuracy)."""
    table = {(r["method"], r["shots"]): r for r in rows}

    def acc(method: str, k: int) -> float | None:
        row = table.get((method, k))
        return row["client_accuracy_mean"] if row else None

    def compute(method: str, k: int) -> float | None:
        row = table.get((method, k))
        return row["client_compute_s"] if row else None

    out = []
    for k in sorted({r["shots"] for r in rows}):
        local = acc("local-only", k)
        modes = {m: acc(m, k) for m in FEDERATED if acc(m, k) is not None}
        if local is not None and modes:
            worst = min(modes.values())
            out.append({"target": f"k={k}: every federated mode >= local-only + 3 pt",
                        "measured": f"worst {100 * (worst - local):+.1f} pt", "met": worst >= local + 0.03})  # fmt: skip
        best = max((v for m, v in modes.items() if m != "per-device"), default=None)
        if "per-device" in modes and best is not None and compute("per-device", k) and compute("full", k):
            ok = modes["per-device"] >= best - 0.01 and compute("per-device", k) < compute("full", k)
            out.append({"target": f"k={k}: per-device within 1 pt of the best mode, less compute than full",
                        "measured": f"{100 * (modes['per-device'] - best):+.1f} pt, compute x{compute('per-device', k) / compute('full', k):.2f}",
                        "met": ok})  # fmt: skip
    meta, probe = acc("meta", 5), acc("linear-probe", 5)
    if meta is not None and probe is not None:
        out.append({"target": "k=5: meta >= linear-probe + 2 pt", "measured": f"{100 * (meta - probe):+.1f} pt",
                    "met": meta >= probe + 0.02})  # fmt: skip
    return out


def result(settings: FewshotSettings, seed_results: Sequence[Mapping[str, Any]], profile: str) -> dict[str, Any]:
    """What the report renders and ``results.json`` holds: the summary, the settings stated with it, the raw seeds."""
    config = settings.record() | {"profile": profile, "seeds": len(seed_results)}
    return {"config": config, **summarise(seed_results), "seeds": list(seed_results)}
