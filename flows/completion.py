"""Completing a deletion whose version is registered: what ``unlearn`` does last, and again after a failure.

Every step is idempotent, so a deletion that failed half-way (a store outage
after its version was registered) is completed by running it again: flag and
retire the versions that still hold the client (here and in derived models),
tombstone it, purge what the manifests say holds it or was derived from it,
keep ``champion`` on a clean version, bind the tombstone's hash in the
registry, and sign the receipt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.config.runtime import Runtime
from components.config.sections import Config
from components.core.refs import ObjectRef
from components.core.state import weights_digest
from components.lineage.history import UpdateHistory
from components.lineage.manifests import utc_now
from components.lineage.store import ObjectStore, open_store
from components.lineage.tags import FORGETTING_TAG, TOMBSTONE_TAG, manifest_ref_from_tags
from components.unlearning.forget import protocol_of
from components.unlearning.purge import clear_cache, prepared_files, purge_list, remove_prepared_files
from components.unlearning.receipts import build_receipt, load_signing_key, read_receipt, sign_receipt, write_receipt
from components.unlearning.tombstones import delete_objects, read_intent, read_tombstone, write_tombstone
from flows.ledger import ensure_clean_champion, forgotten_for
from flows.retire import derived_trackers, flag_versions_task, retire_task
from flows.tracking import Tracker, VersionInfo

RECEIPT_KEY_FILE = "keys/receipt-ed25519.pem"  # under the project's state folder, unless the environment names one


@dataclass(frozen=True)
class DeletionContext:
    """What every step of one deletion shares."""

    runtime: Runtime
    config: Config
    profile: str
    store: ObjectStore
    history: UpdateHistory
    tracker: Tracker

    @property
    def model(self) -> str:
        return self.config.registry.model_name


@task(name="tombstone-and-purge", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=2)
def tombstone_task(
    store_url: str, model: str, client_id: str, version: VersionInfo, heads: list[ObjectRef], data_dir: str,
    cache_dir: str, reason: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Tombstone the client, then purge what the manifests of ``heads`` say holds it or was derived from it,
    its prepared shards, the feature cache built from the shards, and half-written objects.

    Hashes first, then the tombstone, then the deletes: a crash in between
    leaves a tombstone naming every object, and the next run deletes what is left.
    """
    store = open_store(store_url)
    tags = version.tags
    doomed = purge_list(UpdateHistory(store), heads, client_id)  # its own records and the copies derived from it
    files = prepared_files(Path(data_dir), client_id)
    tombstone = write_tombstone(
        store, model=model, client_id=client_id, request_id=tags["request_id"], source_version=tags["source_version"],
        resulting_version=version.version, variant=tags["forgetting_variant"],
        unlearning_manifest=manifest_ref_from_tags(tags), purged=doomed, reason=reason,
        guarantee=tags.get(FORGETTING_TAG), files=files,
    )  # fmt: skip
    record = read_tombstone(store, model, client_id) or {}
    purged = [ObjectRef.from_dict(ref) for ref in record.get("purged", [])]
    delete_objects(store, purged)  # the recorded ones: a rerun finishes what a crash left
    remove_prepared_files(Path(data_dir), record.get("files", []))
    swept = store.sweep_temporaries()  # half-written objects a crashed write left (the model-write lock is held)
    cleared = clear_cache(Path(cache_dir))  # features computed from every shard, the client's included
    return {"tombstone": tombstone, "purged": len(purged), "files_removed": len(record.get("files", [])),
            "temporaries_removed": swept, "cache_files_removed": cleared}  # fmt: skip


def complete_deletion(
    ctx: DeletionContext, version: VersionInfo, client_id: str, reason: str | None, started_at: str
) -> dict[str, Any]:
    """Finish a deletion whose version is registered (after a crash or a failure, or just now).

    Every step is idempotent: flag and retire the versions that still hold the
    client (here and in derived models), tombstone and purge, keep ``champion``
    on a clean version, bind the tombstone's hash in the registry, sign the receipt.
    """
    tracker, store_url = ctx.tracker, ctx.runtime.store
    mode = ctx.config.unlearn.retire_tainted
    request_id = version.tags["request_id"]
    if FORGETTING_TAG not in version.tags:  # a deletion from before guarantee levels: its manifest says which
        manifest = ctx.history.read_manifest(manifest_ref_from_tags(version.tags))
        guarantee = manifest.guarantee or protocol_of(manifest).guarantee(manifest.variant)
        tracker.set_version_tag(version.version, FORGETTING_TAG, guarantee)
        version = replace(version, tags={**version.tags, FORGETTING_TAG: guarantee})
    flagged = flag_versions_task(tracker, store_url, client_id, version.version)
    heads = [manifest_ref_from_tags(v.tags) for v in tracker.versions() if "manifest_key" in v.tags]
    done = tombstone_task(
        store_url,
        ctx.model,
        client_id,
        version,
        heads,
        str(ctx.runtime.data_dir(ctx.profile)),
        str(ctx.runtime.fewshot_cache_dir),
        reason,
    )
    retired = retire_task(tracker, store_url, client_id, request_id, mode, version.version)
    # Models derived from this one (a few-shot federation started from its student) hold the client too.
    for other in derived_trackers(tracker):
        name = other.registry.model_name
        qualified = f"{ctx.model}/{client_id}"
        flagged += [f"{name}/{v}" for v in flag_versions_task(other, store_url, qualified, "")]
        retired += [f"{name}/{v}" for v in retire_task(other, store_url, qualified, request_id, mode, "", True)]
    moved = ensure_clean_champion(tracker, ctx.history, forgotten_for(tracker, ctx.store), version)
    tombstone: ObjectRef = done["tombstone"]
    tracker.set_version_tag(version.version, TOMBSTONE_TAG, tombstone.sha256)
    receipt = receipt_task(ctx, version, client_id, tombstone, retired, flagged, started_at)
    return {"flagged_versions": flagged, "retired_versions": retired, "champion_moved_to": moved,
            "purged": done["purged"], "files_removed": done["files_removed"], "tombstone": tombstone.key,
            "guarantee": version.tags.get("forgetting"), "receipt": receipt}  # fmt: skip


@task(name="sign-receipt", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def receipt_task(
    ctx: DeletionContext, version: VersionInfo, client_id: str, tombstone: ObjectRef, retired: list[str],
    flagged: list[str], started_at: str,
) -> dict[str, Any]:  # fmt: skip
    """The deletion's signed receipt (written once to the store, logged with the deletion's run)."""
    request_id = version.tags["request_id"]
    existing = read_receipt(ctx.store, ctx.model, request_id)
    if existing is not None:
        return existing
    ref = manifest_ref_from_tags(version.tags)
    manifest = ctx.history.read_manifest(ref)
    intent = read_intent(ctx.store, ctx.model, client_id) or {}
    body = build_receipt(
        request_id=request_id, model=ctx.model, client_id=client_id, guarantee=version.tags[FORGETTING_TAG],
        source_version=version.tags["source_version"], new_version=version.version,
        retired_versions=[v for v in retired if "/" not in v], flagged_versions=[v for v in flagged if "/" not in v],
        unlearning_manifest=ref, tombstone=tombstone,
        weights_sha256=weights_digest(ctx.history.read_state(manifest.global_state)),
        verification={k: float(v) for k, v in manifest.metrics.items()},
        times={"intent_recorded_at": intent.get("time") or "", "started_at": started_at,
               "registered_at": manifest.created_at, "completed_at": utc_now()},
        reason=intent.get("reason"),
    )  # fmt: skip
    receipt = sign_receipt(body, load_signing_key(ctx.runtime.state_dir / RECEIPT_KEY_FILE))
    write_receipt(ctx.store, receipt)
    if version.run_id:
        with contextlib.suppress(Exception):  # the store's copy is the record; MLflow's is for people
            ctx.tracker.log_dict(version.run_id, receipt, "receipt.json")
    return receipt
