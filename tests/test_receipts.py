"""Signed deletion receipts: keys, signatures, storage and re-checking against store and registry."""

from __future__ import annotations

import base64
import copy
import json
import stat
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from components.core.refs import sha256_bytes
from components.lineage.store import LocalStore, ObjectExists
from components.unlearning.receipts import (
    RECEIPT_SCHEMA,
    ReceiptError,
    build_receipt,
    canonical_bytes,
    key_id,
    load_public_key,
    load_signing_key,
    public_key_pem,
    read_receipt,
    receipt_from_bytes,
    receipt_key,
    recheck,
    sign_receipt,
    verify_signature,
    write_receipt,
)

WEIGHTS = sha256_bytes(b"weights of version 5")


def _pem(private: Ed25519PrivateKey) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(autouse=True)
def _no_configured_key(monkeypatch):
    monkeypatch.delenv("FEDFORGET_RECEIPT_KEY", raising=False)
    monkeypatch.delenv("FEDFORGET_RECEIPT_KEY_FILE", raising=False)


@pytest.fixture(scope="module")
def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


class World:
    """A consistent store and registry after client_03 was forgotten into version 5."""

    def __init__(self, tmp_path) -> None:
        self.store = LocalStore(tmp_path / "store")
        self.manifest = self.store.put("unlearning/fed1/manifest.json", b'{"kind": "unlearning manifest"}\n')
        tombstone = {"schema": "fedforget/tombstone@1", "client_id": "client_03", "request_id": "req-1"}
        self.tombstone = self.store.put("tombstones/client_03.json", json.dumps(tombstone).encode())
        self.versions: dict[str, dict[str, str]] = {
            "2": {"retired": "req-1"},
            "3": {"retired": "req-1"},
            "4": {},
            "5": {
                "manifest_sha256": self.manifest.sha256,
                "tombstone_sha256": self.tombstone.sha256,
                "forgotten_client": "client_03",
                "request_id": "req-1",
                "forgetting": "contributions",
            },
        }
        self.weights: dict[str, str] = {"4": sha256_bytes(b"weights of version 4"), "5": WEIGHTS}

    def served_weights(self, version: str) -> str | None:
        return self.weights.get(version)

    def body(self, **changes: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "request_id": "req-1",
            "model": "fedforget-clip",
            "client_id": "client_03",
            "guarantee": "contributions",
            "source_version": "4",
            "new_version": "5",
            "retired_versions": ["3", "2"],
            "flagged_versions": ["4"],
            "unlearning_manifest": self.manifest,
            "tombstone": self.tombstone,
            "weights_sha256": WEIGHTS,
            "verification": {"forget_accuracy": 0.12, "retain_accuracy": 0.91},
            "times": {"filed": "2025-01-02T03:04:05+00:00", "done": "2025-01-02T03:09:00+00:00"},
            "reason": "ticket 7",
        }
        args.update(changes)
        return build_receipt(**args)

    def recheck(self, receipt: dict[str, Any]) -> list[str]:
        return recheck(receipt, self.store, self.versions, self.served_weights)


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


@pytest.fixture
def receipt(world, private_key) -> dict[str, Any]:
    return sign_receipt(world.body(), private_key)


# --------------------------------------------------------------------------- keys


def test_a_key_is_generated_at_the_default_path_with_mode_0600_and_reused(tmp_path):
    # Prepare
    path = tmp_path / "keys" / "receipt.pem"

    # Execute
    first = load_signing_key(path)
    second = load_signing_key(path)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(first.public_key()) == key_id(second.public_key())
    public = load_public_key((tmp_path / "keys" / "receipt.pem.pub").read_text())
    assert key_id(public) == key_id(first.public_key())
    assert (tmp_path / "keys" / "receipt.pem.pub").read_text() == public_key_pem(first)


def test_the_environment_key_wins_over_the_key_file_and_the_default(tmp_path, monkeypatch):
    # Prepare
    env_key, file_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key_file = tmp_path / "file.pem"
    key_file.write_text(_pem(file_key))
    monkeypatch.setenv("FEDFORGET_RECEIPT_KEY", _pem(env_key))
    monkeypatch.setenv("FEDFORGET_RECEIPT_KEY_FILE", str(key_file))
    default = tmp_path / "default.pem"

    # Execute
    loaded = load_signing_key(default)

    # Assert
    assert key_id(loaded.public_key()) == key_id(env_key.public_key())
    assert not default.exists()


def test_the_key_file_variable_is_used_when_no_key_text_is_set(tmp_path, monkeypatch):
    # Prepare
    file_key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "file.pem"
    key_file.write_text(_pem(file_key))
    monkeypatch.setenv("FEDFORGET_RECEIPT_KEY_FILE", str(key_file))

    # Execute
    loaded = load_signing_key(tmp_path / "default.pem")

    # Assert
    assert key_id(loaded.public_key()) == key_id(file_key.public_key())
    assert not (tmp_path / "default.pem").exists()


MALFORMED = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbC1kby1ub3QtbGVhaw==\n-----END PRIVATE KEY-----\n"
NOT_ED25519 = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    .decode()
)


@pytest.mark.parametrize("text", [MALFORMED, NOT_ED25519, "secret-key-material"], ids=["bad-pem", "ec-key", "text"])
@pytest.mark.parametrize("via", ["env", "file"])
def test_a_malformed_key_is_refused_without_quoting_it(tmp_path, monkeypatch, text, via):
    # Prepare
    if via == "env":
        monkeypatch.setenv("FEDFORGET_RECEIPT_KEY", text)
    else:
        (tmp_path / "bad.pem").write_text(text)
        monkeypatch.setenv("FEDFORGET_RECEIPT_KEY_FILE", str(tmp_path / "bad.pem"))

    # Execute
    with pytest.raises(ReceiptError) as caught:
        load_signing_key(tmp_path / "default.pem")

    # Assert
    message = str(caught.value)
    body = [line for line in text.splitlines() if line and not line.startswith("-----")]
    assert all(line not in message for line in body)
    assert "secret" not in message
    # No chained parser error that might quote the input either.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


# --------------------------------------------------------------------------- building


def test_build_receipt_sorts_versions_and_keeps_references(world):
    # Execute
    body = world.body(retired_versions=["10", "9", "3"], flagged_versions=[])

    # Assert
    assert body["schema"] == RECEIPT_SCHEMA
    assert body["retired_versions"] == ["3", "9", "10"]
    assert body["unlearning_manifest"] == {"key": world.manifest.key, "sha256": world.manifest.sha256}
    assert body["tombstone"] == {"key": world.tombstone.key, "sha256": world.tombstone.sha256}
    assert body["verification"] == {"forget_accuracy": 0.12, "retain_accuracy": 0.91}
    assert "signature" not in body


@pytest.mark.parametrize(
    "changes",
    [
        {"guarantee": "exact"},
        {"client_id": "../client_03"},
        {"request_id": "req/1"},
        {"new_version": "5 "},
        {"retired_versions": ["2", ".."]},
        {"verification": {"forget_accuracy": float("nan")}},
        {"verification": {"forget_accuracy": float("inf")}},
        {"weights_sha256": "not-a-digest"},
    ],
)
def test_build_receipt_rejects_bad_input(world, changes):
    with pytest.raises(ReceiptError):
        world.body(**changes)


# --------------------------------------------------------------------------- signatures


def test_a_signed_receipt_verifies_also_after_a_store_round_trip(world, receipt, private_key):
    # Execute
    ref = write_receipt(world.store, receipt)
    stored = read_receipt(world.store, "fedforget-clip", "req-1")

    # Assert
    verify_signature(receipt, private_key.public_key())
    verify_signature(receipt, public_key_pem(private_key))
    assert ref.key == receipt_key("fedforget-clip", "req-1") == "receipts/fedforget-clip/req-1.json"
    assert stored == receipt
    verify_signature(stored, private_key.public_key())
    assert receipt["signature"]["algorithm"] == "Ed25519"
    assert receipt["signature"]["key_id"] == key_id(private_key.public_key())


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(receipt: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = receipt
        for name in parents:
            target = target[name]
        target[last] = value

    return change


@pytest.mark.parametrize(
    "change",
    [
        _set("client_id", "client_04"),
        _set("request_id", "req-2"),
        _set("guarantee", "replay"),
        _set("new_version", "6"),
        _set("reason", None),
        _set("verification.forget_accuracy", 0.13),
        _set("retired_versions", ["3"]),
        _set("tombstone.sha256", "0" * 64),
        _set("weights_sha256", None),
        _set("times.done", "2025-01-02T03:09:01+00:00"),
        _set("issued_at", "2000-01-01T00:00:00+00:00"),
        _set("extra", "field"),
    ],
    ids=[
        "client",
        "request",
        "guarantee",
        "new-version",
        "reason",
        "verification-figure",
        "retired-versions",
        "tombstone-hash",
        "weights",
        "times",
        "issued-at",
        "added-field",
    ],
)
def test_any_change_after_signing_breaks_the_signature(receipt, private_key, change):
    # Prepare
    altered = copy.deepcopy(receipt)

    # Execute
    change(altered)

    # Assert
    with pytest.raises(ReceiptError, match="altered"):
        verify_signature(altered, private_key.public_key())


def test_a_different_trusted_key_fails(receipt):
    with pytest.raises(ReceiptError, match="not by the trusted key"):
        verify_signature(receipt, Ed25519PrivateKey.generate().public_key())


def test_a_removed_signature_fails(receipt, private_key):
    unsigned = {k: v for k, v in receipt.items() if k != "signature"}
    with pytest.raises(ReceiptError, match="not signed"):
        verify_signature(unsigned, private_key.public_key())


def test_a_forged_embedded_key_fails(receipt, private_key):
    # Prepare: the attacker alters the receipt and re-signs it with a key of their own.
    altered = copy.deepcopy(receipt)
    altered["client_id"] = "client_04"
    forged = sign_receipt(altered, Ed25519PrivateKey.generate())
    verify_signature(forged, forged["signature"]["public_key"])  # valid, but under the attacker's key

    # Execute / Assert
    with pytest.raises(ReceiptError, match="not by the trusted key"):
        verify_signature(forged, private_key.public_key())


def test_the_trusted_key_pasted_in_with_a_forged_signature_fails(receipt, private_key):
    # Prepare: the embedded key is the trusted one, but the signature is the attacker's.
    attacker = Ed25519PrivateKey.generate()
    altered = copy.deepcopy(receipt)
    altered["client_id"] = "client_04"
    forged = sign_receipt(altered, attacker)
    forged["signature"]["public_key"] = receipt["signature"]["public_key"]
    forged["signature"]["key_id"] = receipt["signature"]["key_id"]

    # Execute / Assert
    with pytest.raises(ReceiptError, match="altered"):
        verify_signature(forged, private_key.public_key())


@pytest.mark.parametrize(
    "change",
    [_set("signature.algorithm", "RSA"), _set("signature.value", "!!not base64!!"), _set("signature.public_key", "x")],
    ids=["algorithm", "value", "public-key"],
)
def test_a_malformed_signature_fails(receipt, private_key, change):
    altered = copy.deepcopy(receipt)
    change(altered)
    with pytest.raises(ReceiptError):
        verify_signature(altered, private_key.public_key())


def test_the_signature_covers_the_canonical_bytes_without_the_signature(receipt, private_key):
    # Ed25519 signatures are deterministic: signing the same bytes again gives the same value.
    unsigned = {k: v for k, v in receipt.items() if k != "signature"}
    expected = base64.b64encode(private_key.sign(canonical_bytes(unsigned))).decode()
    assert receipt["signature"]["value"] == expected


# --------------------------------------------------------------------------- storage


def test_write_receipt_is_write_once(world, receipt, private_key):
    # Prepare
    first = write_receipt(world.store, receipt)
    different = sign_receipt({**receipt, "reason": "another ticket"}, private_key)

    # Execute
    again = write_receipt(world.store, receipt)

    # Assert
    assert again == first
    with pytest.raises(ObjectExists):
        write_receipt(world.store, different)
    assert world.store.get(first.key).endswith(b"}\n")


def test_write_receipt_refuses_an_unsigned_receipt(world):
    with pytest.raises(ReceiptError, match="unsigned"):
        write_receipt(world.store, world.body())


def test_read_receipt_of_an_unknown_request_is_none(world):
    assert read_receipt(world.store, "fedforget-clip", "req-9") is None


@pytest.mark.parametrize("data", [b"not json", b"\xff\xfe", b"[1, 2]", b'{"schema": "fedforget/tombstone@1"}'])
def test_receipt_from_bytes_rejects_what_is_not_a_receipt(data):
    with pytest.raises(ReceiptError):
        receipt_from_bytes(data)


# --------------------------------------------------------------------------- re-checking


def test_recheck_of_a_consistent_receipt_finds_nothing(world, receipt):
    assert world.recheck(receipt) == []


def _overwrite(key: str, data: bytes) -> Callable[[World], None]:
    return lambda w: w.store.put(key, data)


def _tag(version: str, tag: str, value: str | None) -> Callable[[World], None]:
    def change(w: World) -> None:
        if value is None:
            del w.versions[version][tag]
        else:
            w.versions[version][tag] = value

    return change


def _serve(version: str, digest: str) -> Callable[[World], None]:
    return lambda w: w.weights.__setitem__(version, digest)


ALTERATIONS = {
    "manifest bytes changed": (_overwrite("unlearning/fed1/manifest.json", b"{}"), "unlearning manifest"),
    "manifest deleted": (lambda w: w.store.delete("unlearning/fed1/manifest.json"), "missing"),
    "tombstone bytes changed": (
        _overwrite("tombstones/client_03.json", json.dumps({"client_id": "client_03", "request_id": "req-1"}).encode()),
        "tombstone tombstones/client_03.json has sha256",
    ),
    "tombstone of another client": (
        _overwrite("tombstones/client_03.json", json.dumps({"client_id": "client_04", "request_id": "req-1"}).encode()),
        "client_id",
    ),
    "tombstone deleted": (lambda w: w.store.delete("tombstones/client_03.json"), "tombstone"),
    "manifest_sha256 tag changed": (_tag("5", "manifest_sha256", "0" * 64), "manifest_sha256"),
    "tombstone_sha256 tag changed": (_tag("5", "tombstone_sha256", "0" * 64), "tombstone_sha256"),
    "forgotten_client tag changed": (_tag("5", "forgotten_client", "client_04"), "forgotten_client"),
    "request_id tag changed": (_tag("5", "request_id", "req-2"), "request_id"),
    "forgetting tag changed": (_tag("5", "forgetting", "approximate"), "forgetting"),
    "forgetting tag removed": (_tag("5", "forgetting", None), "forgetting"),
    "new version gone": (lambda w: w.versions.pop("5"), "version 5"),
    "served weights changed": (_serve("5", sha256_bytes(b"other weights")), "serves weights"),
    "served weights gone": (lambda w: w.weights.pop("5"), "serves no weights"),
    "retired version serves again": (_serve("3", sha256_bytes(b"restored")), "retired version 3"),
    "retired tag removed": (_tag("2", "retired", None), "retired version 2"),
    "retired version gone": (lambda w: w.versions.pop("3"), "retired version 3"),
}


@pytest.mark.parametrize("name", list(ALTERATIONS))
def test_recheck_reports_each_alteration(world, receipt, name):
    # Prepare
    alter, expected = ALTERATIONS[name]

    # Execute
    alter(world)
    problems = world.recheck(receipt)

    # Assert
    assert problems, name
    assert any(expected in p for p in problems), problems
    assert all(p.endswith(".") for p in problems)


def test_recheck_without_weights_in_the_receipt_skips_the_served_weights(world, private_key):
    # Prepare
    receipt = sign_receipt(world.body(weights_sha256=None), private_key)
    world.weights["5"] = sha256_bytes(b"anything")

    # Execute / Assert
    assert world.recheck(receipt) == []


def test_recheck_of_a_truncated_receipt_names_the_missing_fields(world, receipt):
    truncated = {k: v for k, v in receipt.items() if k != "tombstone"}
    assert world.recheck(truncated) == ["The receipt has no tombstone field."]
