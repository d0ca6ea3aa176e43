"""``ensemble-distillation``: clients keep their own architectures; the server fuses them (FedDF-style).

Per round (Lin et al., 2020, "Ensemble distillation for robust model fusion"):

1. a client of architecture ``a`` starts from that architecture's model
   ``theta_a`` (carried as the server state, one packed state per
   architecture; a fresh, seeded initialisation before its first round),
   trains within its budget and uploads its delta;
2. the server averages per architecture,
   ``avg_a = theta_a + sum_{i in a} (n_i / n_a) delta_i``, and archives every
   ``avg_a`` as a server object (``average-<a>``);
3. the ensemble (the mean logits of every ``avg_a``, weighted by the examples
   its clients trained on in the round) on the unlabeled
   distillation set (the public set D, or the server's images) is distilled
   into each architecture, starting from ``avg_a``: the next round's
   ``theta_a``; and into the global student (the federation's ``model``),
   starting from the previous round's student. The student is the round's
   global state.

The contribution record is each client's ``(n_i / n_a) * delta_i`` with
running sums, as in the weight protocols, in its architecture's shape.

With ``fuse_architectures: false`` step 3 distils into the student only: each
architecture is then plain FedAvg among its clients, and knowledge crosses
architectures only through the student.

Forgetting client ``c`` of architecture ``a`` (:meth:`EnsembleDistillation.forget`):
``avg_a' = avg_a - S_c`` where ``avg_a`` is the source's archived average
and ``S_c`` the client's running sum over every round. This is exact for the
average of the last round ``T``: ``avg_a' == theta_a^0 + sum_{i in a, i != c} S_i
+ sum_{t < T} R_a^t`` with ``R_a^t = theta_a^{t+1} - avg_a^t`` the server's
distillation steps, which belong to no client (as a momentum carry does under
FedAvgM; they were computed from ensembles that held ``c``, so under fusion
what the *other* architectures learnt from ``c`` through the ensemble stays:
only ``fuse_architectures: false`` (no ``R``) confines ``c`` to its own
architecture's average, where the subtraction is exact). An architecture left
without clients leaves the ensemble. The remaining averages are the next
rounds' starting points (which fuse again), and their ensemble is distilled
again into the student. The student never saw client data, only the ensemble's
outputs on the distillation set; by default (``forget_from: initial``) it is
re-distilled from its initial state, so that nothing of the previous students
(which learnt from the client in every round) remains: guarantee
``contributions``, at a cost in accuracy that the unlearn flow's teacher then
restores. ``forget_from: source`` re-distils from the version's student for
``forget_epochs`` (cheap, keeps quality) but keeps part of the client's direct
contribution: guarantee ``approximate``, opt-in only (``unlearn.allow_approximate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from components.core.records import ClientUpdate
from components.core.refs import ObjectRef
from components.core.serialize import state_to_bytes
from components.core.state import StateDict, add, subtract, weighted_sum
from components.federation.client import check_results, load_shard, read_results
from components.federation.hetero.common import (
    HeteroForgetResult,
    detached,
    distil_towards,
    ensemble_logits,
    initial_state,
    model_with,
    pack,
    read_images,
    read_state_at,
    ref_from,
    seed_for,
    train_within_budget,
    unpack,
)
from components.federation.hetero.profiles import ClientProfiles
from components.federation.protocol import (
    ClientReply,
    ClientTask,
    Protocol,
    RoundOutcome,
    UnlearningError,
    register_protocol,
)
from components.learning.distill import DistillSettings
from components.lineage.history import UpdateHistory
from components.lineage.manifests import LineageHead, Manifest, RoundManifest, UnlearningManifest
from components.lineage.store import ObjectStore, open_store
from components.models.students import ModelSpec

AVERAGE = "average-"  # server objects: average-<architecture>


@dataclass(frozen=True)
class EnsembleSettings:
    """The server's distillation (the ``ensemble`` params section)."""

    temperature: float = 2.0
    epochs: int = 5  # per round, into every architecture and into the student
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    forget_epochs: int = 5  # the student's re-distillation when a client is forgotten
    forget_from: str = "initial"  # the re-distilled student starts from: initial | source (approximate)
    fuse_architectures: bool = True  # FedDF: distil the ensemble back into every architecture each round

    def __post_init__(self) -> None:
        if self.forget_from not in ("source", "initial"):
            raise ValueError(f"forget_from must be source or initial, got {self.forget_from!r}")

    def distill(self, epochs: int | None = None) -> DistillSettings:
        return DistillSettings(
            epochs=self.epochs if epochs is None else epochs, lr=self.lr, momentum=self.momentum,
            batch_size=self.batch_size, temperature=self.temperature, beta=1.0,
        )  # fmt: skip


class EnsembleDistillation(Protocol):
    """Per-architecture averaging, then distillation of their ensemble (see the module docstring).

    Parameters
    ----------
    profiles
        Every client's architecture and budget, resolved (data-derived sizes included).
    student
        The global model's spec (the federation's ``model``).
    distill_set
        The unlabeled images the server distils on, staged in the store.
    settings
        Temperature, epochs and optimiser of the server's distillation.
    seed
        Initial weights of each architecture and the distillation's shuffling.
    """

    name = "ensemble-distillation"

    def __init__(
        self,
        profiles: ClientProfiles,
        student: ModelSpec,
        distill_set: ObjectRef,
        settings: EnsembleSettings | None = None,
        seed: int = 0,
    ) -> None:
        self.profiles = profiles
        self.student = student
        self.distill_set = distill_set
        self.settings = settings or EnsembleSettings()
        self.seed = seed

    # ---- what each client gets
    def client_model(self, client_id: str, global_model: ModelSpec) -> ModelSpec:
        return self.profiles.spec_for(client_id)

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        return self.profiles.profile(client_id).settings()

    def round_inputs(self, server_round: int, head: LineageHead, store: ObjectStore) -> Mapping[str, ObjectRef]:
        # The per-architecture models travel as one packed object; each client takes its own part.
        return {"start": head.server_state} if head.server_state is not None else {}

    def client_step(self, task: ClientTask) -> ClientReply:
        if task.threads:
            torch.set_num_threads(task.threads)
        arch = str(task.settings["architecture"])
        packed = read_state_at(task.store_url, task.inputs["start"]) if "start" in task.inputs else None
        start = unpack(packed).get(arch) or initial_state(task.model, self.seed, arch)
        model = model_with(task.model, start)
        data = load_shard(task)
        metrics = train_within_budget(model, data, task.train, task.settings, torch.Generator().manual_seed(task.seed))
        delta = subtract(detached(model), start)
        meta = {"kind": "update", "client_id": task.client_id, "server_round": task.server_round,
                "num_examples": len(data), "architecture": arch, "model": task.model.to_dict()}  # fmt: skip
        upload = open_store(task.store_url).put(task.upload_key, state_to_bytes(delta, meta), overwrite=False)
        return ClientReply(
            task.client_id, task.server_round, len(data), upload,
            metrics={k: v for k, v in metrics.items() if k != "num_examples"},
        )  # fmt: skip

    # ---- the server
    def server_step(
        self,
        server_round: int,
        base: Mapping[str, Any],
        server_state: StateDict | None,
        replies: Sequence[ClientReply],
        store: ObjectStore,
    ) -> RoundOutcome:
        results = read_results(replies, store)
        check_results(server_round, results)
        starts = unpack(server_state)
        groups: dict[str, list] = {}
        for result in results:
            groups.setdefault(self.profiles.architecture_of(result.client_id), []).append(result)
        updates: list[ClientUpdate] = []
        averages: dict[str, StateDict] = {}
        for arch in sorted(set(starts) | set(groups)):
            start = starts.get(arch) or initial_state(self.profiles.spec_of(arch), self.seed, arch)
            members = groups.get(arch, [])
            total = sum(r.num_examples for r in members)
            applied = [
                ClientUpdate(r.client_id, server_round, r.num_examples, r.num_examples / total, r.delta, upload=r.upload)
                for r in members
            ]  # fmt: skip
            step = weighted_sum([u.delta for u in applied], [u.weight for u in applied]) if applied else None
            averages[arch] = add(start, step) if step is not None else start
            updates += applied
        images = read_images(store, self.distill_set)
        weights = {a: float(sum(r.num_examples for r in groups.get(a, []))) for a in averages}
        fuse = self.settings.fuse_architectures
        next_starts, student, metrics = self._fuse(averages, weights, dict(base), images, server_round, fuse=fuse)
        record = {
            "architectures": {a: sorted(r.client_id for r in members) for a, members in sorted(groups.items())},
            "ensemble": sorted(averages),
            **metrics,
        }
        return RoundOutcome(
            state=student, updates=updates, server_state=pack(next_starts), record=record,
            server_objects={f"{AVERAGE}{a}": s for a, s in averages.items()},
            specs={r.client_id: self.profiles.spec_for(r.client_id) for r in results},
        )  # fmt: skip

    def _fuse(
        self,
        averages: Mapping[str, StateDict],
        weights: Mapping[str, float],
        student_from: StateDict,
        images: torch.Tensor,
        tag: int | str,
        student_epochs: int | None = None,
        fuse: bool = True,
    ) -> tuple[dict[str, StateDict], StateDict, dict[str, float]]:
        """Distil the ensemble of ``averages`` into the student and (``fuse``) into each architecture."""
        models = {a: model_with(self.profiles.spec_of(a), s) for a, s in averages.items()}
        teacher = ensemble_logits(list(models.values()), images, [weights[a] for a in models])
        fused = {a: dict(s) for a, s in averages.items()}
        for arch, model in models.items() if fuse else ():
            distil_towards(model, images, teacher, self.settings.distill(), seed_for(self.seed, tag, arch))
            fused[arch] = detached(model)
        student = model_with(self.student, student_from)
        metrics = distil_towards(
            student, images, teacher, self.settings.distill(student_epochs), seed_for(self.seed, tag)
        )
        return fused, detached(student), {"student_distill_loss": metrics["distill_loss"]}

    # ---- forgetting
    def guarantee(self, variant: str) -> str:
        """From the initial student, on ensembles without the client: ``contributions``. From the source
        version's student, which learnt from the client in every round: ``approximate``."""
        return "contributions" if self.settings.forget_from == "initial" else "approximate"

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> HeteroForgetResult:
        if variant != "subtract":
            raise UnlearningError(f"ensemble-distillation forgets by subtraction only, not {variant!r}")
        if client_id not in manifest.sums:
            raise UnlearningError(
                f"client {client_id} never contributed to the lineage of this model version (or was already removed)"
            )
        averages, examples, initial, reads = self._lineage_records(history, source)
        arch = self.profiles.architecture_of(client_id)
        removed = manifest.sums[client_id]
        averages[arch] = subtract(averages[arch], history.read_state(removed))
        remaining = [c for c in manifest.sums if c != client_id]
        kept = {a: s for a, s in sorted(averages.items()) if a in {self.profiles.architecture_of(c) for c in remaining}}
        if not kept:
            raise UnlearningError(f"forgetting {client_id} would leave no client in this federation")
        weights = {a: 0.0 for a in kept}
        for cid in remaining:
            if self.profiles.architecture_of(cid) in weights:
                weights[self.profiles.architecture_of(cid)] += examples.get(cid, 0)
        if not sum(weights.values()) > 0:  # nobody left took part in the last round
            weights = {a: 1.0 for a in kept}
        images = read_images(history.store, self.distill_set)
        student = history.read_state(initial if self.settings.forget_from == "initial" else manifest.global_state)
        tag = f"forget-{client_id}"
        # The next rounds start from the averages without the client (and fuse again): re-fusing
        # every architecture here would cost as much as a round's server step.
        _, student, _ = self._fuse(kept, weights, student, images, tag, self.settings.forget_epochs, fuse=False)
        return HeteroForgetResult(
            student, removed, {}, {}, objects_read=reads + 3,
            server_state=pack(kept), objects={f"{AVERAGE}{a}": s for a, s in kept.items()},
        )  # fmt: skip

    def _lineage_records(
        self, history: UpdateHistory, source: ObjectRef
    ) -> tuple[dict[str, StateDict], dict[str, int], ObjectRef, int]:
        """At ``source``: the per-architecture averages, the last round's examples per client, the
        student's initial state and the number of objects read.

        The newest archived averages are taken; deletions committed after them
        (whose averages were not archived) are subtracted again.
        """
        averages: dict[str, StateDict] | None = None
        examples: dict[str, int] | None = None
        pending: list[tuple[str, ObjectRef]] = []
        initial, reads = None, 0
        for _, manifest in history.iter_lineage(source):
            reads += 1
            initial = manifest.base
            if examples is None and isinstance(manifest, RoundManifest):
                examples = {c.client_id: c.num_examples for c in manifest.clients}
            archived = {k.removeprefix(AVERAGE): ref for k, ref in manifest.objects.items() if k.startswith(AVERAGE)}
            if averages is None and archived:
                averages = {a: history.read_state(ref) for a, ref in archived.items()}
                reads += len(archived)
            elif averages is None and isinstance(manifest, UnlearningManifest):
                pending.append((manifest.forgotten_client, manifest.removed))
            elif averages is None:
                raise UnlearningError(f"round {manifest.server_round} archived no per-architecture averages")
        if averages is None or initial is None:
            raise UnlearningError("this lineage holds no ensemble-distillation round")
        for cid, ref in pending:
            arch = self.profiles.architecture_of(cid)
            averages[arch] = subtract(averages[arch], history.read_state(ref))
            reads += 1
        return averages, examples or {}, initial, reads

    def served_model(self, history: UpdateHistory, manifest: Manifest, client_id: str) -> tuple[ModelSpec, StateDict]:
        """The client's architecture's model at this version (the next round's starting point)."""
        arch = self.profiles.architecture_of(client_id)
        models = unpack(history.read_state(manifest.server_state)) if manifest.server_state else {}
        if arch not in models:
            raise UnlearningError(f"version has no {arch} model for client {client_id} (its architecture left)")
        return self.profiles.spec_of(arch), models[arch]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "profiles": self.profiles.describe(),
            "student": self.student.to_dict(),
            "distill_set": self.distill_set.to_dict(),
            "settings": asdict(self.settings),
            "seed": self.seed,
        }


@register_protocol("ensemble-distillation")
def _from_record(record: Mapping[str, Any]) -> Protocol:
    distill_set = ref_from(record.get("distill_set"))
    if distill_set is None:
        raise UnlearningError("an ensemble-distillation record must name its distillation set")
    return EnsembleDistillation(
        ClientProfiles.from_record(record["profiles"]), ModelSpec.from_dict(record["student"]), distill_set,
        EnsembleSettings(**record.get("settings", {})), int(record.get("seed", 0)),
    )  # fmt: skip
