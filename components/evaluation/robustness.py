"""The ``robustness`` suite: robust and private aggregation under attack, and forgetting an attacker.

Per seed, on the same prepared data, initial model and attackers, the weight
protocol runs every strategy (FedAvg, coordinate-wise median, trimmed mean,
Multi-Krum, FLTrust, credit) under every attack of
:mod:`components.evaluation.attacks` at every malicious fraction (the first
``round(fraction * n)`` clients of a seeded permutation, so the 20% attackers
are among the 40% ones), once without attack, and credit wrapped in central DP
(:class:`~components.federation.weights.privacy.DPServerSide`) at every noise
multiplier ``sigma``. Update attacks change what a malicious client uploads
(it trains honestly, then uploads the attacked delta); data attacks change the
shard it trains on. Split learning is not part of the grid: it does not exist
in this code base yet.

Measured: the global model's test accuracy, the backdoor's attack success rate
(triggered test images classified as the target class; a baseline where no
backdoor was planted), the share of malicious and of benign client-rounds a
strategy excluded (Multi-Krum, FLTrust, credit; ``None`` for rules that exclude
nobody), epsilon of the DP runs (Opacus' RDP accountant, every client every
round) and the bytes clients upload per round. At ``forget_point`` the
attackers are forgotten one after another (each deletion subtracts exactly
what the strategy applied for that client) and compared with retraining
without them, in test accuracy and ASR.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.config.sections import ModelConfig
from components.core.serialize import state_from_bytes, state_to_bytes
from components.core.state import add
from components.data.datasets import RawDataset, Split
from components.data.layout import FederationData, PrepareSettings, prepare_data, read_split
from components.data.staging import stage_splits
from components.evaluation.attacks import ATTACKS, apply_data_attack, apply_update_attack
from components.evaluation.unlearning import mean_std
from components.federation.client import train_weights_client
from components.federation.protocol import ClientReply, ClientTask, Protocol
from components.federation.rounds import Federation, run_round, thread_map
from components.federation.split.protocol import SplitFed
from components.federation.weights.privacy import PrivacyAccountant
from components.federation.weights.protocol import WeightAveraging
from components.federation.weights.robust import fltrust_server_update
from components.federation.weights.strategy import Strategy, build_strategy
from components.learning.train import TrainSettings, evaluate, torch_threads
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore, open_store
from components.models.students import ModelSpec, init_model
from components.unlearning.forget import forget_client
from components.unlearning.verify import attack_success_rate, model_from_state

STRATEGIES = ("fedavg", "median", "trimmed-mean", "krum", "fltrust", "credit")
ATTACK_NAMES = ("sign-flip", "scaling", "gaussian", "label-flip", "backdoor")
ROW_FIELDS = (
    "protocol",
    "strategy",
    "attack",
    "malicious_fraction",
    "sigma",
    "test_accuracy",
    "test_accuracy_sd",
    "backdoor_asr",
    "malicious_excluded_rate",
    "benign_excluded_rate",
    "epsilon",
    "bytes_per_round",
    "seeds",
    "download_bytes_per_round",
)
KEY_FIELDS = ROW_FIELDS[:5]


@dataclass(frozen=True)
class RobustnessSettings:
    """One profile of the suite. Defaults are the full profile; :meth:`quick` is the CI smoke test."""

    data: PrepareSettings = field(default_factory=lambda: PrepareSettings(
        dataset="fashion-mnist", num_clients=10, alpha=0.5, shots=10, seed=42, min_client_examples=100,
        max_train_examples=10000, test_size=2000,
    ))  # fmt: skip
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="mlp", args={"hidden": 128}))
    train: TrainSettings = field(default_factory=lambda: TrainSettings(local_epochs=1, batch_size=32, lr=0.05))
    rounds: int = 12
    strategies: tuple[str, ...] = STRATEGIES
    attacks: tuple[str, ...] = ATTACK_NAMES
    fractions: tuple[float, ...] = (0.0, 0.2, 0.4)  # 0.0: the no-attack run of every strategy
    sigmas: tuple[float, ...] = (0.0, 0.5, 1.0)  # central DP around credit, no attack; () for none
    clipping_norm: float = 2.0  # DP: every delta clipped to this L2 norm (about an honest first-round delta's)
    dp_delta: float = 1e-5
    trimmed_beta: float = 0.3  # trimmed mean: floor(0.3 n) trimmed at each end (0.4 would leave the median at n=10)
    krum_fraction: float = 0.4  # Multi-Krum tolerates f = round(krum_fraction * n) attackers
    credit_groups: int = 2
    server_epochs: int = 5  # FLTrust: epochs of the server's own update on its few-shot set
    scaling_factor: float = 10.0
    gaussian_std: float = 0.1
    backdoor_fraction: float = 0.5  # share of an attacker's images triggered
    target_class: int = 0
    trigger_size: int = 3
    forget_point: tuple[str, str, float] | None = ("credit", "backdoor", 0.2)  # strategy, attack, fraction
    # splitfed runs (strategy, attack, fraction), cut after split_cut stages; data attacks only
    splitfed: tuple[tuple[str, str | None, float], ...] = (("fedavg", None, 0.0), ("credit", None, 0.0),
                                                           ("credit", "label-flip", 0.2))  # fmt: skip
    split_cut: int = 1
    max_workers: int = 2
    federate_seed: int = 0

    @classmethod
    def quick(cls) -> RobustnessSettings:
        """Digits, 8 clients, 6 rounds, a reduced grid, one seed: well under two minutes on 2 cores."""
        return cls(
            data=PrepareSettings(dataset="digits", num_clients=8, alpha=1.0, shots=5, seed=42, min_client_examples=40),
            model=ModelConfig(name="mlp", args={"hidden": 32}),
            train=TrainSettings(local_epochs=2, batch_size=16, lr=0.05),
            rounds=6,
            attacks=("sign-flip", "scaling", "backdoor"),
            fractions=(0.0, 0.4),
            sigmas=(0.0, 1.0),
            server_epochs=4,
            trigger_size=2,
            forget_point=("credit", "backdoor", 0.4),
            splitfed=(("credit", None, 0.0),),
        )

    def record(self) -> dict[str, Any]:
        """What the report states next to the results."""
        return {
            "dataset": self.data.dataset, "clients": self.data.num_clients, "alpha": self.data.alpha,
            "rounds": self.rounds, "max_train_examples": self.data.max_train_examples,
            "server_set": self.data.shots, "model": self.model.model_dump(), "train": asdict(self.train),
            "strategies": list(self.strategies), "attacks": list(self.attacks), "fractions": list(self.fractions),
            "sigmas": list(self.sigmas), "clipping_norm": self.clipping_norm, "dp_delta": self.dp_delta,
            "trimmed_beta": self.trimmed_beta, "krum_fraction": self.krum_fraction,
            "credit_groups": self.credit_groups, "server_epochs": self.server_epochs,
            "splitfed": [list(run) for run in self.splitfed], "split_cut": self.split_cut,
            "scaling_factor": self.scaling_factor, "gaussian_std": self.gaussian_std,
            "backdoor_fraction": self.backdoor_fraction, "target_class": self.target_class,
            "trigger_size": self.trigger_size, "forget_point": self.forget_point,
        }  # fmt: skip

    profile = record


# --------------------------------------------------------------------------- attackers in the protocol


class AttackedWeights(WeightAveraging):
    """The weight protocol whose ``malicious`` clients upload ``attack(delta)`` instead of their delta.

    It records itself as the plain weight protocol (the attack is no protocol
    setting): forgetting rebuilds that and subtracts what the strategy applied.
    """

    def __init__(self, strategy: Strategy, malicious: Sequence[str] = (), attack: str | None = None,
                 params: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(strategy)
        self.malicious, self.attack, self.params = frozenset(malicious), attack, dict(params or {})

    def client_step(self, task: ClientTask) -> ClientReply:
        if self.attack is None or task.client_id not in self.malicious:
            return train_weights_client(task)
        # A folder of its own: LocalStore.delete prunes emptied folders, racing a neighbour's delete in a shared one.
        scratch = task.object_key(f"honest-{task.client_id}")
        honest = train_weights_client(dataclasses.replace(task, upload_key=scratch))
        store = open_store(task.store_url)
        delta, meta = state_from_bytes(store.get_verified(honest.upload))
        generator = torch.Generator().manual_seed(task.seed)
        attacked = apply_update_attack(self.attack, delta, generator, **self.params)
        upload = store.put(task.upload_key, state_to_bytes(attacked, meta), overwrite=False)
        store.delete(honest.upload.key)
        return dataclasses.replace(honest, upload=upload)


def strategy_for(name: str, s: RobustnessSettings, spec: ModelSpec, server_set: Split, seed: int) -> Strategy:
    """The strategy ``name`` with the suite's settings (FLTrust's server update from the server set)."""
    n = s.data.num_clients
    settings: dict[str, dict[str, Any]] = {
        "trimmed-mean": {"beta": s.trimmed_beta},
        "krum": {"num_malicious": round(s.krum_fraction * n)},
        "fltrust": {"server_update": fltrust_server_update(
            spec, server_set, replace(s.train, local_epochs=s.server_epochs), seed)},
        "credit": {"num_groups": s.credit_groups, "seed": seed},
    }  # fmt: skip
    return build_strategy(name, **settings.get(name, {}))


def attack_params(attack: str, s: RobustnessSettings, num_classes: int) -> dict[str, Any]:
    return {
        "scaling": {"factor": s.scaling_factor},
        "gaussian": {"std": s.gaussian_std},
        "label-flip": {"num_classes": num_classes},
        "backdoor": {"fraction": s.backdoor_fraction, "target_class": s.target_class, "trigger_size": s.trigger_size},
    }.get(attack, {})


# --------------------------------------------------------------------------- one federation


@dataclass
class Point:
    """What every federation of one seed shares."""

    settings: RobustnessSettings
    spec: ModelSpec
    shards: dict[str, Split]
    test: Split
    server_set: Split
    root: Path  # every federation archives under root/<federation id>, deleted once measured
    attackers: list[str]  # a seeded order: the first round(fraction * n) attack
    seed: int

    def malicious(self, fraction: float) -> list[str]:
        return sorted(self.attackers[: round(fraction * len(self.attackers))])


def federate(point: Point, strategy: str, attack: str | None, fraction: float, sigma: float | None,
             federation_id: str, exclude: Sequence[str] = (), protocol_name: str = "weights") -> dict[str, Any]:  # fmt: skip
    """Rounds of one grid point through the production round function; its raw numbers and final lineage."""
    s, fseed = point.settings, point.settings.federate_seed + point.seed
    malicious = point.malicious(fraction) if attack else []
    clients = sorted(c for c in point.shards if c not in set(exclude))
    target = ATTACKS[attack].target if attack else None
    params = attack_params(attack, s, point.spec.args["num_classes"]) if attack else {}
    shards = {c: point.shards[c] for c in clients}
    rng = np.random.default_rng([fseed, 1])
    for c in malicious:
        if target == "data" and c in shards:
            shards[c] = apply_data_attack(attack, shards[c], rng, **params)
    inner = strategy_for(strategy, s, point.spec, point.server_set, fseed)
    if sigma is not None:
        inner = build_strategy("dp-server", strategy=inner, noise_multiplier=sigma, clipping_norm=s.clipping_norm,
                               seed=fseed)  # fmt: skip
    if protocol_name == "splitfed":
        if target == "update":
            raise ValueError(f"splitfed runs take data attacks only, not {attack}")
        protocol: Protocol = SplitFed(inner, s.split_cut, point.spec.name)
    else:
        protocol = AttackedWeights(inner, malicious, attack if target == "update" else None, params)
    state = init_model(point.spec, fseed).state_dict()
    history = UpdateHistory(LocalStore(point.root / federation_id))
    head = history.write_initial(federation_id, state, point.spec, fseed)
    staged = stage_splits(history.store, shards, federation_id)
    federation = Federation(federation_id, history, history.store.url, point.spec, s.train, fseed,
                            "evaluation", staged, {c: len(shards[c]) for c in clients})  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // s.max_workers)
    round_rng, server_state, result = np.random.default_rng([fseed, 0]), None, None
    accountant = PrivacyAccountant() if sigma else None
    excluded = {"malicious": [0, 0], "benign": [0, 0]}  # [excluded, client-rounds]
    measured_exclusion, upload, download = False, [], []
    for _ in range(s.rounds):
        with torch_threads(threads):
            result = run_round(protocol, federation, head, state, server_state, clients, round_rng,
                               thread_map(s.max_workers))  # fmt: skip
        head, state, server_state = result.head, result.state, result.outcome.server_state
        record = result.outcome.record
        if "communication" in record:  # splitfed: activations, labels and the client part up; gradients down
            upload.append(sum(record["communication"]["upload_bytes"].values()))
            download.append(sum(record["communication"]["download_bytes"].values()))
        else:  # the model's delta up, the model down
            upload.append(sum(int(r.upload.size or 0) for r in result.replies))
            download.append(upload[-1])
        measured_exclusion = measured_exclusion or "excluded" in record
        for r in result.replies:
            kind = excluded["malicious" if r.client_id in malicious else "benign"]
            kind[0] += r.client_id in record.get("excluded", ())
            kind[1] += 1
        if accountant is not None:
            accountant.step(sigma, len(result.replies) / len(clients))
    model = model_from_state(point.spec, state)

    def rate(kind: str) -> float | None:
        done, total = excluded[kind]
        return done / total if measured_exclusion and total else None

    return {
        "protocol": protocol.name, "strategy": strategy, "attack": attack or "none",
        "malicious_fraction": fraction if attack else 0.0, "sigma": sigma,
        "test_accuracy": evaluate(model, point.test)["accuracy"],
        "backdoor_asr": attack_success_rate(model, point.test, s.target_class, s.trigger_size),
        "malicious_excluded_rate": rate("malicious"), "benign_excluded_rate": rate("benign"),
        "epsilon": accountant.epsilon(s.dp_delta) if accountant is not None else None,
        "bytes_per_round": float(np.mean(upload)), "download_bytes_per_round": float(np.mean(download)),
        "malicious": malicious,
        "state": state, "manifest": result.manifest_ref, "history": history,
    }  # fmt: skip


def measure_forgetting(point: Point, original: Mapping[str, Any], federation_id: str) -> dict[str, Any]:
    """Forget every attacker of ``original`` one after another; retrain without them; accuracy and ASR."""
    history, s = original["history"], point.settings
    ref, manifest = original["manifest"], history.read_manifest(original["manifest"])
    targets, state = original["malicious"], original["state"]
    # Exact attribution: the model is its initial state plus every client's running sum of applied contributions
    # (no residual without DP), so subtracting the attackers' sums removes exactly what they moved it by.
    rebuilt = init_model(point.spec, s.federate_seed + point.seed).state_dict()
    for client in manifest.sums:
        rebuilt = add(rebuilt, history.client_sum(manifest, client))
    error = max(float((state[k].double() - rebuilt[k].double()).abs().max()) for k in state)
    for n, client in enumerate(targets):
        forgotten = forget_client(history, ref, manifest, client, "subtract")
        state = forgotten.state
        if n + 1 < len(targets):  # the next deletion starts from this one's committed result
            ref, manifest = history.commit_unlearning(
                request_id=f"{federation_id}-{n}", client_id=client, variant="subtract", source=ref,
                source_version=str(n), source_manifest=manifest, removed=forgotten.removed,
                forgotten_state=state, final_state=state, new_sums=forgotten.new_sums,
                round_scales=forgotten.round_scales, recovery={}, data_version="evaluation", metrics={},
            )  # fmt: skip
    strategy, attack, fraction = s.forget_point or ("", "", 0.0)
    retrain = federate(point, strategy, None, fraction, None, federation_id, exclude=targets)
    shutil.rmtree(point.root / federation_id, ignore_errors=True)
    model = model_from_state(point.spec, state)
    return {
        "strategy": strategy, "attack": attack, "malicious_fraction": fraction, "forgotten_clients": len(targets),
        "attribution_error": error,
        "original_test_accuracy": original["test_accuracy"], "original_asr": original["backdoor_asr"],
        "forgotten_test_accuracy": evaluate(model, point.test)["accuracy"],
        "forgotten_asr": attack_success_rate(model, point.test, s.target_class, s.trigger_size),
        "retrain_test_accuracy": retrain["test_accuracy"], "retrain_asr": retrain["backdoor_asr"],
    }  # fmt: skip


def grid(s: RobustnessSettings) -> list[tuple[str, str | None, float, float | None]]:
    """(strategy, attack, fraction, sigma) of every federation of one seed."""
    points: list[tuple[str, str | None, float, float | None]] = []
    for strategy in s.strategies:
        if 0.0 in s.fractions:
            points.append((strategy, None, 0.0, None))
        points += [(strategy, a, f, None) for a in s.attacks for f in s.fractions if f > 0]
    points += [("credit", None, 0.0, sigma) for sigma in s.sigmas]
    return points


def grid_points(s: RobustnessSettings) -> list[tuple[str, str, str | None, float, float | None]]:
    """(protocol, strategy, attack, fraction, sigma): the weight grid, then the splitfed runs."""
    return [("weights", *p) for p in grid(s)] + [("splitfed", st, a, f, None) for st, a, f in s.splitfed]


def run_seed(
    settings: RobustnessSettings, raw: RawDataset, seed: int, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every grid point for one seed, and forgetting the attackers at ``forget_point``; raw numbers."""
    root = Path(workdir) / f"seed-{seed}"
    prepare_data(replace(settings.data, seed=settings.data.seed + seed), root / "data", raw)
    fed = FederationData(root / "data" / "federation")
    spec = settings.model.spec(len(fed.meta["class_names"]), tuple(fed.meta["image_shape"]))
    ids = fed.client_ids()
    order = np.random.default_rng([settings.data.seed, seed]).permutation(len(ids))
    point = Point(settings, spec, {c: fed.client(c) for c in ids}, fed.test(),
                  read_split(root / "data" / "server" / "few_shot.safetensors"),
                  root / "runs", [ids[i] for i in order], seed)  # fmt: skip
    out: dict[str, Any] = {"seed": seed, "runs": [], "forgetting": None}
    forget_at = tuple(settings.forget_point) if settings.forget_point else None
    for n, (protocol, strategy, attack, fraction, sigma) in enumerate(grid_points(settings)):
        log(f"seed {seed}: {protocol}/{strategy}, attack {attack or 'none'} at {fraction}, sigma {sigma} "
            f"({len(ids)} clients, {settings.rounds} rounds)")  # fmt: skip
        run = federate(point, strategy, attack, fraction, sigma, f"run-{seed}-{n}", protocol_name=protocol)
        if forget_at == (strategy, attack, fraction) and sigma is None and run["malicious"] and protocol == "weights":
            log(f"seed {seed}: forgetting {len(run['malicious'])} attacker(s) vs retraining without them")
            out["forgetting"] = measure_forgetting(point, run, f"retrain-{seed}") | {"seed": seed}
        shutil.rmtree(point.root / f"run-{seed}-{n}", ignore_errors=True)  # a full grid's archives fill a disk
        out["runs"].append({k: v for k, v in run.items() if k not in ("state", "manifest", "history")})
    return out


# --------------------------------------------------------------------------- summary over seeds


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarise(seed_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows (mean and sd over seeds), the accuracy-epsilon curve, forgetting and the issue's targets."""
    keys = list(dict.fromkeys(tuple(r[k] for k in KEY_FIELDS) for s in seed_results for r in s["runs"]))
    rows = []
    for key in keys:
        runs = [r for s in seed_results for r in s["runs"] if tuple(r[k] for k in KEY_FIELDS) == key]
        mean, sd = mean_std([r["test_accuracy"] for r in runs])
        rows.append({
            **dict(zip(KEY_FIELDS, key)), "test_accuracy": mean, "test_accuracy_sd": sd,
            **{k: _mean([r[k] for r in runs]) for k in ROW_FIELDS[7:12]}, "seeds": len(runs),
            "download_bytes_per_round": _mean([r.get("download_bytes_per_round") for r in runs]),
        })  # fmt: skip
    dp = [r for r in rows if r["sigma"] is not None]
    curve = [{"sigma": r["sigma"], "epsilon": r["epsilon"], "test_accuracy": r["test_accuracy"]} for r in dp]
    forgetting = [s["forgetting"] for s in seed_results if s.get("forgetting")]
    summary = None
    if forgetting:
        summary = {k: v for k, v in forgetting[0].items() if isinstance(v, str)} | {
            k: float(np.mean([f[k] for f in forgetting]))
            for k, v in forgetting[0].items()
            if isinstance(v, int | float) and k != "seed"
        }
    return {"rows": rows, "accuracy_epsilon": curve, "forgetting": summary, "targets": targets(rows, summary)}


def targets(rows: Sequence[Mapping[str, Any]], forgetting: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, as measured (points are percentage points)."""
    by = {
        (r["strategy"], r["attack"], r["malicious_fraction"]): r
        for r in rows
        if r["sigma"] is None and r["protocol"] == "weights"
    }
    out = []
    clean = by.get(("fedavg", "none", 0.0))
    for attack in ("sign-flip", "scaling"):
        for fraction in sorted({f for (_, a, f) in by if a == attack}):
            credit = by.get(("credit", attack, fraction))
            if credit is None:
                continue
            if clean:
                gap = 100 * (credit["test_accuracy"] - clean["test_accuracy"])
                out.append((f"{attack} {fraction:.0%}: credit within 2 pt of FedAvg without attack",
                            f"{gap:+.2f} pt", gap >= -2.0))  # fmt: skip
            rivals = [
                by[(s, attack, fraction)] for s in ("median", "trimmed-mean", "krum") if (s, attack, fraction) in by
            ]
            if rivals:
                best = max(rivals, key=lambda r: r["test_accuracy"])
                gap = 100 * (credit["test_accuracy"] - best["test_accuracy"])
                out.append((f"{attack} {fraction:.0%}: credit >= best of median, trimmed mean, Multi-Krum",
                            f"{gap:+.2f} pt vs {best['strategy']}", gap >= 0.0))  # fmt: skip
    credit = by.get(("credit", "none", 0.0))
    if credit and credit["benign_excluded_rate"] is not None:
        rate = credit["benign_excluded_rate"]
        out.append(("no attack: credit excludes <= 5% of benign client-rounds", f"{rate:.1%}", rate <= 0.05))
    if credit and clean:
        gap = 100 * (credit["test_accuracy"] - clean["test_accuracy"])
        out.append(("no attack: credit loses <= 0.5 pt vs FedAvg", f"{gap:+.2f} pt", gap >= -0.5))
    for (strategy, attack, fraction), row in sorted(by.items()):
        if strategy == "credit" and attack == "backdoor":
            asr = row["backdoor_asr"]
            out.append((f"backdoor {fraction:.0%}, no deletion: credit ASR <= 5%", f"{asr:.1%}", asr <= 0.05))
    if forgetting:
        gap = 100 * (forgetting["forgotten_asr"] - forgetting["retrain_asr"])
        out.append((f"forgetting the backdoor attackers ({forgetting['strategy']}, "
                    f"{forgetting['malicious_fraction']:.0%}): ASR at retrain's level (<= +1 pt)",
                    f"{gap:+.2f} pt", gap <= 1.0))  # fmt: skip
    return [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in out]
