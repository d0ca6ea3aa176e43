"""The records a round produces: what a client sent, what the server applied.

They sit below the history (which archives them) and the protocols (which
produce them). A :class:`ClientUpdate` is the contribution record of the weight
protocols: forgetting subtracts exactly ``weight * delta`` for every round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from components.core.refs import ObjectRef
from components.core.state import StateDict, weighted_sum


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back after local training.

    Parameters
    ----------
    client_id
        The client's identifier.
    server_round
        The round the client trained in.
    num_examples
        Number of training examples the client used.
    delta
        Local model minus the global model the client started from.
    metrics
        Training metrics (e.g. ``train_loss``, ``compute_s``).
    upload
        The archived object ``delta`` was read from (``None`` when it never
        went through the store, as in unit tests of a strategy).
    """

    client_id: str
    server_round: int
    num_examples: int
    delta: StateDict = field(repr=False)
    metrics: Mapping[str, float] = field(default_factory=dict)
    upload: ObjectRef | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """A client's update as the strategy applied it.

    The global model moved by ``weight * delta`` because of this client, so
    ``contribution()`` is exactly what forgetting the client must subtract.
    ``upload`` is the archived object the client sent; a strategy that clipped
    or perturbed it sets ``modified`` and the history archives the applied
    ``delta`` next to it. A streaming strategy, which never holds every delta
    at once, leaves ``delta`` as ``None`` for an unmodified upload: the
    history reads it back from ``upload`` when it archives the round.
    """

    client_id: str
    server_round: int
    num_examples: int
    weight: float
    delta: StateDict | None = field(repr=False)
    upload: ObjectRef | None = None
    modified: bool = False

    def __post_init__(self) -> None:
        if self.delta is None and (self.upload is None or self.modified):
            raise ValueError(f"update of {self.client_id}: no delta and no unmodified upload to read it from")

    def contribution(self, delta: StateDict | None = None) -> StateDict:
        """The applied contribution ``weight * delta`` (``delta``: the one read back from ``upload``)."""
        applied = self.delta if self.delta is not None else delta
        if applied is None:
            raise ValueError(f"update of {self.client_id} holds no delta: read it from {self.upload}")
        return weighted_sum([applied], [self.weight])
