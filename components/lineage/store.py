"""Object stores: where the update history, manifests and tombstones live.

Two implementations share one narrow interface: a local folder and S3 (boto3).
The maths never sees either; it reads and writes bytes through
:class:`ObjectStore`. Endpoints and credentials come from the environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ...) and are never part of a
store's description, so nothing that logs a store can leak a secret.
"""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.core.refs import ObjectRef, sha256_bytes

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=/-]*")


# Error codes an S3 server sends for conditions that pass (besides any 5xx status).
# botocore's standard retry mode retries 5xx, throttling codes and connection
# errors with exponential backoff and jitter; what still fails is StoreUnavailable.
TRANSIENT_S3_CODES = frozenset(
    {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException",
     "OperationAborted"}
)  # fmt: skip
DEFAULT_S3_MAX_ATTEMPTS = 8


class StoreError(RuntimeError):
    """Base class of object store errors."""


class ObjectNotFound(StoreError, KeyError):
    """The key does not exist."""

    def __str__(self) -> str:  # KeyError would add quotes
        return str(self.args[0]) if self.args else "object not found"


class ObjectExists(StoreError):
    """A write-once key already holds different content."""


class IntegrityError(StoreError):
    """An object's bytes do not match the sha256 recorded for it."""


class StoreUnavailable(StoreError):
    """The store could not be reached (after the client's own retries)."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``."""
    if not isinstance(key, str) or not key or len(key) > 1024 or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid object key {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(ABC):
    """Bytes under string keys."""

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the store is (``s3://bucket/prefix`` or a folder), without secrets."""

    @abstractmethod
    def _put(self, key: str, data: bytes, sha256: str) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object's bytes; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys that start with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; absent keys are not an error."""

    def put(self, key: str, data: bytes, *, overwrite: bool = True) -> ObjectRef:
        """Store ``data`` under ``key`` and return its reference.

        With ``overwrite=False`` the key is write-once: writing the same bytes
        again is a no-op (so retried writes are idempotent), different bytes
        raise :class:`ObjectExists`.
        """
        validate_key(key)
        digest = sha256_bytes(data)
        if not overwrite and self.exists(key):
            if sha256_bytes(self.get(key)) == digest:
                return ObjectRef(key, digest, len(data))
            raise ObjectExists(f"{self.url}: {key} already exists with different content")
        self._put(key, data, digest)
        return ObjectRef(key, digest, len(data))

    def sweep_temporaries(self, keep: tuple[str, ...] = ("requests/",)) -> int:
        """Delete half-written objects a crashed write left behind (none by default: a store whose writes are
        atomic has none); ``keep`` names prefixes written outside the model-write lock."""
        return 0

    def get_verified(self, ref: ObjectRef) -> bytes:
        """Return the bytes of ``ref``, checked against its recorded sha256."""
        data = self.get(ref.key)
        actual = sha256_bytes(data)
        if actual != ref.sha256:
            raise IntegrityError(
                f"{self.url}: {ref.key} has sha256 {actual[:12]}..., "
                f"expected {ref.sha256[:12]}... (the object was changed or corrupted)"
            )
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(ObjectStore):
    """A folder on a local or mounted file system; writes are atomic renames."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def url(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _put(self, key: str, data: bytes, sha256: str) -> None:
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # a full disk, a read-only mount, no permission: the object is not written
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"{self.url}: could not write {key}: {exc.strerror or exc}") from exc
        except BaseException:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise

    def sweep_temporaries(self, keep: tuple[str, ...] = ("requests/",)) -> int:
        """Delete the ``.tmp-*`` files a write that crashed before its rename left (call with the model-write
        lock held: a write in progress elsewhere under ``keep`` is left alone)."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for path in self.root.rglob(".tmp-*"):
            relative = path.relative_to(self.root).as_posix()
            if path.is_file() and not relative.startswith(keep):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}: no object {key}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the folder the prefix names (the guard and the purge list small prefixes of a large store).
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not folder.is_dir() or not folder.resolve().is_relative_to(self.root):
            return []
        keys = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders left empty, but never the root itself.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            try:
                parent.rmdir()
            except OSError:  # another deleter removed it first, or a writer just put a file in it
                return
            parent = parent.parent


class S3Store(ObjectStore):
    """An S3 bucket (AWS or any S3-compatible server) under an optional prefix.

    Parameters
    ----------
    bucket, prefix
        Where objects go: ``s3://<bucket>/<prefix>/<key>``.
    endpoint_url
        Defaults to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3 reads them).
    max_attempts
        botocore's retry budget per request (standard mode: 5xx, throttling and
        connection errors are retried with exponential backoff and jitter, up to
        20 s apart; 8 attempts ride out a server restart of about half a minute).
    create_bucket
        Create the bucket on first use if it does not exist.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        create_bucket: bool = True,
    ) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.create_bucket = create_bucket
        self._client: Any = None
        self._bucket_ready = False

    @property
    def url(self) -> str:
        base = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{base} (endpoint {self.endpoint_url})" if self.endpoint_url else base

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3={"addressing_style": "path"} if self.endpoint_url else {},
            )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                config=config,
            )
        return self._client

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{self.url}: no object {kwargs.get('Key', '')}") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StoreError(
                    f"{self.url}: {action} refused ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status >= 500 or code in TRANSIENT_S3_CODES:
                # botocore already retried it with backoff (standard mode): the server stayed unwell.
                raise StoreUnavailable(
                    f"{self.url}: {action} failed after {self.max_attempts} attempts: {code or status} "
                    "(a transient server error; the store may be restarting or overloaded)"
                ) from None
            raise StoreError(f"{self.url}: {action} failed: {code or exc}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"{self.url}: {action} failed after {self.max_attempts} attempts: {type(exc).__name__}"
            ) from None

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            self._call("head bucket", self.client.head_bucket, Bucket=self.bucket)
        except ObjectNotFound:
            if not self.create_bucket:
                raise StoreError(f"bucket {self.bucket} does not exist") from None
            try:
                self._call("create bucket", self.client.create_bucket, Bucket=self.bucket)
            except StoreError as exc:  # a concurrent creator may have won the race
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise
        self._bucket_ready = True

    def _put(self, key: str, data: bytes, sha256: str) -> None:
        self._ensure_bucket()
        self._call(
            "put",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._full(key),
            Body=data,
            Metadata={"sha256": sha256},
        )

    def get(self, key: str) -> bytes:
        self._ensure_bucket()
        response = self._call("get", self.client.get_object, Bucket=self.bucket, Key=self._full(key))
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        self._ensure_bucket()
        try:
            self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._full(key))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        self._ensure_bucket()
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages: Iterator[dict[str, Any]] = self._call(
            "list", lambda **kw: list(paginator.paginate(**kw)), Bucket=self.bucket, Prefix=full
        )
        for page in pages:
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._ensure_bucket()
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._full(key))


def open_store(location: str | Path) -> ObjectStore:
    """Open ``s3://bucket[/prefix]`` as :class:`S3Store`, anything else as a folder.

    ``FEDFORGET_S3_MAX_ATTEMPTS`` sets botocore's retry budget per request (default 8).
    """
    text = str(location)
    if text.startswith("s3://"):
        rest = text[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        raw = os.environ.get("FEDFORGET_S3_MAX_ATTEMPTS") or str(DEFAULT_S3_MAX_ATTEMPTS)
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"FEDFORGET_S3_MAX_ATTEMPTS must be a positive integer, got {raw!r}")
        attempts = int(raw)
        return S3Store(bucket, prefix, max_attempts=attempts)
    if "://" in text:
        raise ValueError(f"unsupported store location {text!r}: use s3://bucket/prefix or a path")
    return LocalStore(text)
