"""The standard output stores: a folder every box mounts (``file``) and S3-compatible object
storage (``s3``).

A worker puts each output file into the store under a key (a relative path such as
``<job id>/<attempt>/<shard>-<node id>-<file name>``) and hands out the ``StoredOutput.url``
it gets back. Keys follow ``safe_join``'s rule in both stores, so a key can never leave the
store's root (``..``, an absolute path, a backslash...): ``OutputKeyError`` (a
``ValueError`` and an ``UnsafeNameError``) names a bad one before any I/O.

- ``FolderStore`` (``file:///shared/outputs``, or the plain absolute path): a file is written
  beside its destination under a hidden temp name, fsynced and renamed into place, so a
  reader on any box (an NFS mount) never sees half of it, and a put that fails or is
  cancelled leaves nothing behind.
- ``S3Store`` (``s3://bucket/prefix?endpoint_url=...``): boto3's synchronous calls run in
  worker threads (at most ``max_threads`` at once); an object appears whole or not at all
  (S3 semantics; ``upload_file`` goes multipart for large files). boto3 is imported only
  when an ``s3`` store is opened (``pip install 'comfytrio[s3]'``).

Errors of the storage itself (a full disk, a refused request) are ``OutputStoreError``\\ s
naming the store and the key.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs
import trio

from comfytrio import ComfyAPIError, UnsafeNameError
from comfytrio.hookspecs import StoredOutput, atomic_file, safe_join

__all__ = [
    "DEFAULT_S3_THREADS",
    "DEFAULT_URL_EXPIRES",
    "FolderStore",
    "OutputKeyError",
    "OutputStoreError",
    "S3Store",
    "check_key",
]

logger = logging.getLogger("comfytrio.stores")

DEFAULT_URL_EXPIRES = 7 * 24 * 3600
"""Seconds a presigned URL of an ``S3Store`` stays valid (7 days, the most SigV4 allows)."""

DEFAULT_S3_THREADS = 8
"""Worker threads an ``S3Store`` uses at most at once (each transfer may use more of its own
for a multipart upload)."""

_COPY_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class OutputKeyError(UnsafeNameError, ValueError):
    """A key that could leave its store (``..``, absolute, a backslash, empty parts...):
    ``key`` names it, ``store`` the store. Raised before any I/O."""

    def __init__(self, key: str, store: str) -> None:
        super().__init__(str(key), store)
        self.key = key
        self.store = store
        self.message = (
            f"refusing output key {key!r}: it must be a relative path (no '..', no leading "
            f"'/', no backslash, no empty part) inside {store}"
        )
        self.args = (self.message,)


class OutputStoreError(ComfyAPIError):
    """The storage behind an output store failed: ``store`` names the store (its URL without
    the query), ``key`` the key (None when the error concerns no key), ``reason`` says why
    (the cause is chained)."""

    def __init__(self, store: str, key: str | None, reason: str) -> None:
        self.store = store
        self.key = key
        self.reason = reason
        about = f"key {key!r} of " if key is not None else ""
        super().__init__(f"output store error: {about}{store}: {reason}")


def check_key(key: str, store: str) -> str:
    """``key`` when it is a safe relative path (``safe_join``'s rule, ``/`` separating
    sub-folders); raises ``OutputKeyError`` naming it and ``store`` otherwise."""
    try:
        safe_join(Path("/"), key)
    except UnsafeNameError as exc:
        raise OutputKeyError(key, store) from exc
    return key


def _options(url: str, query: str, allowed: frozenset[str]) -> dict[str, str]:
    """The query of ``url`` as a dict; raises ``ValueError`` for an unknown or repeated
    option (a typo must not pass silently)."""
    parsed = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    unknown = sorted(set(parsed) - allowed)
    if unknown:
        raise ValueError(
            f"output store {url!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed)) or 'none'}"
        )
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise ValueError(f"output store {url!r}: option(s) given twice: {', '.join(repeated)}")
    return {name: values[0] for name, values in parsed.items()}


# --------------------------------------------------------------------------- folder


def _read_regular(path: Path) -> bytes | None:
    """The bytes of the regular file at ``path``; None when there is none (a FIFO or a
    folder there is none either: it cannot hang or fool a reader)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


@attrs.frozen
class FolderStore:
    """An output store in a folder every box mounts (an NFS share): ``file:///shared/outputs``.

    ``put`` writes atomically (temp file in the destination's folder, fsync, rename), off
    the trio loop; ``url`` is the ``file://`` URI of the file.
    """

    scheme: ClassVar[str] = "file"
    """The URL scheme it serves."""

    root: Path = attrs.field()
    """The folder keys are relative to (absolute; made on the first put)."""
    chunk_size: int = _COPY_CHUNK
    """Bytes read from the source, and kept in memory, per step of a put."""

    @root.validator
    def _absolute(self, attribute: object, value: Path) -> None:
        if not value.is_absolute():
            raise ValueError(f"a folder output store needs an absolute path, got {str(value)!r}")

    @classmethod
    def from_url(cls, url: str) -> FolderStore:
        """A folder store for ``file:///path`` (``file://localhost/path`` too) or a plain
        absolute path. Raises ``ValueError`` for another host, a relative path or a query."""
        if url.startswith("/"):
            return cls(Path(url))
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise ValueError(f"not a file:// URL: {url!r}")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"output store {url!r}: a file:// URL names a local folder (file:///path); "
                f"mount {parts.netloc!r}'s share and give its path"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"output store {url!r}: a file:// store takes no options")
        return cls(Path(unquote(parts.path)))

    def __str__(self) -> str:
        return self.root.as_uri()

    def path_of(self, key: str) -> Path:
        """Where ``key`` is stored. Raises ``OutputKeyError`` for a key that could leave the
        root."""
        check_key(key, str(self))
        return safe_join(self.root, key)

    async def put(self, key: str, path: Path, *, content_type: str) -> StoredOutput:
        """Copy the file at ``path`` to ``key``, atomically (a key stored again is replaced).

        Raises ``OutputKeyError`` for a bad key, ``OutputStoreError`` when the source cannot
        be read or the copy cannot be written. A cancelled put leaves nothing behind.
        """
        dest = self.path_of(key)
        try:
            source = await trio.open_file(path, "rb")
        except OSError as exc:
            raise OutputStoreError(str(self), key, f"cannot read {path}: {exc}") from exc
        async with source:
            try:
                async with atomic_file(dest, spill=self.chunk_size) as out:
                    while chunk := await source.read(self.chunk_size):
                        await out.write(chunk)
                    written = await out.commit()
            except OSError as exc:
                raise OutputStoreError(str(self), key, f"cannot write {dest}: {exc}") from exc
        return StoredOutput(
            key=key, url=dest.as_uri(), size=written.st_size, content_type=content_type
        )

    async def get(self, key: str) -> bytes:
        """The bytes stored under ``key``. Raises ``KeyError`` when there are none,
        ``OutputKeyError`` for a bad key, ``OutputStoreError`` when the file cannot be
        read."""
        path = self.path_of(key)
        try:
            data = await trio.to_thread.run_sync(_read_regular, path)
        except OSError as exc:
            raise OutputStoreError(str(self), key, f"cannot read {path}: {exc}") from exc
        if data is None:
            raise KeyError(key)
        return data

    async def delete(self, key: str) -> None:
        """Remove ``key`` (nothing when it is not there). Raises ``OutputKeyError`` for a bad
        key, ``OutputStoreError`` when the file cannot be removed."""
        path = self.path_of(key)
        try:
            await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
        except OSError as exc:
            raise OutputStoreError(str(self), key, f"cannot remove {path}: {exc}") from exc


# --------------------------------------------------------------------------- S3


_S3_OPTIONS = frozenset(
    {"endpoint_url", "region", "public_url", "url_expires", "addressing_style", "max_threads"}
)


def _import_boto3(store: str) -> tuple[Any, Any, tuple[type[BaseException], ...]]:
    """boto3, botocore's ``Config`` and the errors its calls raise; raises
    ``OutputStoreError`` saying what to install when boto3 is missing."""
    try:
        import boto3
        import boto3.exceptions
        import botocore.config
        import botocore.exceptions
    except ImportError as exc:
        raise OutputStoreError(
            store, None, f"the s3 output store needs boto3: pip install 'comfytrio[s3]' ({exc})"
        ) from exc
    errors = (
        boto3.exceptions.Boto3Error,  # S3UploadFailedError...
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
    )
    return boto3, botocore.config.Config, errors


def _not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in ("NoSuchKey", "404", "NotFound")


@attrs.define(eq=False)
class S3Store:
    """An output store in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2...):
    ``s3://bucket/prefix?endpoint_url=...&region=...``.

    Credentials come from where boto3 finds them (``AWS_ACCESS_KEY_ID``..., ``~/.aws``, an
    instance role). Every boto3 call runs in a worker thread, at most ``max_threads`` at
    once; ``url`` is a presigned GET URL valid ``url_expires`` seconds, or ``public_url`` +
    the key when the objects are served publicly.
    """

    scheme: ClassVar[str] = "s3"
    """The URL scheme it serves."""

    bucket: str
    """The bucket."""
    prefix: str
    """What object keys start with (``outputs/``), or ``""``: the object of key ``k`` is
    ``prefix + k``."""
    client: Any
    """The boto3 S3 client (thread-safe; only worker threads call it)."""
    errors: tuple[type[BaseException], ...]
    """What the client raises (botocore's errors), wrapped in ``OutputStoreError``."""
    public_url: str | None = None
    """The public address of ``s3://bucket/prefix`` (a CDN, a public bucket), ending with
    ``/``; None: hand out presigned URLs."""
    url_expires: int = DEFAULT_URL_EXPIRES
    """Seconds a presigned URL stays valid."""
    limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(DEFAULT_S3_THREADS)
    )
    """Bounds the worker threads its calls use at once."""

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """An S3-compatible store for ``s3://bucket/prefix`` and its options:
        ``endpoint_url`` (MinIO and others; path-style addressing then), ``region``,
        ``public_url``, ``url_expires`` (seconds, default 7 days), ``addressing_style``
        (``path``, ``virtual``, ``auto``) and ``max_threads`` (default 8).

        Imports boto3 and makes its client (it reads the AWS configuration, no network).
        Raises ``ValueError`` for a malformed URL or option, ``OutputStoreError`` when boto3
        is missing (``pip install 'comfytrio[s3]'``) or the client cannot be made.
        """
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError(f"not an s3:// URL: {url!r}")
        if not parts.hostname or parts.username or parts.password or parts.port:
            raise ValueError(f"output store {url!r}: expected s3://bucket/prefix (a bucket name)")
        if parts.fragment:
            raise ValueError(f"output store {url!r}: an s3:// store URL has no fragment")
        options = _options(url, parts.query, _S3_OPTIONS)
        bucket = parts.netloc
        prefix = unquote(parts.path).strip("/")
        if prefix:
            check_key(prefix, f"s3://{bucket}")
            prefix += "/"
        try:
            url_expires = int(options.get("url_expires", DEFAULT_URL_EXPIRES))
            max_threads = int(options.get("max_threads", DEFAULT_S3_THREADS))
        except ValueError as exc:
            raise ValueError(
                f"output store {url!r}: url_expires and max_threads take whole numbers"
            ) from exc
        if not 1 <= url_expires <= DEFAULT_URL_EXPIRES:
            raise ValueError(
                f"output store {url!r}: url_expires must be 1 to {DEFAULT_URL_EXPIRES} seconds"
            )
        if max_threads < 1:
            raise ValueError(f"output store {url!r}: max_threads must be 1 or more")
        endpoint_url = options.get("endpoint_url") or None
        if endpoint_url is not None and urlsplit(endpoint_url).scheme not in ("http", "https"):
            raise ValueError(f"output store {url!r}: endpoint_url must be an http(s) URL")
        public_url = options.get("public_url") or None
        if public_url is not None:
            if urlsplit(public_url).scheme not in ("http", "https"):
                raise ValueError(f"output store {url!r}: public_url must be an http(s) URL")
            public_url = public_url.rstrip("/") + "/"
        style = options.get("addressing_style") or ("path" if endpoint_url else "auto")
        if style not in ("path", "virtual", "auto"):
            raise ValueError(
                f"output store {url!r}: addressing_style is path, virtual or auto, not {style!r}"
            )
        store = f"s3://{bucket}/{prefix}"
        boto3, config, errors = _import_boto3(store)
        try:
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=options.get("region") or None,
                config=config(signature_version="s3v4", s3={"addressing_style": style}),
            )
        except errors as exc:
            raise OutputStoreError(store, None, f"cannot make a client: {exc}") from exc
        return cls(
            bucket=bucket,
            prefix=prefix,
            client=client,
            errors=errors,
            public_url=public_url,
            url_expires=url_expires,
            limiter=trio.CapacityLimiter(max_threads),
        )

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def object_key(self, key: str) -> str:
        """The object key of ``key`` (``prefix + key``). Raises ``OutputKeyError`` for a key
        that could leave the prefix."""
        return self.prefix + check_key(key, str(self))

    async def _call(self, key: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a worker thread; boto3's errors and ``OSError`` become
        an ``OutputStoreError`` naming the bucket, the object and ``what`` failed; for a
        ``download``, a missing object raises ``KeyError(key)``."""
        caught: tuple[type[BaseException], ...] = (*self.errors, OSError)
        try:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self.limiter)
        except caught as exc:
            if what == "download" and _not_found(exc):
                raise KeyError(key) from exc
            raise OutputStoreError(
                str(self),
                key,
                f"{what} of object {self.prefix + key!r} in bucket {self.bucket!r} failed: {exc}",
            ) from exc

    async def put(self, key: str, path: Path, *, content_type: str) -> StoredOutput:
        """Upload the file at ``path`` as ``key`` (multipart when large; a key stored again
        is replaced). A cancelled put waits for the transfer under way to end.

        Raises ``OutputKeyError`` for a bad key, ``OutputStoreError`` naming the bucket and
        key when the file cannot be read or the upload fails.
        """
        name = self.object_key(key)

        def upload() -> int:
            size = os.stat(path).st_size
            self.client.upload_file(
                str(path), self.bucket, name, ExtraArgs={"ContentType": content_type}
            )
            return size

        size: int = await self._call(key, "upload", upload)
        return StoredOutput(key=key, url=await self.url(key), size=size, content_type=content_type)

    async def url(self, key: str) -> str:
        """Where a client fetches ``key``: ``public_url`` + the key (percent-encoded), or a
        presigned GET URL valid ``url_expires`` seconds. Raises ``OutputKeyError`` for a bad
        key, ``OutputStoreError`` when no URL can be signed (no credentials)."""
        name = self.object_key(key)
        if self.public_url is not None:
            return self.public_url + quote(key, safe="/")
        signed: str = await self._call(
            key,
            "presigning",
            self.client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": name},
            ExpiresIn=self.url_expires,
        )
        return signed

    async def get(self, key: str) -> bytes:
        """The bytes of ``key``. Raises ``KeyError`` when there is no such object,
        ``OutputKeyError`` for a bad key, ``OutputStoreError`` naming the bucket and key for
        any other failure."""
        name = self.object_key(key)

        def download() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data

        data: bytes = await self._call(key, "download", download)
        return data

    async def delete(self, key: str) -> None:
        """Remove ``key`` (nothing when it is not there). Raises ``OutputKeyError`` for a bad
        key, ``OutputStoreError`` naming the bucket and key when the request fails."""
        name = self.object_key(key)
        await self._call(key, "delete", self.client.delete_object, Bucket=self.bucket, Key=name)
