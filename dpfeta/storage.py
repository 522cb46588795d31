"""Where a run's files live: a local folder or an object-store prefix, behind one small interface.

``run.dir`` is a local path (``runs``) or a pyarrow filesystem URI (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``abfs://container@account.dfs.core.windows.net/prefix``). Endpoints and
credentials come from the usual environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) or from the
instance's role; query parameters of the URI (``?endpoint_override=...``) are pyarrow's.

Commit rules (docs/architecture.md, "Storage"):

* a file is written to a temporary sibling, then moved into place (a local rename; on an object store
  a server-side copy, which makes the whole object appear at once), so a reader never sees half a file
  and a failed write never replaces a good one;
* a folder is committed by uploading its files, then writing ``<folder>/_COMMITTED`` (the list of its
  files); a reader takes a folder of an object store as present only when that marker is.

``Storage`` pickles as its URI (the filesystem is rebuilt where it is unpickled), so it travels to
Ray workers and tasks, which read and write it themselves: no stage relies on a path that the driver
and a worker would both have to see. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from dpfeta.config import is_uri  # the one test for a URI; also storage.is_uri for its callers

log = logging.getLogger(__name__)

MARKER = "_COMMITTED"
OBJECT_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
_ERRORS = (OSError, ValueError)  # what pyarrow raises for I/O, permissions, endpoints, missing buckets


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def _filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; a clear error for an unsupported one."""
    from pyarrow import fs as pafs

    scheme = _scheme(uri)
    if scheme not in OBJECT_SCHEMES:
        raise ValueError(
            f"storage '{uri}': the URI scheme '{scheme}://' is not supported; expected a local "
            f"path or one of {', '.join(s + '://' for s in OBJECT_SCHEMES)}"
        )
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except _ERRORS as exc:
        raise ValueError(f"storage '{uri}': cannot open it ({exc})") from exc
    return filesystem, path.rstrip("/")


class Storage:
    """A root (local folder or object-store prefix) and the few operations a run needs.

    Relative paths use ``/``. Errors are ``StorageError`` naming the URI and what was being done.
    """

    def __init__(self, location: str | Path):
        location = str(location)
        if location.startswith("file://"):
            location = location[len("file://") :]
        self.is_local = not is_uri(location)
        if self.is_local:
            self.uri = str(Path(location).expanduser().resolve())
        else:
            self.uri = location.rstrip("/")
        self._fs = None
        self._root: Optional[str] = None
        if not self.is_local:
            self._open()  # an unsupported scheme fails here, at once

    # -- identity ----------------------------------------------------------------------------
    def __reduce__(self):
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def child(self, rel: str) -> "Storage":
        return Storage(self.url(rel))

    def url(self, rel: str = "") -> str:
        """The location of ``rel`` as a user would write it (a local path or a URI)."""
        rel = rel.strip("/")
        if not rel:
            return self.uri
        return str(Path(self.uri) / rel) if self.is_local else f"{self.uri}/{rel}"

    @property
    def local_path(self) -> Optional[Path]:
        return Path(self.uri) if self.is_local else None

    # -- pyarrow -----------------------------------------------------------------------------
    def _open(self):
        if self._fs is None:
            if self.is_local:
                from pyarrow import fs as pafs

                self._fs, self._root = pafs.LocalFileSystem(), self.uri
            else:
                self._fs, self._root = _filesystem(self.uri)
        return self._fs

    @property
    def filesystem(self):
        """The pyarrow filesystem (Ray Train/Tune ``storage_filesystem``)."""
        return self._open()

    def fs_path(self, rel: str = "") -> str:
        """``rel``'s path inside ``filesystem`` (Ray's ``storage_path`` with ``storage_filesystem``)."""
        self._open()
        rel = rel.strip("/")
        return f"{self._root}/{rel}" if rel else self._root

    def _fail(self, what: str, rel: str, exc: BaseException) -> "StorageError":
        return StorageError(f"storage '{self.url(rel)}': {what} failed ({exc})")

    # -- reading -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        try:
            return self._open().get_file_info(self.fs_path(rel)).type != pafs.FileType.NotFound
        except _ERRORS as exc:
            raise self._fail("checking", rel, exc) from exc

    def is_file(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        try:
            return self._open().get_file_info(self.fs_path(rel)).type == pafs.FileType.File
        except _ERRORS as exc:
            raise self._fail("checking", rel, exc) from exc

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self._open().open_input_stream(self.fs_path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except _ERRORS as exc:
            raise self._fail("reading", rel, exc) from exc

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def list_files(self, rel: str = "", *, temporaries: bool = False) -> list[str]:
        """Every file under ``rel`` (recursive), relative to ``rel``; [] when there is none. Objects
        being written (``<name>.tmp-<id>``, moved into place when whole) only with ``temporaries``."""
        from pyarrow import fs as pafs

        base = self.fs_path(rel)
        try:
            infos = self._open().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except _ERRORS as exc:
            raise self._fail("listing", rel, exc) from exc
        names = sorted(i.path[len(base) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)
        return names if temporaries else [n for n in names if ".tmp-" not in n.rsplit("/", 1)[-1]]

    # -- writing -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, blob: bytes) -> None:
        """Atomic: a temporary sibling, then a move; a failure leaves the old object (or none)."""
        target = self.fs_path(rel)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        filesystem = self._open()
        try:
            if self.is_local:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
                return
            with filesystem.open_output_stream(tmp) as f:
                f.write(blob)
            filesystem.move(tmp, target)
        except _ERRORS as exc:
            self._discard(tmp)
            raise self._fail("writing", rel, exc) from exc

    def _discard(self, path: str) -> None:
        try:
            if self.is_local:
                Path(path).unlink(missing_ok=True)
            else:
                self._open().delete_file(path)
        except _ERRORS:
            pass

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, default=str) + "\n")

    def delete(self, rel: str) -> None:
        """Remove a file or a folder; nothing if absent."""
        from pyarrow import fs as pafs

        path = self.fs_path(rel)
        try:
            info = self._open().get_file_info(path)
            if info.type == pafs.FileType.File:
                self._open().delete_file(path)
            elif info.type == pafs.FileType.Directory:
                self._open().delete_dir(path)
            elif not self.is_local:  # an object store may list a "folder" only through its keys
                for name in self.list_files(rel):
                    self._open().delete_file(f"{path}/{name}")
        except _ERRORS as exc:
            raise self._fail("deleting", rel, exc) from exc

    # -- folders -----------------------------------------------------------------------------
    def committed(self, rel: str) -> bool:
        """A folder was committed with ``put_dir`` (its marker is there)."""
        return self.is_file(f"{rel.strip('/')}/{MARKER}")

    def put_dir(self, local: Path | str, rel: str) -> None:
        """Upload every file of ``local`` under ``rel``, then the marker listing them."""
        local = Path(local)
        files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != MARKER)
        for name in files:
            self.write_bytes(f"{rel}/{name}", (local / name).read_bytes())
        self.write_json(f"{rel}/{MARKER}", {"files": files})

    def mark_committed(self, rel: str) -> list[str]:
        """Commit a folder whose files were written one by one (e.g. by several tasks): its marker
        lists every file under it now."""
        files = [f for f in self.list_files(rel) if f != MARKER]
        self.write_json(f"{rel}/{MARKER}", {"files": files})
        return files

    def get_files(self, rel: str, local: Path | str) -> list[str]:
        """Download every file under ``rel`` (committed or not) into ``local``."""
        return self._download(rel, [f for f in self.list_files(rel) if f != MARKER], Path(local))

    def get_dir(self, rel: str, local: Path | str) -> list[str]:
        """Download a committed folder into ``local`` (the files its marker lists)."""
        return self._download(rel, list(self.read_json(f"{rel}/{MARKER}")["files"]), Path(local))

    def _download(self, rel: str, names: list[str], local: Path) -> list[str]:
        for name in names:
            dest = local / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.read_bytes(f"{rel}/{name}"))
        return names

    # -- checks ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write, read back and delete a probe object: an unreachable endpoint, a missing bucket or no
        write permission is a ``StorageError`` naming the URI now, before any budget is spent."""
        rel = f".dpfeta-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(rel, b"probe")
            if self.read_bytes(rel) != b"probe":
                raise StorageError(f"storage '{self.url(rel)}': a probe object read back different bytes")
        except StorageError as exc:
            raise StorageError(
                f"{exc}; expected a location this process can write and read "
                "(check the bucket, the endpoint and the credentials). Nothing was spent"
            ) from None
        except FileNotFoundError as exc:
            raise StorageError(f"storage '{self.uri}': a probe object vanished after writing ({exc})") from None
        finally:
            try:
                self.delete(rel)
            except StorageError:
                pass


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


class Workspace:
    """A run's files: written to ``local`` first, then committed to ``remote``.

    For a local run directory both are the same folder and ``fetch``/``commit`` do nothing. For an
    object store ``local`` is a private scratch folder of this process (removed by ``close``); stages
    write there, then ``commit`` publishes to the store, and a rerun ``fetch``-es what exists.
    """

    def __init__(self, location: str | Path | Storage, scratch: Optional[Path] = None):
        self.remote = location if isinstance(location, Storage) else Storage(location)
        if self.remote.is_local:
            self.local, self._scratch = Path(self.remote.uri), None
        else:
            import tempfile

            self._scratch = Path(tempfile.mkdtemp(prefix="dpfeta-", dir=scratch))
            self.local = self._scratch

    @property
    def is_remote(self) -> bool:
        return not self.remote.is_local

    def url(self, rel: str = "") -> str:
        return self.remote.url(rel)

    def path(self, rel: str) -> Path:
        return self.local / rel

    def fetch(self, rel: str) -> bool:
        """Make ``local/rel`` hold the committed file or folder of the store; whether it exists."""
        here = self.local / rel
        if not self.is_remote:
            return here.exists()
        if self.remote.is_file(rel):
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_bytes(self.remote.read_bytes(rel))
            return True
        if self.remote.committed(rel):
            if here.exists():
                shutil.rmtree(here)
            self.remote.get_dir(rel, here)
            return True
        return False

    def commit(self, rel: str) -> None:
        """Publish ``local/rel`` (a file, atomically; a folder, then its marker) to the store."""
        if not self.is_remote:
            return
        here = self.local / rel
        if here.is_dir():
            self.remote.put_dir(here, rel)
        else:
            self.remote.write_bytes(rel, here.read_bytes())

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
