"""Signed deletion receipts: a portable, verifiable record that a client was forgotten.

A receipt names the request, the client, the guarantee given, the model versions
involved and the sha256 of every object that proves the deletion (the unlearning
manifest, the tombstone, the new weights). It is signed with Ed25519 over its
canonical JSON encoding, so anyone holding the operator's public key can check it
offline, and :func:`recheck` holds it against the store and registry again later.

The signing key comes from ``FEDFORGET_RECEIPT_KEY`` (the PEM text),
``FEDFORGET_RECEIPT_KEY_FILE`` (a path) or a default file created on first use.
Key material is never logged, printed or put into an error message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from components.core.ids import validate_id
from components.core.refs import ObjectRef, sha256_bytes
from components.federation.protocol import GUARANTEES
from components.lineage.store import ObjectStore, validate_key

RECEIPT_SCHEMA = "fedforget/deletion-receipt@1"
SIGNATURE_ALGORITHM = "Ed25519"
KEY_ENV = "FEDFORGET_RECEIPT_KEY"
KEY_FILE_ENV = "FEDFORGET_RECEIPT_KEY_FILE"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# The version tags that tie a registered model version to the deletion it resulted from.
_VERSION_TAGS = ("manifest_sha256", "tombstone_sha256", "forgotten_client", "request_id", "forgetting")


class ReceiptError(ValueError):
    """A receipt, or the key that signs it, is malformed, forged or inconsistent."""


# --------------------------------------------------------------------------- keys


def _private_from_pem(data: bytes, source: str) -> Ed25519PrivateKey:
    # ``from None`` everywhere: a chained parser error could quote the offending bytes.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ReceiptError(f"{source} is not a PEM-encoded, unencrypted PKCS8 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReceiptError(f"{source} does not hold an Ed25519 private key")
    return key


def _private_pem(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (never replacing a file); ``FileExistsError`` if it is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def public_key_path(private_path: Path) -> Path:
    """Where the public key of the key file ``private_path`` is written: ``<name>.pub`` beside it."""
    return private_path.with_name(private_path.name + ".pub")


def load_signing_key(default_path: Path) -> Ed25519PrivateKey:
    """Return the receipt signing key, creating one at ``default_path`` on first use.

    Parameters
    ----------
    default_path
        The key file used when neither ``FEDFORGET_RECEIPT_KEY`` (the PEM text) nor
        ``FEDFORGET_RECEIPT_KEY_FILE`` (a path) is set. If it does not exist, a new
        key is written there (PEM, PKCS8, unencrypted, mode 0600) with its public key
        beside it as ``<name>.pub``.

    Raises
    ------
    ReceiptError
        The configured key is unreadable, malformed or not Ed25519. The message
        names where the key came from, never its content.
    """
    text = os.environ.get(KEY_ENV)
    if text:
        return _private_from_pem(text.encode(), KEY_ENV)
    named = os.environ.get(KEY_FILE_ENV)
    if named:
        path = Path(named).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ReceiptError(f"{KEY_FILE_ENV}={path}: cannot read the key file ({exc.strerror or exc})") from None
        return _private_from_pem(data, f"the key file {path} (from {KEY_FILE_ENV})")
    path = Path(default_path).expanduser()
    if not path.exists():
        private = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_new_file(path, _private_pem(private), 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            public_key_path(path).write_text(public_key_pem(private))
            return private
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReceiptError(f"cannot read the key file {path} ({exc.strerror or exc})") from None
    private = _private_from_pem(data, f"the key file {path}")
    if not public_key_path(path).exists():  # a run stopped between the two writes
        with contextlib.suppress(OSError):  # the public key is a convenience; the private one is loaded
            public_key_path(path).write_text(public_key_pem(private))
    return private


def public_key_pem(private: Ed25519PrivateKey) -> str:
    """The public half of ``private`` as PEM (SubjectPublicKeyInfo) text."""
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def load_public_key(pem_text: str) -> Ed25519PublicKey:
    """Parse a PEM (SubjectPublicKeyInfo) Ed25519 public key; ``ReceiptError`` if it is not one."""
    if not isinstance(pem_text, str):
        raise ReceiptError("a public key must be PEM text")
    try:
        key = serialization.load_pem_public_key(pem_text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ReceiptError("not a PEM-encoded public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptError("the public key is not an Ed25519 key")
    return key


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint: the first 16 hex digits of the sha256 of the raw 32-byte key."""
    return sha256_bytes(_raw(public))[:16]


# --------------------------------------------------------------------------- building and signing


def canonical_bytes(body: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _unsigned(receipt: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in receipt.items() if k != "signature"}


def _id(value: Any, what: str) -> str:
    try:
        return validate_id(str(value) if isinstance(value, int) else value, what)
    except ValueError as exc:
        raise ReceiptError(str(exc)) from None


def _versions(values: Iterable[Any], what: str) -> list[str]:
    # Registry versions are integers written as text: order 9 before 10.
    ids = {_id(v, what) for v in values}
    return sorted(ids, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))


def _sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ReceiptError(f"{what} must be a sha256 hex digest, got {value!r}")
    return value


def _ref(ref: ObjectRef, what: str) -> dict[str, str]:
    try:
        key = validate_key(ref.key)
    except ValueError as exc:
        raise ReceiptError(f"{what}: {exc}") from None
    return {"key": key, "sha256": _sha256(ref.sha256, f"the sha256 of {what}")}


def _figures(verification: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for name, value in verification.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ReceiptError(f"verification figure {name!r} must be a finite number, got {value!r}")
        out[str(name)] = float(value)
    return out


def _times(times: Mapping[str, str]) -> dict[str, str]:
    for name, value in times.items():
        if not isinstance(value, str):
            raise ReceiptError(f"time {name!r} must be text, got {value!r}")
    return {str(k): v for k, v in times.items()}


def build_receipt(
    *,
    request_id: str,
    model: str,
    client_id: str,
    guarantee: str,
    source_version: str,
    new_version: str,
    retired_versions: Iterable[str],
    flagged_versions: Iterable[str],
    unlearning_manifest: ObjectRef,
    tombstone: ObjectRef,
    weights_sha256: str | None,
    verification: Mapping[str, float],
    times: Mapping[str, str],
    reason: str | None = None,
) -> dict[str, Any]:
    """Return the unsigned receipt body of one completed deletion.

    Parameters
    ----------
    guarantee
        ``"replay"`` (retrained without the client), ``"contributions"`` (its exact
        contributions subtracted) or ``"approximate"``.
    retired_versions, flagged_versions
        Versions whose weights were deleted, and versions marked as still carrying
        the client's influence; stored sorted (numerically for numeric versions).
    unlearning_manifest, tombstone
        The stored objects that record the deletion; the receipt keeps key and sha256.
    weights_sha256
        The sha256 of the weights the new version serves, if known.
    verification
        Named figures of the post-deletion check (finite numbers).
    times
        Named timestamps of the request (filed, started, done, ...).

    Raises
    ------
    ReceiptError
        An unknown guarantee, an unsafe id, a malformed digest or a non-finite figure.
    """
    if guarantee not in GUARANTEES:
        raise ReceiptError(f"unknown guarantee {guarantee!r}: use one of {', '.join(GUARANTEES)}")
    if reason is not None and not isinstance(reason, str):
        raise ReceiptError(f"reason must be text or None, got {reason!r}")
    return {
        "schema": RECEIPT_SCHEMA,
        "request_id": _id(request_id, "request id"),
        "model": _id(model, "model name"),
        "client_id": _id(client_id, "client id"),
        "reason": reason,
        "guarantee": guarantee,
        "source_version": _id(source_version, "source version"),
        "new_version": _id(new_version, "new version"),
        "retired_versions": _versions(retired_versions, "retired version"),
        "flagged_versions": _versions(flagged_versions, "flagged version"),
        "unlearning_manifest": _ref(unlearning_manifest, "the unlearning manifest"),
        "tombstone": _ref(tombstone, "the tombstone"),
        "weights_sha256": None if weights_sha256 is None else _sha256(weights_sha256, "weights_sha256"),
        "verification": _figures(verification),
        "times": _times(times),
        "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def sign_receipt(body: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``body`` with an Ed25519 ``signature`` over its canonical bytes.

    Any ``signature`` already in ``body`` is replaced, never signed over.
    """
    unsigned = _unsigned(body)
    if unsigned.get("schema") != RECEIPT_SCHEMA:
        raise ReceiptError(f"not a deletion receipt body (schema {unsigned.get('schema')!r})")
    public = private_key.public_key()
    value = private_key.sign(canonical_bytes(unsigned))
    return {
        **unsigned,
        "signature": {
            "algorithm": SIGNATURE_ALGORITHM,
            "key_id": key_id(public),
            "public_key": public_key_pem(private_key),
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def verify_signature(receipt: Mapping[str, Any], trusted_public_key: Ed25519PublicKey | str) -> None:
    """Check the receipt's signature against the trusted key; ``ReceiptError`` if it fails.

    The key embedded in the receipt must be the trusted key itself: a receipt
    re-signed with another key (and carrying that key) is a forgery.

    Parameters
    ----------
    trusted_public_key
        The operator's public key, as a key object or PEM text.
    """
    trusted = load_public_key(trusted_public_key) if isinstance(trusted_public_key, str) else trusted_public_key
    signature = receipt.get("signature")
    if not isinstance(signature, Mapping):
        raise ReceiptError("the receipt is not signed (no signature field)")
    fields = ("algorithm", "key_id", "public_key", "value")
    if any(not isinstance(signature.get(f), str) for f in fields):
        raise ReceiptError(f"the receipt's signature is malformed: it needs text fields {', '.join(fields)}")
    if signature["algorithm"] != SIGNATURE_ALGORITHM:
        raise ReceiptError(f"unsupported signature algorithm {signature['algorithm']!r}: expected Ed25519")
    embedded = load_public_key(signature["public_key"])
    if _raw(embedded) != _raw(trusted):
        raise ReceiptError(f"the receipt is signed by key {key_id(embedded)}, not by the trusted key {key_id(trusted)}")
    if signature["key_id"] != key_id(embedded):
        raise ReceiptError(f"the signature's key_id {signature['key_id']!r} does not match its public key")
    try:
        value = base64.b64decode(signature["value"], validate=True)
    except (binascii.Error, ValueError):
        raise ReceiptError("the signature value is not base64") from None
    try:
        trusted.verify(value, canonical_bytes(_unsigned(receipt)))
    except InvalidSignature:
        raise ReceiptError("the signature does not match the receipt: it was altered after signing") from None


# --------------------------------------------------------------------------- storage


def receipt_key(model: str, request_id: str) -> str:
    return f"receipts/{_id(model, 'model name')}/{_id(request_id, 'request id')}.json"


def receipt_bytes(receipt: Mapping[str, Any]) -> bytes:
    """The stored form: indented JSON with sorted keys and a trailing newline."""
    return (json.dumps(receipt, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_receipt(store: ObjectStore, receipt: Mapping[str, Any]) -> ObjectRef:
    """Store a signed receipt, write-once; the same bytes again are a no-op.

    Raises
    ------
    ReceiptError
        The receipt is unsigned or not a deletion receipt.
    components.lineage.store.ObjectExists
        A different receipt is already stored for this model and request.
    """
    if receipt.get("schema") != RECEIPT_SCHEMA:
        raise ReceiptError(f"not a deletion receipt (schema {receipt.get('schema')!r})")
    if "signature" not in receipt:
        raise ReceiptError("refusing to store an unsigned receipt: sign it first")
    return store.put(receipt_key(receipt["model"], receipt["request_id"]), receipt_bytes(receipt), overwrite=False)


def receipt_from_bytes(data: bytes) -> dict[str, Any]:
    """Parse a stored receipt; ``ReceiptError`` if it is not JSON or not a deletion receipt."""
    try:
        receipt = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReceiptError("the receipt is not valid JSON") from None
    if not isinstance(receipt, dict) or receipt.get("schema") != RECEIPT_SCHEMA:
        found = receipt.get("schema") if isinstance(receipt, dict) else type(receipt).__name__
        raise ReceiptError(f"not a deletion receipt: schema {found!r}, expected {RECEIPT_SCHEMA!r}")
    return receipt


def read_receipt(store: ObjectStore, model: str, request_id: str) -> dict[str, Any] | None:
    """The stored receipt of the request, or ``None`` if none was written."""
    key = receipt_key(model, request_id)
    if not store.exists(key):
        return None
    return receipt_from_bytes(store.get(key))


# --------------------------------------------------------------------------- re-checking


_NEEDED = (
    "request_id",
    "client_id",
    "guarantee",
    "new_version",
    "retired_versions",
    "unlearning_manifest",
    "tombstone",
    "weights_sha256",
)
_OBJECT_NAMES = {"unlearning_manifest": "unlearning manifest", "tombstone": "tombstone"}


def _check_object(receipt: Mapping[str, Any], store: ObjectStore, field: str) -> tuple[bytes | None, list[str]]:
    name = _OBJECT_NAMES[field]
    ref = receipt[field]
    if not isinstance(ref, Mapping) or not isinstance(ref.get("key"), str) or not isinstance(ref.get("sha256"), str):
        return None, [f"The receipt's {name} reference is malformed."]
    key, expected = ref["key"], ref["sha256"]
    try:
        present = store.exists(key)
    except ValueError:
        return None, [f"The {name} key {key!r} in the receipt is not a valid object key."]
    if not present:
        return None, [f"The {name} {key} is missing from the store."]
    data = store.get(key)
    actual = sha256_bytes(data)
    if actual != expected:
        return data, [f"The {name} {key} has sha256 {actual}, but the receipt records {expected}."]
    return data, []


def _check_tombstone_body(receipt: Mapping[str, Any], key: str, data: bytes) -> list[str]:
    try:
        tombstone = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return [f"The tombstone {key} is not valid JSON."]
    if not isinstance(tombstone, dict):
        return [f"The tombstone {key} is not a JSON object."]
    return [
        f"The tombstone {key} has {field} {tombstone.get(field)!r}, but the receipt says {receipt[field]!r}."
        for field in ("client_id", "request_id")
        if tombstone.get(field) != receipt[field]
    ]


def _check_new_version(
    receipt: Mapping[str, Any],
    versions: Mapping[str, Mapping[str, str]],
    served_weights: Callable[[str], str | None],
) -> list[str]:
    version = str(receipt["new_version"])
    if version not in versions:
        return [f"The new version {version} is not registered."]
    tags = versions[version]
    expected = {
        "manifest_sha256": receipt["unlearning_manifest"].get("sha256"),
        "tombstone_sha256": receipt["tombstone"].get("sha256"),
        "forgotten_client": receipt["client_id"],
        "request_id": receipt["request_id"],
        "forgetting": receipt["guarantee"],
    }
    problems = []
    for tag in _VERSION_TAGS:
        if tag not in tags:
            problems.append(f"Version {version} has no tag {tag}; the receipt says {expected[tag]!r}.")
        elif tags[tag] != expected[tag]:
            problems.append(f"Version {version} has tag {tag}={tags[tag]!r}, but the receipt says {expected[tag]!r}.")
    if receipt["weights_sha256"] is not None:
        served = served_weights(version)
        if served is None:
            problems.append(
                f"Version {version} serves no weights, but the receipt records {receipt['weights_sha256']}."
            )
        elif served != receipt["weights_sha256"]:
            problems.append(
                f"Version {version} serves weights with sha256 {served}, but the receipt records "
                f"{receipt['weights_sha256']}."
            )
    return problems


def _check_retired(
    receipt: Mapping[str, Any],
    versions: Mapping[str, Mapping[str, str]],
    served_weights: Callable[[str], str | None],
) -> list[str]:
    problems = []
    for raw in receipt["retired_versions"]:
        version = str(raw)
        if version not in versions:
            problems.append(f"The retired version {version} is not registered.")
            continue
        if "retired" not in versions[version]:
            problems.append(f"The retired version {version} has no retired tag.")
        if served_weights(version) is not None:
            problems.append(f"The retired version {version} serves weights again.")
    return problems


def recheck(
    receipt: Mapping[str, Any],
    store: ObjectStore,
    versions: Mapping[str, Mapping[str, str]],
    served_weights: Callable[[str], str | None],
) -> list[str]:
    """Hold a receipt against the store and registry again; return the problems found.

    The signature is not checked here (see :func:`verify_signature`); this checks
    that what the receipt claims is still true.

    Parameters
    ----------
    receipt
        A deletion receipt (signed or not).
    store
        The object store holding the unlearning manifest and the tombstone.
    versions
        Registered version (as text) -> that version's tags.
    served_weights
        Version -> sha256 of the weights the registry serves for it, or ``None``
        when the version has no weights (it was retired).

    Returns
    -------
    list of str
        One sentence per problem, naming the object, tag or version; empty when
        everything the receipt claims holds.
    """
    missing = [f for f in _NEEDED if f not in receipt]
    if missing:
        return [f"The receipt has no {field} field." for field in missing]
    problems = []
    for field in ("unlearning_manifest", "tombstone"):
        data, found = _check_object(receipt, store, field)
        problems.extend(found)
        if field == "tombstone" and data is not None:
            problems.extend(_check_tombstone_body(receipt, receipt["tombstone"]["key"], data))
    if isinstance(receipt["unlearning_manifest"], Mapping) and isinstance(receipt["tombstone"], Mapping):
        problems.extend(_check_new_version(receipt, versions, served_weights))
    problems.extend(_check_retired(receipt, versions, served_weights))
    return problems
