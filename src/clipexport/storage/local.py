"""The embedded store: a directory, with the same semantics as a bucket.

Layout under the root::

    <key>                          the objects, by their `/`-separated keys
    .clipexport/meta/<key>.json    size, mtime and sha256 of each object
    .clipexport/incoming/          partial uploads and temporary files

An object appears under its key only whole (written aside, then renamed).
Its sha256 is known while its metadata matches the file's size and mtime;
its etag is that sha256, else a size/mtime tag. A killed `put_file` leaves
its partial in `incoming/`, named after the key and the content's sha256,
and the next call continues it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from clipexport.errors import PreconditionFailedError, StorageError, StorageNotFoundError, UsageError
from clipexport.storage.base import (
    CHUNK,
    CountingReader,
    ObjectInfo,
    Progress,
    Reporter,
    TransferState,
    check_key,
    hash_file,
)
from clipexport.storage.download import fetch

RESERVED = ".clipexport"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` between threads and processes (POSIX flock).

    Two writers of the same content would otherwise append to one partial;
    the sha256 check would catch it, but as a spurious failure. The lock
    file goes when released; a writer that raced that removal still cannot
    commit wrong bytes, for the same reason.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the sha256 check alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class LocalStorage:
    """A Storage in a local directory (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        self._meta = self.root / RESERVED / "meta"
        self._incoming = self.root / RESERVED / "incoming"

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    # -- paths --------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == RESERVED:
            raise UsageError(f"invalid storage key {key!r}: {RESERVED}/ is reserved")
        return self.root / key

    def _meta_path(self, key: str) -> Path:
        return self._meta / (key + ".json")

    def _state_key(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _temp(self) -> Path:
        self._incoming.mkdir(parents=True, exist_ok=True)
        return self._incoming / f"tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"

    def check(self) -> None:
        """Fail now if the store's directory cannot be created or written."""
        try:
            self._incoming.mkdir(parents=True, exist_ok=True)
            probe = self._temp()
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise self._error("open the store", exc) from exc

    # -- reads --------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(f"stat {key}", exc) from exc
        if not path.is_file():
            return None
        return self._info(key, st)

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        sha = None
        try:
            meta = json.loads(self._meta_path(key).read_text())
            if meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns:
                sha = meta.get("sha256")
        except (OSError, ValueError):
            pass
        etag = sha or f"{st.st_mtime_ns:x}-{st.st_size:x}"
        return ObjectInfo(key=key, size=st.st_size, sha256=sha, etag=etag)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise self._error(f"read {key}", exc) from exc

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                data = os.pread(f.fileno(), end - start, start)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StorageNotFoundError(f"{self.url}/{key}: no such object") from None
        except OSError as exc:
            raise self._error(f"read {key}", exc) from exc
        if len(data) != end - start:
            raise StorageError(f"{self.url}/{key}: bytes {start}-{end} are past its end")
        return data

    def get_file(
        self, key: str, path: Path, *, progress: Progress | None = None, sha256: str | None = None
    ) -> ObjectInfo:
        source = self._path(key)

        def open_range(start: int, end: int, etag: str | None) -> Iterator[bytes]:
            with open(source, "rb") as f:
                if self._info(key, os.fstat(f.fileno())).etag != etag:
                    raise PreconditionFailedError(f"{self.url}/{key}: changed since its download began")
                f.seek(start)
                while start < end and (chunk := f.read(min(CHUNK, end - start))):
                    start += len(chunk)
                    yield chunk

        try:
            return fetch(
                Path(path),
                lambda: self.stat(key),
                open_range,
                sha256=sha256,
                progress=progress,
                label=f"{self.url}/{key}",
            )
        except OSError as exc:
            raise self._error(f"download {key} to {path}", exc) from exc

    def list(self, prefix: str) -> list[ObjectInfo]:
        check_key(prefix, prefix=True)
        top = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != RESERVED]
            for name in filenames:
                key = (here / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        found.append(self._info(key, (here / name).stat()))
                    except FileNotFoundError:
                        continue  # deleted while listing
        return sorted(found, key=lambda i: i.key)

    # -- writes -------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        try:
            tmp = self._temp()
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._commit(tmp, dest, key, hashlib.sha256(data).hexdigest())
        except OSError as exc:
            raise self._error(f"write {key}", exc) from exc

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        progress: Progress | None = None,
        state: TransferState | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        dest = self._path(key)
        path = Path(path)
        report = Reporter(progress)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise self._error(f"read {path}", exc) from exc
        sha = sha256 or hash_file(path)
        found = self.stat(key)
        if found is not None and found.size == size and found.sha256 == sha:
            report.flush(size)
            return found
        self._incoming.mkdir(parents=True, exist_ok=True)
        partial = self._incoming / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{sha}.part"
        if state is not None:
            state.save(self._state_key(key), {"kind": "local", "partial": partial.name, "sha256": sha})
        try:
            with _locked(partial.with_name(partial.name + ".lock")):
                found = self.stat(key)  # stored by another writer while this one waited?
                if found is None or found.size != size or found.sha256 != sha:
                    self._copy(path, partial, size, sha, report)
                    self._commit(partial, dest, key, sha)
        except OSError as exc:
            raise self._error(f"store {path} as {key}", exc) from exc
        if state is not None:
            state.clear(self._state_key(key))
        report.flush(size)
        info = self.stat(key)
        assert info is not None
        return info

    def _copy(self, source: Path, partial: Path, size: int, sha: str, report: Reporter) -> None:
        """Append the rest of `source` to `partial`, hashing all of it."""
        digest = hashlib.sha256()
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > size:
            partial.unlink()
            offset = 0
        if offset:  # bytes a killed run already copied
            with open(partial, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        with open(source, "rb") as raw, open(partial, "ab") as out:
            raw.seek(offset)
            reader = CountingReader(raw, report, start=offset)
            while chunk := reader.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha:
            partial.unlink(missing_ok=True)
            raise StorageError(f"{source}: content changed while being stored (sha256 differs); run again")

    def _commit(self, tmp: Path, dest: Path, key: str, sha: str) -> None:
        """Rename `tmp` onto `dest`, then record its size, mtime and sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        st = dest.stat()
        meta = self._meta_path(key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        note = self._temp()
        note.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}))
        os.replace(note, meta)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise UsageError("refusing to delete a whole store: give a non-empty prefix")
        count = 0
        for info in self.list(prefix):
            for p in (self.root / info.key, self._meta_path(info.key)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise self._error(f"delete {info.key}", exc) from exc
            count += 1
            self._prune(info.key)
        return count

    def _prune(self, key: str) -> None:
        """Remove directories emptied by a delete, up to the root."""
        for base in (self.root, self._meta):
            parent = (base / key).parent
            while parent != base and base in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def abort_uploads(self, state: TransferState) -> None:
        """Drop the partial uploads `state` records for this store."""
        mine = self._state_key("")
        for skey in state.keys():
            if not skey.startswith(mine):
                continue
            record = state.load(skey) or {}
            if record.get("kind") == "local" and record.get("partial"):
                (self._incoming / Path(record["partial"]).name).unlink(missing_ok=True)
            state.clear(skey)

    def _error(self, what: str, exc: OSError) -> StorageError:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
        return StorageError(f"{what} in {self.root}: {reason}")
