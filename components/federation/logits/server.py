"""The soft-label protocol's server side: its settings, the round's consensus and the student.

Pure functions shared by the server step and by forgetting, so that a
recomputation runs exactly the code the round ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from components.core.refs import ObjectRef
from components.core.state import StateDict
from components.federation.logits.client import PRECISIONS, FitSettings, fit_soft_labels
from components.federation.logits.grouping import GROUP_WEIGHTS, GROUPINGS, PICKS, Consensus, soft_label_consensus
from components.lineage.history import UpdateHistory
from components.lineage.manifests import RoundManifest
from components.models.students import ModelSpec, build_model

REDISTIL = ("final", "replay", "rewind")


@dataclass(frozen=True)
class SoftLabelSettings:
    """The method's knobs (proposed ``federate.soft_labels`` params)."""

    grouping: str = "similarity"  # none | similarity
    distance_threshold: float = 0.15  # mean JS divergence (bits) below which groups merge
    num_groups: int | None = None  # k groups instead of a threshold
    pick: str = "closest-to-mean"  # closest-to-mean | lowest-entropy
    group_weight: str | None = None  # examples | uniform | confidence; None: confidence if grouped, else examples
    calibrate: bool | None = None  # prior-correct each group's labels; None: only if grouped
    temperature: float = 1.0
    beta: float = 0.9  # loss weight of the soft term when fitting (client and server)
    client_epochs: int = 1  # epochs over D when a client fits the consensus
    server_epochs: int = 2  # epochs over D when the server distils its student, per round
    forget_epochs: int = 8  # epochs over D when forgetting re-distils the student (redistil=final)
    redistil: str = "final"  # final: the last consensus from the initial state | replay: every round | rewind: exact
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    precision: str = "float16"  # of the uploaded soft labels and the consensus
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {self.grouping!r}; choose one of {GROUPINGS}")
        if self.pick not in PICKS:
            raise ValueError(f"unknown pick {self.pick!r}; choose one of {PICKS}")
        if self.group_weight is not None and self.group_weight not in GROUP_WEIGHTS:
            raise ValueError(f"unknown group weight {self.group_weight!r}; choose one of {GROUP_WEIGHTS}")
        if self.redistil not in REDISTIL:
            raise ValueError(f"unknown redistil {self.redistil!r}; choose one of {REDISTIL}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {sorted(PRECISIONS)}")
        if not self.temperature > 0 or not 0 <= self.beta <= 1 or not 0 <= self.distance_threshold <= 1:
            raise ValueError("need temperature > 0, beta in [0, 1] and distance_threshold in [0, 1]")
        if self.num_groups is not None and self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")

    @property
    def grouped(self) -> bool:
        return self.grouping == "similarity"

    @property
    def combine_weight(self) -> str:
        return self.group_weight or ("confidence" if self.grouped else "examples")

    @property
    def prior_correction(self) -> bool:
        return self.grouped if self.calibrate is None else self.calibrate

    def fit(self, epochs: int) -> FitSettings:
        return FitSettings(self.temperature, self.beta, epochs, self.lr, self.momentum, self.batch_size)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SoftLabelSettings:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def server_seed(seed: int, server_round: int) -> int:
    """The server's distillation seed of a round (forgetting replays it)."""
    return int(np.random.SeedSequence([seed, server_round, 0x5D]).generate_state(1)[0])


def round_consensus(settings: SoftLabelSettings, labels: Sequence[torch.Tensor], sizes: Sequence[int]) -> Consensus:
    """The consensus of one round, rounded to the archived precision (what clients and server fit)."""
    stacked = np.stack([label.double().numpy() for label in labels])
    result = soft_label_consensus(stacked, sizes, settings.grouping, settings.distance_threshold,
                                  settings.num_groups, settings.combine_weight, settings.pick,
                                  settings.prior_correction)  # fmt: skip
    stored = torch.from_numpy(result.probs).to(PRECISIONS[settings.precision]).float().numpy()
    return Consensus(stored, result.groups, result.picks, result.group_weights, result.distances)


def distil_student(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], public: torch.Tensor, probs: np.ndarray,
    fit: FitSettings, seed: int,
) -> StateDict:  # fmt: skip
    """The student ``state`` after distilling ``probs`` on D (a new state; inputs untouched)."""
    student = build_model(spec)
    student.load_state_dict(dict(state))
    fit_soft_labels(student, public, torch.from_numpy(probs), fit, torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def grouping_objects(consensus: Consensus, precision: str) -> dict[str, StateDict]:
    """The consensus (at the clients' precision: what they download) and the grouping as server objects."""
    return {
        "consensus": {"probs": torch.from_numpy(consensus.probs).to(PRECISIONS[precision])},
        "grouping": {
            "groups": torch.from_numpy(consensus.groups),
            "picks": torch.from_numpy(consensus.picks),
            "group_weights": torch.from_numpy(consensus.group_weights),
            "distances": torch.from_numpy(consensus.distances),
        },
    }


def grouping_record(consensus: Consensus, clients: Sequence[str]) -> dict[str, Any]:
    groups = [[clients[i] for i in np.flatnonzero(consensus.groups == g)] for g in range(len(consensus.group_weights))]
    picked = np.bincount(consensus.picks.ravel(), minlength=len(clients)) if consensus.picks.size else None
    return {
        "clients": list(clients),
        "groups": groups,
        "group_weights": [round(float(w), 6) for w in consensus.group_weights],
        "picks": {c: int(picked[i]) for i, c in enumerate(clients)} if picked is not None else None,
    }


def lineage_rounds(history: UpdateHistory, source: ObjectRef) -> tuple[list[RoundManifest], set[str]]:
    """The lineage's rounds, oldest first, and the clients deletions on it already removed."""
    rounds, forgotten = [], set()
    for _, manifest in history.iter_lineage(source):
        if isinstance(manifest, RoundManifest):
            rounds.append(manifest)
        else:
            forgotten.add(manifest.forgotten_client)
    return rounds[::-1], forgotten
