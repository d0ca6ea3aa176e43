"""Forgetting under the soft-label protocol: recompute every consensus without the client.

Soft labels are not additive (groups, picks and weights all depend on who took
part), so nothing is subtracted. Instead, for every round of the source's
lineage, the archived soft labels of the clients still present (hash-checked)
are grouped, picked and combined again, exactly as the server step did, and
the server student is distilled again:

``final`` (default, ``redistil`` setting)
    From the lineage's initial state, on the recomputed final consensus, for
    ``forget_epochs`` epochs: one distillation, whatever the number of rounds.
``replay``
    The server's chain again, round by round on each recomputed consensus with
    that round's seed and epochs: the student the server would have produced had
    the client's labels never reached it (rounds x ``server_epochs`` epochs).
``rewind``
    Back to the first round the client (or any client removed before) took
    part in: that round's consensus without it, distilled into that round's
    base. The clients' labels of that round were computed before they fitted
    anything the client shaped, so the result is *exactly* the student of a
    federation retrained without the client, after that round (same seeds and
    data); every later round is given up. The exact but weakest variant.

What is exact (``final``, ``replay``): the client's soft labels are in no
recomputed grouping, pick or consensus, and the returned student never fitted
a label it shaped directly (with ``replay``, it is the server's own computation
without them). What is not: the other clients fitted consensuses the client
shaped in earlier rounds, so their later labels (and their personal states)
still carry its influence, measurably (the suite reports the forgotten
student's accuracy on the client's data against the retrained one's);
the unlearn flow then recovers quality by distillation from the CLIP-Adapter
teacher, and a federation resumed from the deletion fits no consensus in its
first round. Clients removed by earlier deletions on the lineage stay removed.
The weight protocol's variant names are accepted and mean the same here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from components.core.refs import ObjectRef
from components.core.state import StateDict
from components.federation.logits.client import labels_from_bytes, load_public
from components.federation.logits.grouping import Consensus
from components.federation.logits.server import (
    SoftLabelSettings,
    distil_student,
    lineage_rounds,
    round_consensus,
    server_seed,
)
from components.federation.protocol import ForgetResult, UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.manifests import RoundManifest

if TYPE_CHECKING:  # the protocol imports this module
    from components.federation.logits.protocol import SoftLabels

VARIANTS = ("recompute", "subtract", "renormalise")


def recompute_consensus(
    history: UpdateHistory, rounds: Sequence[RoundManifest], excluded: set[str]
) -> tuple[list[Consensus | None], int]:
    """Each round's consensus from the archived labels of the clients not ``excluded`` (None: nobody left)."""
    out: list[Consensus | None] = []
    reads = 0
    for manifest in rounds:
        if manifest.protocol.get("name") != "soft-labels":
            raise UnlearningError(
                f"round {manifest.server_round} of this lineage was produced by protocol "
                f"{manifest.protocol.get('name')!r}, not soft-labels; mixed lineages cannot be recomputed"
            )
        kept = [c for c in manifest.clients if c.client_id not in excluded]
        labels = [labels_from_bytes(history.store.get_verified(c.objects["soft_labels"])) for c in kept]
        reads += len(kept)
        out.append(round_consensus(_settings_of(manifest), labels, [c.num_examples for c in kept]) if kept else None)
    return out, reads


def _settings_of(manifest: RoundManifest) -> SoftLabelSettings:
    return SoftLabelSettings.from_dict(manifest.protocol.get("settings") or {})


def forget_soft_labels(
    protocol: SoftLabels, history: UpdateHistory, source: ObjectRef, client_id: str, variant: str = "recompute"
) -> ForgetResult:
    """Remove ``client_id``'s soft labels from every round of the source's lineage; re-distil the student."""
    if variant not in VARIANTS:
        raise UnlearningError(f"unknown forgetting variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    rounds, forgotten = lineage_rounds(history, source)
    took_part = [m for m in rounds if client_id in m.client_ids]
    if client_id in forgotten or not took_part:
        raise UnlearningError(
            f"client {client_id} never contributed to the lineage of this model version (or was already removed from it)"
        )
    excluded = forgotten | {client_id}
    public = load_public(history.store.url, protocol.public)
    mode = protocol.settings.redistil
    if mode == "rewind":  # the first round any removed client took part in: nothing before it depends on them
        rounds = rounds[next(i for i, m in enumerate(rounds) if excluded & set(m.client_ids)) :][:1]
    consensuses, reads = recompute_consensus(history, rounds, excluded)
    state: StateDict = history.read_state(rounds[0].base)
    steps = [(m, c) for m, c in zip(rounds, consensuses) if c is not None]
    if mode == "final":
        steps = steps[-1:]
    for manifest, consensus in steps:
        settings = _settings_of(manifest)
        epochs = settings.forget_epochs if mode == "final" else settings.server_epochs
        state = distil_student(protocol.model, state, public, consensus.probs, settings.fit(epochs),
                               server_seed(settings.seed, manifest.server_round))  # fmt: skip
    entry = next(c for c in took_part[-1].clients if c.client_id == client_id)
    return ForgetResult(state, entry.objects["soft_labels"], {}, {}, objects_read=reads + 2)
