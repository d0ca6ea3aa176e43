"""Forgetting under the weight protocol: subtract exactly what a client contributed.

Two variants, both exact with respect to the archived history:

``subtract`` (default)
    ``W' = W - S_c`` where ``S_c`` is the client's running sum of applied
    contributions along the source version's lineage: one object read, however
    many rounds. Every other client's contribution stays exactly as applied.

``renormalise``
    Additionally, in every round the client took part in, the contributions of
    the clients still present are rescaled so that their weights again sum to
    what the round's present clients weighed before the deletion (for FedAvg:
    ``p_i -> p_i / (1 - p_c)``). This mimics FedAvg without the client, but it
    reads every archived update of those rounds (cost grows with rounds x
    clients) and amplifies updates that were computed against a model that
    still contained the client, which is why it is not the default.

Per-round scales are recorded in unlearning manifests (``round_scales``), and
the running sums of the rescaled clients are rewritten, so later deletions
(of either variant) remain exact. A round's residual (server momentum, DP
noise: recorded in its manifest, attributed to no client) is never subtracted:
forgetting is exact up to the recorded residuals.
"""

from __future__ import annotations

from components.core.refs import ObjectRef
from components.core.state import StateDict, add, subtract, weighted_sum, zeros_like
from components.federation.protocol import ForgetResult, UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, RoundManifest, UnlearningManifest
from components.lineage.retention import check_updates_kept

VARIANTS = ("subtract", "renormalise")


def _lineage_scales_and_forgotten(
    history: UpdateHistory, source: ObjectRef
) -> tuple[list[tuple[ObjectRef, RoundManifest]], dict[str, float], set[str]]:
    """Rounds of the lineage (newest first), current round scales, clients already forgotten."""
    rounds: list[tuple[ObjectRef, RoundManifest]] = []
    scales: dict[str, float] = {}
    forgotten: set[str] = set()
    for ref, manifest in history.iter_lineage(source):
        if isinstance(manifest, UnlearningManifest):
            forgotten.add(manifest.forgotten_client)
            for key, value in manifest.round_scales.items():
                scales.setdefault(key, value)  # the newest deletion's scale wins
        else:
            rounds.append((ref, manifest))
    return rounds, scales, forgotten


def forget_by_running_sums(
    history: UpdateHistory,
    source: ObjectRef,
    source_manifest: Manifest,
    client_id: str,
    variant: str = "subtract",
) -> ForgetResult:
    """Remove ``client_id``'s applied contributions from the source version.

    Every object read is checked against the sha256 recorded for it; a
    mismatch raises :class:`~components.store.IntegrityError` before anything
    is written.
    """
    if variant not in VARIANTS:
        raise UnlearningError(f"unknown forgetting variant {variant!r}; choose {' or '.join(VARIANTS)}")
    if client_id not in source_manifest.sums:
        raise UnlearningError(
            f"client {client_id} never contributed to the lineage of this model version "
            "(or was already removed from it)"
        )
    removed = source_manifest.sums[client_id]
    check_updates_kept(
        history.store, [(f"running sum of {client_id}", removed)], "forgetting from this version",
        "Forget from the current champion (its running sums are always kept)",
    )  # fmt: skip
    state = history.read_state(source_manifest.global_state)
    state = subtract(state, history.read_state(removed))
    if variant == "subtract":
        return ForgetResult(state, removed, {}, {}, objects_read=2)

    rounds, scales, forgotten = _lineage_scales_and_forgotten(history, source)
    needed = [
        (f"update of {c.client_id} (round {m.server_round})", c.update)
        for _, m in rounds
        if any(e.client_id == client_id for e in m.clients)
        for c in m.clients
        if c.update is not None and c.client_id not in forgotten
    ]
    check_updates_kept(history.store, needed, "the renormalise variant")
    reads = 2 + len(rounds)
    correction = zeros_like(state)
    sum_corrections: dict[str, StateDict] = {}
    new_scales: dict[str, float] = {}
    for ref, manifest in rounds:
        weights = {c.client_id: c.weight for c in manifest.clients}
        if client_id not in weights:
            continue
        present = [c for c in manifest.clients if c.client_id not in forgotten and c.client_id != client_id]
        scale = scales.get(ref.key, 1.0)
        total_before = scale * (weights[client_id] + sum(c.weight for c in present))
        remaining = sum(c.weight for c in present)
        new_scale = total_before / remaining if remaining > 0 else 0.0
        new_scales[ref.key] = new_scale
        if not present or new_scale == scale:
            continue
        factor = new_scale - scale
        for entry in present:
            delta = history.read_update(entry.update)
            reads += 1
            extra = weighted_sum([delta], [factor * entry.weight])
            correction = add(correction, extra)
            previous = sum_corrections.get(entry.client_id)
            sum_corrections[entry.client_id] = extra if previous is None else add(previous, extra)
    new_sums = {
        cid: add(history.read_state(source_manifest.sums[cid]), extra) for cid, extra in sum_corrections.items()
    }
    reads += len(new_sums)
    return ForgetResult(add(state, correction), removed, new_sums, new_scales, objects_read=reads)
