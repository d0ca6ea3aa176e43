"""Lineage audit: what is in a model version, and can every claim be verified?

Built from the archive alone (manifests, objects, tombstones) plus the
registry's tags, handed in as plain dicts: no in-process state is trusted.
Walking from a version's manifest back to the initial model, every manifest is
checked against the hash its successor (or the version's tag) recorded, and
every object it references against the hash in the manifest. Problems are
findings, never exceptions: a missing object, a changed one, a broken chain, a
tag that points nowhere or disagrees with its manifest.

Whether a client is present is decided from the lineage itself (it trained in
a round that no later deletion in the lineage removed) and cross-checked with
the running-sum index of the version's manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from components.core.refs import ObjectRef, sha256_bytes
from components.core.serialize import state_from_bytes
from components.core.state import weights_digest
from components.federation.protocol import UnlearningError
from components.lineage.history import UpdateHistory, manifest_objects, object_owners
from components.lineage.manifests import Manifest, RoundManifest, UnlearningManifest, manifest_from_bytes
from components.lineage.retention import dropped_objects
from components.lineage.store import ObjectNotFound, ObjectStore, StoreError
from components.lineage.tags import expected_version_tags
from components.unlearning.guard import forgotten_clients, registry_deletions, start_clients, unlearning_manifests
from components.unlearning.purge import derived_objects
from components.unlearning.retire import read_retirements
from components.unlearning.tombstones import TOMBSTONE_PREFIX

# The served model's weights digest over the given keys (None: the registry serves no weights for it).
ServedWeights = Callable[[list[str]], str | None]

REPORT_SCHEMA = "fedforget/audit-report@1"


@dataclass
class ObjectCheck:
    """One archived object and what became of it."""

    what: str
    key: str
    sha256: str
    status: str  # ok | mismatch | missing | purged | retired | dropped (by retention)
    actual_sha256: str | None = None
    purged_by: str | None = None  # request id of the deletion that purged (or retired) it
    tombstone_sha256: str | None = None  # the hash the tombstone (or retirement record) recorded for it


@dataclass
class Node:
    """One step of the lineage: a federation round or a deletion."""

    kind: str  # round | unlearning
    manifest_key: str
    manifest_sha256: str
    version: str | None
    version_kind: str | None
    server_round: int
    federation_id: str | None
    data_version: str
    created_at: str
    clients: list[dict[str, Any]] = field(default_factory=list)
    deletion: dict[str, Any] | None = None
    present_clients: list[str] = field(default_factory=list)
    contains_forgotten_clients: list[str] = field(default_factory=list)
    method: str | None = None  # a round's protocol (and strategy): weights/credit, soft-labels...
    decisions: dict[str, Any] = field(default_factory=dict)  # what its server step decided, as the manifest records


@dataclass
class Finding:
    kind: (
        str  # object_missing | object_mismatch | manifest_unreadable | tag_mismatch | index_mismatch | tainted_teacher
    )
    message: str
    key: str | None = None


@dataclass
class AuditReport:
    version: str
    version_kind: str
    manifest_key: str
    nodes: list[Node]
    objects: list[ObjectCheck]
    findings: list[Finding]
    tombstoned_clients: list[str]
    retired_versions: list[str] = field(default_factory=list)  # versions whose weights a deletion removed
    client: str | None = None
    client_present: bool | None = None
    generated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def present_clients(self) -> list[str]:
        return self.nodes[0].present_clients if self.nodes else []

    @property
    def deletions(self) -> list[dict[str, Any]]:
        return [n.deletion for n in reversed(self.nodes) if n.deletion]

    @property
    def flagged_versions(self) -> list[dict[str, Any]]:
        return [
            {"version": n.version, "contains_forgotten_clients": n.contains_forgotten_clients}
            for n in self.nodes
            if n.contains_forgotten_clients
        ]

    @property
    def verdict(self) -> str:
        if self.findings:
            return "findings"
        if self.client is not None:
            return "client_present" if self.client_present else "client_absent"
        return "verified"

    def exit_code(self) -> int:
        """0: verified (and the client absent); 1: the client is present; 3: findings."""
        if self.client is not None and self.client_present:
            return 1
        return 3 if self.findings else 0

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for check in self.objects:
            counts[check.status] = counts.get(check.status, 0) + 1
        return {
            "schema": REPORT_SCHEMA,
            "generated_at": self.generated_at,
            "version": self.version,
            "version_kind": self.version_kind,
            "manifest_key": self.manifest_key,
            "verdict": self.verdict,
            "client": None if self.client is None else {"client_id": self.client, "present": self.client_present},
            "present_clients": self.present_clients,
            "tombstoned_clients": self.tombstoned_clients,
            "lineage": [asdict(n) for n in self.nodes],
            "deletions": self.deletions,
            "flagged_versions": self.flagged_versions,
            "retired_versions": self.retired_versions,
            "objects": {
                "checked": len(self.objects),
                "ok": counts.get("ok", 0),
                "purged": counts.get("purged", 0),
                "retired": counts.get("retired", 0),
                "dropped": counts.get("dropped", 0),
                "missing": counts.get("missing", 0),
                "mismatch": counts.get("mismatch", 0),
                "items": [asdict(c) for c in self.objects],
            },
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def read_tombstones(store: ObjectStore, model: str | None = None) -> dict[str, dict[str, Any]]:
    """Every tombstone of ``model`` (``None``: of every model) and every unscoped legacy one, by client id
    (unreadable ones are skipped: the audit reports purges it cannot explain). Each carries its ``_key``
    and ``_sha256``."""
    tombstones = {}
    for key in store.list(TOMBSTONE_PREFIX):
        parts = key[len(TOMBSTONE_PREFIX) :].split("/")
        if not key.endswith(".json") or len(parts) > 2 or (len(parts) == 2 and model not in (None, parts[0])):
            continue
        try:
            data = store.get(key)
            record = json.loads(data)
        except (StoreError, ValueError, UnlearningError):
            continue
        client_id = parts[-1].removesuffix(".json")
        if len(parts) == 2 or client_id not in tombstones:  # a scoped record wins over a legacy one
            tombstones[client_id] = {**record, "_key": key, "_sha256": sha256_bytes(data)}
    return tombstones


class _Auditor:
    def __init__(self, store: ObjectStore, versions_by_manifest: Mapping[str, Mapping[str, str]],
                 tombstones: Mapping[str, Mapping[str, Any]], retirements: list[Mapping[str, Any]]) -> None:  # fmt: skip
        self.store = store
        self.versions = versions_by_manifest
        self.tombstones = tombstones
        # Deletions a record explains: key -> (status, request id, the hash recorded before deleting, client).
        self.explained = {
            p["key"]: ("purged", record.get("request_id"), p["sha256"], record.get("client_id"))
            for record in tombstones.values()
            for p in record.get("purged", [])
        }
        for record in retirements:
            for state in record.get("states", []):
                self.explained.setdefault(
                    state["key"], ("retired", record.get("request_id"), state["sha256"], record.get("client_id"))
                )
        for key, item in dropped_objects(store).items():
            self.explained.setdefault(key, ("dropped", item.get("reason"), item["sha256"], None))
        self.checked: dict[str, ObjectCheck] = {}
        self.findings: list[Finding] = []
        # (what, key, owner, status, request id, client named by the record): checked against the lineage at the end
        self.claims: list[tuple[str, str, str | None, str, str | None, str | None]] = []

    def check_object(self, what: str, ref: ObjectRef, owner: str | None = None) -> None:
        if ref.key in self.checked:
            return
        try:
            actual = sha256_bytes(self.store.get(ref.key))
        except ObjectNotFound:
            explained = self.explained.get(ref.key)
            if explained is not None:
                status, request_id, recorded, named = explained
                check = ObjectCheck(what, ref.key, ref.sha256, status, purged_by=request_id, tombstone_sha256=recorded)
                if status != "dropped":
                    self.claims.append((what, ref.key, owner, status, request_id, named))
                if recorded != ref.sha256:
                    self.findings.append(Finding(
                        "object_mismatch", f"{what}: the {status} record has sha256 {recorded[:12]}..., "
                        f"the manifest {ref.sha256[:12]}...", ref.key))  # fmt: skip
            else:
                check = ObjectCheck(what, ref.key, ref.sha256, "missing")
                self.findings.append(
                    Finding(
                        "object_missing",
                        f"{what}: {ref.key} is missing and no tombstone or retirement record explains it",
                        ref.key,
                    )
                )
            self.checked[ref.key] = check
            return
        except StoreError as exc:
            self.checked[ref.key] = ObjectCheck(what, ref.key, ref.sha256, "missing")
            self.findings.append(Finding("object_missing", f"{what}: {ref.key} could not be read: {exc}", ref.key))
            return
        status = "ok" if actual == ref.sha256 else "mismatch"
        self.checked[ref.key] = ObjectCheck(what, ref.key, ref.sha256, status, actual_sha256=actual)
        if status == "mismatch":
            self.findings.append(Finding(
                "object_mismatch", f"{what}: {ref.key} has sha256 {actual[:12]}..., recorded {ref.sha256[:12]}...", ref.key
            ))  # fmt: skip

    def read_manifest(self, ref: ObjectRef) -> Manifest | None:
        try:
            data = self.store.get(ref.key)
        except StoreError as exc:
            self.findings.append(Finding("manifest_unreadable", f"manifest {ref.key} cannot be read: {exc}", ref.key))
            return None
        actual = sha256_bytes(data)
        if actual != ref.sha256:
            self.findings.append(Finding(
                "object_mismatch", f"manifest {ref.key} has sha256 {actual[:12]}..., recorded {ref.sha256[:12]}... "
                "(the lineage below it cannot be trusted)", ref.key))  # fmt: skip
        try:
            return manifest_from_bytes(data)
        except (ValueError, KeyError) as exc:
            self.findings.append(
                Finding("manifest_unreadable", f"manifest {ref.key} is not a manifest: {exc}", ref.key)
            )
            return None

    def check_tags(
        self, ref: ObjectRef, manifest: Manifest, tags: Mapping[str, str], parent_version: str | None
    ) -> None:
        version = tags.get("_version", "?")
        expected = expected_version_tags(ref, manifest, parent_version)
        for key, value in expected.items():
            if tags.get(key) != value:
                self.findings.append(Finding(
                    "tag_mismatch", f"version {version}: tag {key}={tags.get(key)!r} but the archive says {value!r}", ref.key
                ))  # fmt: skip

    def check_manifest_objects(self, manifest: Manifest) -> None:
        owners = object_owners(manifest)
        for what, ref in manifest_objects(manifest):
            self.check_object(what, ref, owners.get(ref.key))

    def check_claims(
        self, deletions: set[tuple[str, str]], lineage_clients: set[str], derived: Callable[[str], set[str]]
    ) -> None:
        """A record explains a missing object only if it names the object's own client (purged objects; or a
        client it was derived from, ``derived(client)`` being the keys of those copies), a client of this
        lineage (retired states), and a deletion of that client by that request."""
        for what, key, owner, status, request_id, named in self.claims:
            if status == "purged" and owner is not None and named != owner and key not in derived(str(named)):
                problem = f"the tombstone that lists it is {named}'s, but the object is {owner}'s"
            elif status == "retired" and named not in lineage_clients:
                problem = f"the retirement record names {named}, who is not in this lineage"
            elif (str(named), str(request_id)) not in deletions:
                problem = f"no deletion of {named} by request {request_id} is recorded for this model"
            else:
                continue
            self.findings.append(Finding("record_mismatch", f"{what}: {key} is missing and {problem}", key))


def audit(
    store: ObjectStore,
    version: str,
    tags: Mapping[str, str],
    versions_by_manifest: Mapping[str, Mapping[str, str]],
    client: str | None = None,
    model: str | None = None,
    served_weights: ServedWeights | None = None,
) -> AuditReport:
    """Audit ``version`` (its registry ``tags``) against the archive in ``store``.

    ``versions_by_manifest`` maps each registered version's ``manifest_key`` to
    its tags (plus ``_version``), so manifests can be named by version; ``model``
    is the registered model's name (deletion records are scoped by it);
    ``served_weights`` computes the digest of the weights the registry serves
    for ``version``, which must equal the archived state's.
    """
    tombstones = read_tombstones(store, model)
    retirements = read_retirements(store)
    auditor = _Auditor(store, versions_by_manifest, tombstones, retirements)
    kind = tags.get("kind", "?")
    key, sha = tags.get("manifest_key"), tags.get("manifest_sha256")
    # versions of this registered model (``model``: None reads every record; unnamed, older records count as its)
    mine = [r for r in retirements if model is None or r.get("model") in (None, model)]
    retired = sorted({v for r in mine for v in r.get("versions", [])}, key=int)
    registry = registry_deletions(versions_by_manifest.values())
    forgotten = forgotten_clients(store, model, also=registry) if model else {**registry, **tombstones}
    report = AuditReport(version, kind, key or "", [], [], auditor.findings, sorted(forgotten), retired, client)
    if not key or not sha:
        auditor.findings.append(Finding("tag_mismatch", f"version {version} has no manifest_key/manifest_sha256 tag"))
        report.objects = list(auditor.checked.values())
        return report

    chain: list[tuple[ObjectRef, Manifest]] = []
    ref: ObjectRef | None = ObjectRef(key, sha)
    while ref is not None:
        manifest = auditor.read_manifest(ref)
        if manifest is None:
            break
        chain.append((ref, manifest))
        ref = manifest.parent

    nodes: list[Node] = []
    for position, (ref, manifest) in enumerate(chain):
        tags_here = versions_by_manifest.get(ref.key)
        parent = chain[position + 1][0] if position + 1 < len(chain) else None
        parent_version = versions_by_manifest.get(parent.key, {}).get("_version") if parent else None
        if tags_here is not None:
            auditor.check_tags(ref, manifest, tags_here, parent_version)
        auditor.check_manifest_objects(manifest)
        node = Node(
            kind="round" if isinstance(manifest, RoundManifest) else "unlearning",
            manifest_key=ref.key,
            manifest_sha256=ref.sha256,
            version=tags_here.get("_version") if tags_here else None,
            version_kind=tags_here.get("kind") if tags_here else None,
            server_round=manifest.server_round,
            federation_id=getattr(manifest, "federation_id", None),
            data_version=manifest.data_version,
            created_at=manifest.created_at,
        )
        if isinstance(manifest, UnlearningManifest):
            node.deletion = {
                "request_id": manifest.request_id,
                "time": manifest.created_at,
                "client_id": manifest.forgotten_client,
                "variant": manifest.variant,
                "source_version": manifest.source_version,
                "teacher": manifest.recovery.get("teacher"),
                "teacher_run_id": manifest.recovery.get("teacher_run_id"),
                "data_version": manifest.data_version,
            }
            node.deletion["guarantee"] = manifest.guarantee or "unrecorded"
            _check_tombstone_binding(auditor, manifest, tags_here, tombstones)
            if manifest.recovery.get("teacher") == "global-model":
                auditor.findings.append(Finding(
                    "tainted_teacher", f"the deletion of {manifest.forgotten_client} (request {manifest.request_id}) "
                    f"restored quality by distilling from version {manifest.source_version}, which still contained "
                    f"{manifest.forgotten_client}", ref.key))  # fmt: skip
        else:
            modes, devices = manifest.protocol.get("modes") or {}, manifest.protocol.get("devices") or {}
            node.clients = [
                {"client_id": c.client_id, "num_examples": c.num_examples, "weight": c.weight,
                 "model": c.spec.to_dict() if c.spec is not None else None,  # heterogeneous clients: their own
                 **({"mode": modes[c.client_id], "device": devices.get(c.client_id)}  # few-shot: how it fine-tuned
                    if c.client_id in modes else {})}
                for c in manifest.clients
            ]  # fmt: skip
            strategy = (manifest.protocol.get("strategy") or {}).get("name")
            node.method = "/".join(str(p) for p in (manifest.protocol.get("name", "weights"), strategy) if p)
            node.decisions = dict(manifest.extra)
        nodes.append(node)

    # What each model contains, from the oldest step up: a round adds its
    # participants, a deletion removes its client from everything before it.
    present: set[str] = set()
    started = set().union(*(start_clients(m) for _, m in chain))  # a registered starting point's clients
    for node in reversed(nodes):
        if node.deletion:
            present.discard(node.deletion["client_id"])
        present |= {c["client_id"] for c in node.clients} | started
        node.present_clients = sorted(present)
        node.contains_forgotten_clients = sorted(c for c in present if c in forgotten)

    if chain and (chain[0][1].sums or chain[0][1].protocol.get("name") == "weights"):
        index = set(chain[0][1].sums) | started
        if index != present:
            auditor.findings.append(Finding(
                "index_mismatch", f"the running-sum index of version {version} lists {sorted(index)}, "
                f"the lineage says {sorted(present)}", chain[0][0].key))  # fmt: skip
    deletions = {(m.forgotten_client, m.request_id) for m in unlearning_manifests(store)
                 if model is None or m.registered_model in (None, model)}  # fmt: skip
    deletions |= {(t["forgotten_client"], t.get("request_id", "")) for t in registry_tags(versions_by_manifest)}
    lineage_clients = {c["client_id"] for n in nodes for c in n.clients} | started
    history = UpdateHistory(store)
    copies: dict[str, set[str]] = {}

    def derived(named: str) -> set[str]:  # the copies a deletion of ``named`` purges, from this lineage's manifests
        if named not in copies:
            try:
                copies[named] = {ref.key for _, ref in derived_objects(history, chain, named)}
            except (StoreError, ValueError, KeyError):  # a broken chain is reported by the walk itself
                copies[named] = set()
        return copies[named]

    auditor.check_claims(deletions, lineage_clients | {f"{model}/{c}" for c in lineage_clients}, derived)
    if chain and served_weights is not None:
        _check_served(auditor, store, version, chain[0][1], served_weights, version in retired)
    report.nodes = nodes
    report.objects = list(auditor.checked.values())
    if client is not None:
        report.client_present = client in present
    return report


def registry_tags(versions_by_manifest: Mapping[str, Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The tags of every registered deletion version."""
    return [t for t in versions_by_manifest.values() if t.get("kind") == "unlearned" and t.get("forgotten_client")]


def _check_tombstone_binding(
    auditor: _Auditor, manifest: UnlearningManifest, tags: Mapping[str, str] | None,
    tombstones: Mapping[str, Mapping[str, Any]],
) -> None:  # fmt: skip
    """The registry binds a deletion's tombstone by its sha256 (a second system): a forged, swapped or
    removed tombstone disagrees with it."""
    bound = (tags or {}).get("tombstone_sha256")
    if not bound:
        return
    record = tombstones.get(manifest.forgotten_client)
    if record is None:
        auditor.findings.append(Finding(
            "tombstone_mismatch", f"the deletion of {manifest.forgotten_client} (request {manifest.request_id}) "
            f"is bound to tombstone sha256 {bound[:12]}..., and the tombstone is missing"))  # fmt: skip
    elif record["_sha256"] != bound or record.get("request_id") != manifest.request_id:
        auditor.findings.append(Finding(
            "tombstone_mismatch", f"the tombstone of {manifest.forgotten_client} ({record['_key']}) has sha256 "
            f"{record['_sha256'][:12]}... and request {record.get('request_id')}; the registry bound "
            f"{bound[:12]}... of request {manifest.request_id}", record["_key"]))  # fmt: skip


def _check_served(
    auditor: _Auditor, store: ObjectStore, version: str, manifest: Manifest, served: ServedWeights, retired: bool
) -> None:
    """The weights the registry serves for ``version`` must be the archived state its manifest names."""
    try:
        archived, _ = state_from_bytes(store.get_verified(manifest.global_state))
    except StoreError:
        return  # the object check already reported it (missing, changed, or retired)
    keys = sorted(archived)
    try:
        digest = served(keys)
    except Exception as exc:  # an artifact that does not load, or lacks the archived weights
        auditor.findings.append(Finding(
            "served_weights_mismatch", f"version {version}: the registry's model could not be read for "
            f"comparison ({type(exc).__name__}: {exc})"))  # fmt: skip
        return
    if digest is None:
        if not retired:
            auditor.findings.append(Finding(
                "served_weights_mismatch", f"version {version}: the registry serves no weights for it, "
                "and no retirement record says why"))  # fmt: skip
        return
    expected = weights_digest(archived)
    if digest != expected:
        auditor.findings.append(Finding(
            "served_weights_mismatch", f"version {version}: the weights the registry serves (digest "
            f"{digest[:12]}...) are not the archived state {manifest.global_state.key} (digest {expected[:12]}...)",
            manifest.global_state.key))  # fmt: skip
