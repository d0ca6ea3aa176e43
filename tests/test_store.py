"""One contract for both object stores; S3 runs against a real SeaweedFS."""

from __future__ import annotations

import os
import secrets

import pytest

from components.core.refs import ObjectRef, sha256_bytes
from components.lineage.store import (
    IntegrityError,
    LocalStore,
    ObjectExists,
    ObjectNotFound,
    S3Store,
    StoreError,
    open_store,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return S3Store(f"ff-{secrets.token_hex(4)}", "some/prefix")  # created on first use


def test_put_get_list_delete(store):
    ref = store.put("a/b/one.bin", b"one")
    assert ref == ObjectRef("a/b/one.bin", sha256_bytes(b"one"), 3)
    store.put("a/two.bin", b"two")
    store.put("c.bin", b"three")
    assert store.get("a/b/one.bin") == b"one"
    assert store.exists("a/two.bin") and not store.exists("a/nope")
    assert store.list() == ["a/b/one.bin", "a/two.bin", "c.bin"]
    assert store.list("a/") == ["a/b/one.bin", "a/two.bin"]
    store.delete("a/b/one.bin")
    store.delete("a/b/one.bin")  # deleting twice is fine
    assert store.list("a/") == ["a/two.bin"]
    with pytest.raises(ObjectNotFound):
        store.get("a/b/one.bin")


def test_write_once_keys_are_idempotent_but_never_silently_changed(store):
    first = store.put("manifest.json", b"{}", overwrite=False)
    assert store.put("manifest.json", b"{}", overwrite=False) == first
    with pytest.raises(ObjectExists):
        store.put("manifest.json", b"{ }", overwrite=False)
    assert store.get("manifest.json") == b"{}"


def test_verified_reads_catch_changed_bytes(store):
    ref = store.put("x.bin", b"original")
    assert store.get_verified(ref) == b"original"
    store.put("x.bin", b"tampered")
    with pytest.raises(IntegrityError):
        store.get_verified(ref)


def test_large_objects_round_trip(store):
    blob = os.urandom(12 * 1024 * 1024)
    ref = store.put("big.bin", blob)
    assert store.get_verified(ref) == blob


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "", "a/../b", "sp ace"])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(ValueError, match="invalid object key"):
        store.put(key, b"x")


def test_open_store_dispatches_on_the_location(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    s3 = open_store("s3://bucket-name/deep/prefix")
    assert isinstance(s3, S3Store) and s3.bucket == "bucket-name" and s3.prefix == "deep/prefix"
    with pytest.raises(ValueError, match="unsupported"):
        open_store("gs://bucket")


def test_s3_bad_credentials_fail_clearly_without_leaking_them(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    store = S3Store(f"ff-{secrets.token_hex(4)}")
    with pytest.raises(StoreError) as info:
        store.put("k", b"v")
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert "definitely-wrong-secret" not in str(info.value) + repr(store)
    assert s3_env.access_key not in str(info.value) + repr(store)


def test_s3_unreachable_endpoint_is_reported_as_unavailable(monkeypatch):
    from components.lineage.store import StoreUnavailable

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = S3Store("ff-nowhere", endpoint_url="http://127.0.0.1:9", max_attempts=2, connect_timeout=0.5)
    with pytest.raises(StoreUnavailable, match="after 2 attempts"):
        store.get("k")


def test_a_full_disk_is_a_store_error_naming_the_key_and_leaves_no_partial_object(tmp_path, monkeypatch):
    import errno

    from components.lineage.store import LocalStore, StoreError

    # Prepare: the disk fills up while the object is written
    store = LocalStore(tmp_path / "store")
    store.put("kept/a.bin", b"before")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    # Execute / Assert
    with pytest.raises(StoreError, match=r"could not write new/b\.bin: No space left on device"):
        store.put("new/b.bin", b"after")
    assert store.list("") == ["kept/a.bin"] and store.get("kept/a.bin") == b"before"
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]
