"""Client model profiles: the architecture and compute budget of every client.

A profile set names architectures (a model from the registry with its
arguments, plus a default budget) and groups of clients (``fnmatch``
patterns of client ids, first match wins) that train one of them. A budget is
a number of local epochs, a wall-time cap, or both (training stops at the
first epoch boundary past the cap). Built from a params section::

    clients:
      architectures:
        small-cnn: {name: cnn, args: {channels: [16, 32], hidden: 128}, local_epochs: 1}
        wide-cnn: {name: cnn, args: {channels: [64, 128], hidden: 512}, local_epochs: 2}
        mlp: {name: mlp, args: {hidden: 200}, time_cap_s: 20}
      groups:
        - {clients: ["client_0[0-2]"], architecture: small-cnn}
        - {clients: ["*"], architecture: mlp, local_epochs: 3}
      assign: groups          # or round-robin: client i -> i-th architecture modulo their number

The sizes that come from the data (``num_classes``, ``in_channels``,
``image_size``) are added by :meth:`ClientProfiles.resolved` from the global
model's spec, as ``model.spec(...)`` does for the global model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from components.core.ids import validate_id
from components.models.students import ModelSpec, build_model

DERIVED_ARGS = ("num_classes", "in_channels", "image_size")
ASSIGNMENTS = ("groups", "round-robin")


@dataclass(frozen=True)
class Budget:
    """Local compute of one client per round: epochs, a wall-time cap (seconds), or both."""

    local_epochs: int | None = None
    time_cap_s: float | None = None

    def __post_init__(self) -> None:
        if self.local_epochs is not None and self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.time_cap_s is not None and not self.time_cap_s > 0:
            raise ValueError(f"time_cap_s must be > 0, got {self.time_cap_s}")

    def over(self, default: Budget) -> Budget:
        """This budget with ``default``'s values where it sets none."""
        return Budget(
            self.local_epochs if self.local_epochs is not None else default.local_epochs,
            self.time_cap_s if self.time_cap_s is not None else default.time_cap_s,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in (("local_epochs", self.local_epochs), ("time_cap_s", self.time_cap_s)) if v is not None
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        epochs, cap = data.get("local_epochs"), data.get("time_cap_s")
        return cls(None if epochs is None else int(epochs), None if cap is None else float(cap))


@dataclass(frozen=True)
class Architecture:
    """A registry model with its arguments and the default budget of the clients that train it."""

    spec: ModelSpec
    budget: Budget = field(default_factory=Budget)

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), **self.budget.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
        return cls(ModelSpec.from_dict(data), Budget.from_dict(data))


@dataclass(frozen=True)
class ProfileGroup:
    """Clients matching any of ``clients`` (fnmatch patterns) train ``architecture``."""

    clients: tuple[str, ...]
    architecture: str
    budget: Budget = field(default_factory=Budget)

    def matches(self, client_id: str) -> bool:
        return any(fnmatch.fnmatchcase(client_id, pattern) for pattern in self.clients)

    def to_dict(self) -> dict[str, Any]:
        return {"clients": list(self.clients), "architecture": self.architecture, **self.budget.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileGroup:
        clients = data["clients"]
        patterns = (clients,) if isinstance(clients, str) else tuple(str(c) for c in clients)
        return cls(patterns, str(data["architecture"]), Budget.from_dict(data))


@dataclass(frozen=True)
class ClientProfile:
    """What one client trains, and for how long."""

    client_id: str
    architecture: str
    spec: ModelSpec
    budget: Budget

    def settings(self) -> dict[str, Any]:
        """The knobs a client step reads (``ClientTask.settings``)."""
        return {"architecture": self.architecture, **self.budget.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        """The record of this client's model (for the prepared data's meta, manifests and the audit)."""
        return {"architecture": self.architecture, "model": self.spec.to_dict(), **self.budget.to_dict()}


@dataclass(frozen=True)
class ClientProfiles:
    """Architectures by name and the groups of clients that train them (first matching group wins)."""

    architectures: Mapping[str, Architecture]
    groups: tuple[ProfileGroup, ...]

    def __post_init__(self) -> None:
        if not self.architectures:
            raise ValueError("client profiles need at least one architecture")
        for name in self.architectures:
            validate_id(name, "architecture name")  # it names packed keys and archived objects
        for group in self.groups:
            if group.architecture not in self.architectures:
                raise ValueError(
                    f"client group {list(group.clients)} names architecture {group.architecture!r}; "
                    f"known: {sorted(self.architectures)}"
                )

    @classmethod
    def from_params(cls, section: Mapping[str, Any], client_ids: Sequence[str] = ()) -> ClientProfiles:
        """Profiles from a ``clients`` params section; ``round-robin`` needs the ``client_ids``."""
        architectures = {str(k): Architecture.from_dict(v) for k, v in (section.get("architectures") or {}).items()}
        groups = tuple(ProfileGroup.from_dict(g) for g in section.get("groups") or ())
        assign = str(section.get("assign", "groups"))
        if assign not in ASSIGNMENTS:
            raise ValueError(f"clients.assign must be one of {ASSIGNMENTS}, got {assign!r}")
        if assign == "round-robin":
            if not client_ids:
                raise ValueError("clients.assign=round-robin needs the client ids")
            names = list(architectures)
            # Explicit groups still win; round-robin fills in the others by their sorted position.
            groups += tuple(
                ProfileGroup((cid,), names[i % len(names)]) for i, cid in enumerate(sorted(client_ids))
            )  # fmt: skip
        return cls(architectures, groups)

    @classmethod
    def single(cls, name: str, spec: ModelSpec, budget: Budget | None = None) -> ClientProfiles:
        """Every client trains ``spec``."""
        return cls({name: Architecture(spec, budget or Budget())}, (ProfileGroup(("*",), name),))

    def resolved(self, global_model: ModelSpec) -> ClientProfiles:
        """The profiles with the data-derived sizes of ``global_model`` added to every architecture."""
        derived = {k: global_model.args[k] for k in DERIVED_ARGS if k in global_model.args}
        architectures = {
            name: replace(arch, spec=ModelSpec(arch.spec.name, {**derived, **arch.spec.args}))
            for name, arch in self.architectures.items()
        }
        return replace(self, architectures=architectures)

    def profile(self, client_id: str) -> ClientProfile:
        for group in self.groups:
            if group.matches(client_id):
                arch = self.architectures[group.architecture]
                return ClientProfile(client_id, group.architecture, arch.spec, group.budget.over(arch.budget))
        raise ValueError(f"no client profile group matches {client_id!r}; add a group (e.g. clients: ['*'])")

    def architecture_of(self, client_id: str) -> str:
        return self.profile(client_id).architecture

    def spec_for(self, client_id: str) -> ModelSpec:
        return self.profile(client_id).spec

    def spec_of(self, architecture: str) -> ModelSpec:
        return self.architectures[architecture].spec

    def parameter_count(self, architecture: str) -> int:
        return sum(p.numel() for p in build_model(self.spec_of(architecture)).parameters())

    def smallest(self) -> str:
        """The architecture with the fewest parameters (ties: the first declared)."""
        return min(self.architectures, key=self.parameter_count)

    def client_records(self, client_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each client's architecture, model spec and budget, by client id."""
        return {cid: self.profile(cid).to_dict() for cid in sorted(client_ids)}

    def describe(self) -> dict[str, Any]:
        """A JSON record that :meth:`from_record` inverts (recorded in protocol descriptions)."""
        return {
            "architectures": {name: arch.to_dict() for name, arch in self.architectures.items()},
            "groups": [g.to_dict() for g in self.groups],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientProfiles:
        return cls.from_params({**record, "assign": "groups"})
