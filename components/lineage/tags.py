"""The MLflow tag schema, in one place: model versions' lineage tags and runs' tags.

Tags are a convenience for people and searches; the manifests are the record.
:func:`expected_version_tags` says what a version's tags must be, given its
manifest: the audit compares the two and reports any difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from components.core.refs import ObjectRef
from components.lineage.manifests import Manifest, RoundManifest

# Lineage tags every registered global version carries (README: "Lineage schema").
GLOBAL_TAG_KEYS = (
    "kind",
    "protocol",
    "round",
    "federation_id",
    "clients",
    "manifest_key",
    "manifest_sha256",
    "data_version",
    "parent_version",
)
# Flags set on versions after the fact.
CONTAINS_TAG = "contains_forgotten_clients"  # the version's lineage holds these (tombstoned) clients
REJECTED_TAG = "rejected"  # the evaluation gate refused to promote it (the reason)
RETIRED_TAG = "retired"  # its weights were deleted because its lineage holds a forgotten client
TEACHER_TAINT_TAG = "teacher_contains_forgotten_client"  # recovered with a teacher that saw the client
TOMBSTONE_TAG = "tombstone_sha256"  # a deletion's version: its tombstone's hash, bound in a second system
FORGETTING_TAG = "forgetting"  # a deletion's version: the guarantee it gave (replay | contributions | approximate)


def privacy_tags(epsilon: float, delta: float, noise_multiplier: float) -> dict[str, str]:
    """A DP version's privacy spent over its lineage: ``(dp_epsilon, dp_delta)``-DP at ``dp_noise_multiplier``."""
    return {"dp_epsilon": f"{epsilon:.6g}", "dp_delta": f"{delta:g}", "dp_noise_multiplier": f"{noise_multiplier:g}"}


def global_version_tags(
    *,
    server_round: int,
    federation_id: str,
    clients: Sequence[str],
    manifest: ObjectRef,
    data_version: str,
    parent_version: str | None,
    protocol: str = "weights",
) -> dict[str, str]:
    """The lineage tags of a registered global model version."""
    return {
        "kind": "global",
        "protocol": protocol,
        "round": str(server_round),
        "federation_id": federation_id,
        "clients": ",".join(sorted(clients)),
        "manifest_key": manifest.key,
        "manifest_sha256": manifest.sha256,
        "data_version": data_version,
        "parent_version": parent_version or "none",
    }


def unlearned_version_tags(
    *,
    client_id: str,
    request_id: str,
    source_version: str,
    source_federation_id: str,
    variant: str,
    teacher: str,
    teacher_run_id: str,
    data_version: str,
    server_round: int,
    manifest: ObjectRef,
    metrics: Mapping[str, float],
    guarantee: str,
) -> dict[str, str]:
    """The lineage tags of a version produced by a deletion (plus its verification metrics)."""
    tags = {
        "kind": "unlearned",
        FORGETTING_TAG: guarantee,
        "forgotten_client": client_id,
        "request_id": request_id,
        "source_version": source_version,
        "forgetting_variant": variant,
        "teacher": teacher,
        "teacher_run_id": teacher_run_id,
        "data_version": data_version,
        "round": str(server_round),
        "federation_id": source_federation_id,
        "manifest_key": manifest.key,
        "manifest_sha256": manifest.sha256,
        "parent_version": source_version,
        "test_accuracy": f"{metrics['test_accuracy_after']:.6f}",
    }
    return tags | {k: f"{v:.6f}" for k, v in metrics.items()}


def expected_version_tags(ref: ObjectRef, manifest: Manifest, parent_version: str | None) -> dict[str, str]:
    """What a version's lineage tags must say, given the manifest they point at."""
    expected = {
        "manifest_sha256": ref.sha256,
        "round": str(manifest.server_round),
        "parent_version": parent_version or "none",
        "data_version": manifest.data_version,
    }
    if isinstance(manifest, RoundManifest):
        return expected | {
            "kind": "global",
            "federation_id": manifest.federation_id,
            "clients": ",".join(sorted(manifest.client_ids)),
        }
    return (
        expected
        | ({FORGETTING_TAG: manifest.guarantee} if manifest.guarantee else {})
        | {
            "kind": "unlearned",
            "forgotten_client": manifest.forgotten_client,
            "request_id": manifest.request_id,
            "source_version": manifest.source_version,
            "forgetting_variant": manifest.variant,
        }
    )


def manifest_ref_from_tags(tags: Mapping[str, str]) -> ObjectRef:
    """The manifest a registered version's tags point at."""
    try:
        return ObjectRef(tags["manifest_key"], tags["manifest_sha256"])
    except KeyError as exc:
        raise ValueError(f"model version has no lineage tag {exc}") from None


# --------------------------------------------------------------------------- run tags


def federation_run_tags(
    *, federation_id: str, profile: str, data_version: str, store: str, protocol: str, resumed_from: str | None,
    flow_run_id: str,
) -> dict[str, str]:  # fmt: skip
    return {
        "kind": "federation",
        "federation_id": federation_id,
        "profile": profile,
        "data_version": data_version,
        "store": store,
        "protocol": protocol,
        "resumed_from_version": resumed_from or "none",
        "prefect_flow_run_id": flow_run_id,
    }


def unlearning_run_tags(
    *, request_id: str, client_id: str, source_version: str, variant: str, teacher: str, flow_run_id: str
) -> dict[str, str]:
    return {
        "kind": "unlearning",
        "request_id": request_id,
        "forgotten_client": client_id,
        "source_version": source_version,
        "forgetting_variant": variant,
        "teacher": teacher,
        "prefect_flow_run_id": flow_run_id,
    }


def teacher_run_tags(*, key: str, preset: str, data_version: str) -> dict[str, str]:
    return {"kind": "teacher", "teacher_key": key, "preset": preset, "data_version": data_version}


def audit_run_tags(*, version: str, verdict: str, findings: int, client: str | None) -> dict[str, str]:
    tags = {"kind": "audit", "audited_version": version, "verdict": verdict, "findings": str(findings)}
    return tags | ({"audited_client": client} if client else {})


def evaluation_run_tags(suite: str) -> dict[str, str]:
    return {"kind": "evaluation", "suite": suite}
