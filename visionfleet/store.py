"""The one storage interface: a local directory or an S3-compatible object store.

Every area of shared state (``Settings.store_uri(area)``) is opened with :func:`open_store`
and read and written through :class:`Store`, a thin layer on ``pyarrow.fs`` (no hand-written
S3 client): ``s3://bucket/prefix`` speaks the S3 API, so moto, MinIO, Ceph and AWS work the
same. Credentials and the endpoint come from the usual AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``);
``VISIONFLEET_S3_TIMEOUT`` bounds each request (seconds, default 10) so that a store that
disappears fails a call quickly (:class:`StoreUnavailable`) instead of hanging for minutes.

Keys are ``/``-separated and relative to the store's root. A write becomes visible whole or
not at all: locally a temp file is fsynced and renamed; on S3 a single PUT is atomic.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["Store", "open_store", "StoreError", "StoreUnavailable"]


class StoreError(RuntimeError):
    """A store that cannot be used: a bad URL, a missing bucket, a wrong credential."""


class StoreUnavailable(StoreError):
    """The store did not answer (network, timeout): a request should fail with 503 and retry later."""


_NETWORK_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Timeout", "Connection refused", "Couldn't connect",
                    "connection", "timed out")
_AUTH_MARKERS = ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied")


def _classify(err: BaseException, what: str) -> StoreError:
    msg = str(err)
    if isinstance(err, FileNotFoundError):
        return StoreError(f"{what}: not found ({msg})")
    if any(m in msg for m in _AUTH_MARKERS):
        return StoreError(f"{what}: the store refused the credentials (check AWS_ACCESS_KEY_ID / "
                          f"AWS_SECRET_ACCESS_KEY): {msg}")
    if any(m in msg for m in _NETWORK_MARKERS):
        return StoreUnavailable(f"{what}: the store did not answer: {msg}")
    return StoreError(f"{what}: {msg}")


def _s3_filesystem(uri: str):
    import pyarrow.fs as pafs

    timeout = float(os.environ.get("VISIONFLEET_S3_TIMEOUT", "10"))
    kwargs: dict = dict(connect_timeout=timeout, request_timeout=timeout,
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    rest = uri[len("s3://"):]
    if not rest or rest.startswith("/"):
        raise StoreError(f"Got {uri!r} for a store; expected s3://bucket[/prefix]")
    return pafs.S3FileSystem(**kwargs), rest.rstrip("/")


class Store:
    """A root (local directory or ``s3://bucket/prefix``) and the ``pyarrow.fs`` filesystem under it."""

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        import pyarrow.fs as pafs

        raw = os.fspath(uri)
        self.uri = raw
        if raw.startswith("s3://"):
            self.fs, self.root = _s3_filesystem(raw)
            self.local = False
        elif "://" in raw:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(raw)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError
                raise StoreError(f"Got {raw!r} for a store; expected a local path or s3://bucket/prefix: {e}") from e
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.root = str(Path(raw).expanduser().resolve())
            self.fs = pafs.LocalFileSystem()
            self.local = True

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ------------------------------------------------------------------ paths
    def path(self, key: str = "") -> str:
        """The filesystem path of a key (for ``pyarrow`` APIs that take ``filesystem=``)."""
        key = key.strip("/")
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def child(self, prefix: str) -> "Store":
        sub = Store.__new__(Store)
        sub.fs, sub.local = self.fs, self.local
        sub.root = self.path(prefix)
        sub.uri = f"{self.uri.rstrip('/')}/{prefix.strip('/')}"
        return sub

    def local_path(self, key: str = "") -> Path:
        """The local path of a key; refused (ValueError) on an object store."""
        if not self.local:
            raise ValueError(f"{self.uri} is an object store: there is no local path for {key!r}")
        return Path(self.path(key))

    # ------------------------------------------------------------------ io
    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except StoreError:
            raise
        except (OSError, Exception) as e:  # noqa: BLE001 - pyarrow maps AWS errors to OSError / ArrowException
            raise _classify(e, what) from e

    def exists(self, key: str) -> bool:
        import pyarrow.fs as pafs

        info = self._call(f"stat {self.uri}/{key}", self.fs.get_file_info, self.path(key))
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, key: str) -> bytes:
        def _read() -> bytes:
            with self.fs.open_input_stream(self.path(key)) as f:
                return f.read()
        return self._call(f"read {self.uri}/{key}", _read)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object; readers see the old content or the new, never half."""
        target = self.path(key)

        def _write() -> None:
            if self.local:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            else:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
        self._call(f"write {self.uri}/{key}", _write)

    def delete(self, key: str) -> None:
        import pyarrow.fs as pafs

        def _delete() -> None:
            info = self.fs.get_file_info(self.path(key))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(key))
            elif info.type != pafs.FileType.NotFound:
                self.fs.delete_file(self.path(key))
        self._call(f"delete {self.uri}/{key}", _delete)

    def list(self, prefix: str = "", recursive: bool = False) -> Iterator[tuple[str, int, bool]]:
        """(key, size in bytes, is_dir) under a prefix; nothing when the prefix does not exist."""
        import pyarrow.fs as pafs

        base = self.root.rstrip("/") + "/"
        sel = pafs.FileSelector(self.path(prefix), allow_not_found=True, recursive=recursive)
        for info in self._call(f"list {self.uri}/{prefix}", self.fs.get_file_info, sel):
            key = info.path[len(base):] if info.path.startswith(base) else info.path
            yield key, int(info.size or 0), info.type == pafs.FileType.Directory

    def check(self) -> None:
        """Fail now, with a clear error, if the store cannot be reached or written (run at start)."""
        probe = f".probe/{uuid.uuid4().hex}"
        self.write_bytes(probe, b"ok")
        if self.read_bytes(probe) != b"ok":
            raise StoreError(f"{self.uri}: a probe object did not read back")
        self.delete(probe)


def open_store(uri: str | os.PathLike[str]) -> Store:
    """Open a store root; raises :class:`StoreError` for a URL it cannot use."""
    return Store(uri)
