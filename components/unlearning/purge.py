"""What a deletion purges: every stored object the manifests say holds the client's data or contributions.

The list comes from the manifests of the model's lineages, never from key
patterns: a client id means something only inside one data partition, so
another model's ``client_04`` (same id, other person) is never touched. Two
kinds go:

- the client's own records (:func:`client_objects`): uploads, applied
  updates, running sums, soft labels, its personal state, its staged shards;
- copies derived from it (:func:`derived_objects`): the server's own objects of
  every round that held the client (per-architecture averages, consensus
  labels, groupings, picks), and the personal states other clients built from
  a model that held it (they start again from the clean model).

What stays is the other clients' own uploads, computed from models that held
the client: the indirect influence a ``contributions`` deletion keeps (and
needs, to forget them exactly later).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from components.core.ids import validate_id
from components.core.refs import ObjectRef, sha256_bytes
from components.data.staging import shard_key
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, RoundManifest, UnlearningManifest, manifest_from_bytes

MANIFEST_NAME = "manifest.json"


def model_manifests(history: UpdateHistory, heads: Iterable[ObjectRef]) -> list[tuple[ObjectRef, Manifest]]:
    """Every manifest of the lineages at ``heads`` (each hash-checked), plus every committed round of the
    federations those lineages name (a round committed but never registered holds its clients too)."""
    store = history.store
    found: dict[str, tuple[ObjectRef, Manifest]] = {}
    federations: set[str] = set()
    for ref, manifest in history.iter_lineages(heads):
        found[ref.key] = (ref, manifest)
        if isinstance(manifest, RoundManifest):
            federations.add(manifest.federation_id)
    for federation_id in sorted(federations):
        for key in store.list(f"{UpdateHistory.federation_prefix(federation_id)}rounds/"):
            if key.endswith(f"/{MANIFEST_NAME}") and key not in found:
                data = store.get(key)
                found[key] = (ObjectRef(key, sha256_bytes(data), len(data)), manifest_from_bytes(data))
    return [found[key] for key in sorted(found)]


def client_objects(manifests: Iterable[tuple[ObjectRef, Manifest]], client_id: str) -> list[tuple[str, ObjectRef]]:
    """The client's own records that ``manifests`` name: uploads, applied updates, running sums, per-client
    objects (soft labels, personal states), and its staged training shards (by the rounds' data versions)."""
    found: dict[str, tuple[str, ObjectRef]] = {}

    def add(what: str, ref: ObjectRef | None) -> None:
        if ref is not None:
            found.setdefault(ref.key, (what, ref))

    for _, manifest in manifests:
        if isinstance(manifest, RoundManifest):
            r = manifest.server_round
            for entry in manifest.clients:
                if entry.client_id != client_id:
                    continue
                add(f"update of {client_id} (round {r})", entry.update)
                add(f"upload of {client_id} (round {r})", entry.upload)
                for name, ref in sorted(entry.objects.items()):
                    add(f"{name} of {client_id} (round {r})", ref)
                key = shard_key(manifest.data_version, client_id)
                found.setdefault(
                    key, (f"training shard of {client_id} (data {manifest.data_version})", ObjectRef(key, ""))
                )
        elif isinstance(manifest, UnlearningManifest) and manifest.forgotten_client == client_id:
            add(f"running sum of {client_id} (subtracted)", manifest.removed)
        add(f"running sum of {client_id}", manifest.sums.get(client_id))
        add(f"personal state of {client_id}", manifest.personal.get(client_id))
    return [found[key] for key in sorted(found)]


def derived_objects(
    history: UpdateHistory, manifests: Iterable[tuple[ObjectRef, Manifest]], client_id: str
) -> list[tuple[str, ObjectRef]]:
    """Copies of the client held by other objects: every round that the client took part in, or that started
    from a model holding it, contributes its server objects and the personal states recorded in it."""
    from components.unlearning.guard import present_clients, start_clients

    found: dict[str, tuple[str, ObjectRef]] = {}
    for _, manifest in manifests:
        if not isinstance(manifest, RoundManifest):
            continue
        before = present_clients(history, manifest.parent) if manifest.parent else start_clients(manifest)
        if client_id not in before and client_id not in manifest.client_ids:
            continue
        r = manifest.server_round
        for name, ref in sorted(manifest.objects.items()):
            found.setdefault(ref.key, (f"{name} (round {r}, computed with {client_id})", ref))
        for entry in manifest.clients:
            personal = entry.objects.get("personal")
            if personal is not None and entry.client_id != client_id:
                found.setdefault(personal.key, (f"personal state of {entry.client_id} (round {r}, built from a "
                                                f"model holding {client_id})", personal))  # fmt: skip
    return [found[key] for key in sorted(found)]


def stored_client_objects(
    history: UpdateHistory, heads: Iterable[ObjectRef], client_id: str, derived: bool = False
) -> list[ObjectRef]:
    """The client's objects still in the store (and, with ``derived``, the copies derived from it), each with
    the sha256 of its bytes now."""
    return [ref for _, ref in purge_list(history, heads, client_id, derived)]


def purge_list(
    history: UpdateHistory, heads: Iterable[ObjectRef], client_id: str, derived: bool = True
) -> list[tuple[str, ObjectRef]]:
    """(what, reference with the sha256 of its bytes now) of everything a deletion of the client purges: what
    a tombstone lists."""
    store = history.store
    manifests = model_manifests(history, heads)
    wanted = client_objects(manifests, client_id) + (derived_objects(history, manifests, client_id) if derived else [])
    found = []
    for what, ref in wanted:
        if store.exists(ref.key):
            data = store.get(ref.key)
            found.append((what, ObjectRef(ref.key, sha256_bytes(data), len(data))))
    return found


# The prepared files of one client under a profile's data folder (``data/<profile>``).
PREPARED_CLIENT_FILES = ("federation/clients/{}.safetensors", "federation/holdout/{}.safetensors")


def prepared_files(data_dir: Path, client_id: str) -> list[dict[str, Any]]:
    """The client's prepared shard files still in ``data_dir``, with their sha256 (what a tombstone lists)."""
    found = []
    for pattern in PREPARED_CLIENT_FILES:
        path = data_dir / pattern.format(validate_id(client_id, "client id"))
        if path.is_file():
            data = path.read_bytes()
            found.append({"path": pattern.format(client_id), "sha256": sha256_bytes(data), "size": len(data)})
    return found


def remove_prepared_files(data_dir: Path, files: Iterable[Mapping[str, Any]]) -> int:
    """Delete the listed prepared files (relative to ``data_dir``); return how many were still there.

    A re-run of the prepare stage (``dvc repro``) writes the shard again from
    the raw data set: the deletion records still keep it out of staging.
    """
    removed = 0
    for item in files:
        path = data_dir / str(item["path"])
        if path.is_file() and path.resolve().is_relative_to(data_dir.resolve()):
            path.unlink()
            removed += 1
    return removed


def clear_cache(folder: Path) -> int:
    """Delete every file of a derived-data cache (features computed from the shards, the client's among
    them; rebuilt on demand). Returns how many files went."""
    if not folder.is_dir():
        return 0
    removed = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed
