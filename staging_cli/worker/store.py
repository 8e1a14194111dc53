"""The worker's on-disk store: uploads in progress and the content-addressed blobs.

Layout under the store's root directory::

    uploads/{id}.part     bytes received so far (never longer than the acknowledged offset
                          after a restart: unacknowledged bytes are cut off)
    uploads/{id}.json     the upload's durable record: length, metadata, acknowledged offset,
                          expiry. Rewritten atomically (temp file, fsync, rename, fsync dir).
    blobs/sha256/{hex}    finished files, named by their verified sha256. A file appears here
                          only by an atomic rename of a complete, verified, fsynced upload.
    .lock                 flock'd by the one worker process that owns the directory.

Durability order for every chunk: data is written, fsynced, and only then is the new offset
recorded; the client is acknowledged after both. So an acknowledged byte survives a crash, and
the offset on disk never runs ahead of the data.

The whole-file sha256 is computed incrementally while bytes arrive (a copy of the running hash
is advanced per chunk and adopted only when the chunk is accepted), so a finished upload is never
re-read to be hashed. After a restart the received prefix is hashed once, in the background.

Writing here (rather than delegating to a tus library) is deliberate: no maintained Python tus
server offers fsync-before-acknowledge, incremental whole-file digests and an atomic hand-over into
a content-addressed store, which are the point of this worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import tus

log = logging.getLogger("staging_cli.worker")

FLUSH_BYTES = 4 * 1024 * 1024
HASH_BLOCK = 8 * 1024 * 1024


class StoreError(Exception):
    """A refusal with the HTTP status the worker answers with and a sentence for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class UploadRecord:
    """What ``uploads/{id}.json`` holds."""

    id: str
    length: int
    offset: int
    metadata: dict[str, str | None]
    created: float
    expires: float

    @property
    def sha256(self) -> str | None:
        return self.metadata.get("sha256")


@dataclass
class Upload:
    """An upload in progress, as the running worker knows it."""

    record: UploadRecord
    busy: bool = False
    hasher: Any = None  # hashlib sha256 of record.offset bytes, once known
    rehash: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.record.id

    def public(self, url: str | None = None) -> dict[str, Any]:
        r = self.record
        out: dict[str, Any] = {
            "id": r.id,
            "offset": r.offset,
            "length": r.length,
            "sha256": r.sha256,
            "model": r.metadata.get("model"),
            "filename": r.metadata.get("filename"),
            "expires": r.expires,
            "busy": self.busy,
        }
        if url is not None:
            out["url"] = url
        return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole:
    temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """Uploads and blobs under one directory, owned by one worker process."""

    def __init__(
        self,
        root: Path,
        *,
        max_size: int | None = None,
        expiry: float = 24 * 3600.0,
        min_free: int = 0,
        disk_free: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.uploads_dir = self.root / "uploads"
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.max_size = max_size
        self.expiry = expiry
        self.min_free = min_free
        self._disk_free = disk_free or (lambda: shutil.disk_usage(self.root).free)
        self._clock = clock
        self._uploads: dict[str, Upload] = {}
        self._blobs: dict[str, int] = {}
        self._lock_fd: int | None = None
        self.received_bytes = 0  # payload bytes accepted since start (for /status and tests)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the layout, take the directory lock and recover state after a crash."""
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                500,
                f"another worker process already uses {self.root}: give each worker its own --dir",
            ) from None
        self._lock_fd = fd
        for entry in self.blobs_dir.iterdir():
            if tus.SHA256_RE.match(entry.name):
                self._blobs[entry.name] = entry.stat().st_size
            elif entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
        for info in sorted(self.uploads_dir.glob("*.json")):
            self._recover(info)
        for leftover in self.uploads_dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self, info_path: Path) -> None:
        upload_id = info_path.stem
        part = self.uploads_dir / f"{upload_id}.part"
        try:
            raw = json.loads(info_path.read_bytes())
            record = UploadRecord(**raw)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("dropping unreadable upload record %s: %s", info_path, exc)
            info_path.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
            return
        if not part.exists():
            # Crash between the final rename and removing the record: the blob is complete.
            info_path.unlink(missing_ok=True)
            return
        size = part.stat().st_size
        if size > record.offset:
            # Bytes past the acknowledged offset belong to a chunk that was never acknowledged.
            os.truncate(part, record.offset)
        elif size < record.offset:
            log.error(
                "upload %s: data (%d) shorter than its record (%d)", upload_id, size, record.offset
            )
            record.offset = size
        self._uploads[upload_id] = Upload(record=record)

    def start_background(self) -> None:
        """Hash the received prefix of every recovered upload once (needs a running loop)."""
        loop = asyncio.get_running_loop()
        for upload in self._uploads.values():
            if upload.hasher is None and upload.rehash is None:
                upload.rehash = loop.run_in_executor(None, self._rehash, upload)

    def _rehash(self, upload: Upload) -> None:
        hasher = hashlib.sha256()
        remaining = upload.record.offset
        with open(self._part(upload.id), "rb", buffering=0) as fh:
            while remaining > 0:
                block = fh.read(min(HASH_BLOCK, remaining))
                if not block:
                    break
                hasher.update(block)
                remaining -= len(block)
        upload.hasher = hasher

    async def ready(self, upload: Upload) -> None:
        """Wait until the upload's running hash covers its offset."""
        if upload.hasher is not None:
            return
        if upload.rehash is None:
            upload.rehash = asyncio.get_running_loop().run_in_executor(None, self._rehash, upload)
        await upload.rehash

    # -- paths -----------------------------------------------------------------------------

    def _part(self, upload_id: str) -> Path:
        return self.uploads_dir / f"{upload_id}.part"

    def _info(self, upload_id: str) -> Path:
        return self.uploads_dir / f"{upload_id}.json"

    def blob_path(self, hexdigest: str) -> Path | None:
        """The finished file with this sha256, or None."""
        if hexdigest in self._blobs:
            return self.blobs_dir / hexdigest
        return None

    def blob_size(self, hexdigest: str) -> int | None:
        return self._blobs.get(hexdigest)

    def blobs(self) -> dict[str, int]:
        return dict(self._blobs)

    def remove_blob(self, hexdigest: str) -> bool:
        if self._blobs.pop(hexdigest, None) is None:
            return False
        (self.blobs_dir / hexdigest).unlink(missing_ok=True)
        return True

    # -- uploads ---------------------------------------------------------------------------

    def reserved(self) -> int:
        """Bytes that uploads in progress still need."""
        return sum(u.record.length - u.record.offset for u in self._uploads.values())

    def free(self) -> int:
        return self._disk_free()

    def create(self, length: int, metadata: Mapping[str, str | None]) -> Upload:
        """Register a new upload; refuses (413, 507) before any byte is accepted.

        Synchronous on purpose: between the space check and the registration there is no
        await, so two concurrent creations in this event loop cannot both pass the check.
        """
        if self.max_size is not None and length > self.max_size:
            raise StoreError(
                413,
                f"the upload is {length} bytes, above this worker's maximum of {self.max_size} "
                "bytes (Tus-Max-Size): raise --max-size on the worker",
            )
        free = self.free()
        reserved = self.reserved()
        available = free - reserved - self.min_free
        if length > available:
            raise StoreError(
                507,
                f"this worker has {free} bytes free, {reserved} of them reserved by uploads in "
                f"progress, and keeps {self.min_free} free; the upload needs {length}: free "
                "space on the worker or pick another worker",
            )
        now = self._clock()
        upload_id = secrets.token_hex(16)
        record = UploadRecord(
            id=upload_id,
            length=length,
            offset=0,
            metadata=dict(metadata),
            created=now,
            expires=now + self.expiry,
        )
        self._part(upload_id).touch()
        write_atomic(self._info(upload_id), json.dumps(asdict(record)).encode())
        upload = Upload(record=record, hasher=hashlib.sha256())
        self._uploads[upload_id] = upload
        if length == 0:
            self._finalize(upload, upload.hasher.hexdigest())
        return upload

    def get(self, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id) if tus.UPLOAD_ID_RE.match(upload_id) else None
        if upload is None or (not upload.busy and upload.record.expires <= self._clock()):
            if upload is not None:
                self._discard(upload)
            raise StoreError(404, f"upload {upload_id[:40]!r} does not exist or has expired")
        return upload

    def find(self, sha256: str, length: int | None = None) -> list[Upload]:
        """Uploads in progress of this content, most advanced first."""
        found = [
            u
            for u in self._uploads.values()
            if u.record.sha256 == sha256 and (length is None or u.record.length == length)
        ]
        return sorted(found, key=lambda u: u.record.offset, reverse=True)

    def uploads(self) -> list[Upload]:
        return list(self._uploads.values())

    def delete(self, upload_id: str) -> None:
        upload = self.get(upload_id)
        if upload.busy:
            raise StoreError(423, "the upload is being written right now; try again shortly")
        self._discard(upload)

    def _discard(self, upload: Upload) -> None:
        self._uploads.pop(upload.id, None)
        self._info(upload.id).unlink(missing_ok=True)
        self._part(upload.id).unlink(missing_ok=True)

    def sweep_expired(self) -> list[str]:
        """Remove idle uploads past their expiry; returns their ids."""
        now = self._clock()
        gone = [u for u in self._uploads.values() if not u.busy and u.record.expires <= now]
        for upload in gone:
            log.info("upload %s expired at offset %d; removed", upload.id, upload.record.offset)
            self._discard(upload)
        return [u.id for u in gone]

    def begin(
        self, upload: Upload, offset: int, checksum: tuple[str, bytes] | None = None
    ) -> ChunkWriter:
        """Start accepting one PATCH body at ``offset``; the caller marks the upload busy."""
        if offset != upload.record.offset:
            raise StoreError(
                409,
                f"Upload-Offset {offset} does not match the upload's offset "
                f"{upload.record.offset}: HEAD the upload and continue from there",
            )
        return ChunkWriter(self, upload, checksum)

    def _record(self, upload: Upload, offset: int) -> None:
        """Durably record a new offset; only then does anyone (HEAD, /status) see it."""
        record = replace(upload.record, offset=offset, expires=self._clock() + self.expiry)
        write_atomic(self._info(upload.id), json.dumps(asdict(record)).encode())
        upload.record = record

    def _finalize(self, upload: Upload, digest: str) -> None:
        """Move a complete upload into the blob store (called with data already fsynced)."""
        expected = upload.record.sha256
        if expected is not None and expected != digest:
            self._discard(upload)
            raise StoreError(
                tus.STATUS_DIGEST_MISMATCH,
                f"the received file's sha256 is {digest}, not the announced {expected}; "
                "the upload was discarded: check the file and its --sha256",
            )
        os.replace(self._part(upload.id), self.blobs_dir / digest)
        _fsync_dir(self.blobs_dir)
        self._blobs[digest] = upload.record.length
        upload.record.metadata["sha256"] = digest
        self._uploads.pop(upload.id, None)
        self._info(upload.id).unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        usage = shutil.disk_usage(self.root)
        return {
            "disk": {
                "free": self.free(),
                "total": usage.total,
                "reserved": self.reserved(),
                "min_free": self.min_free,
            },
            "max_size": self.max_size,
            "received_bytes": self.received_bytes,
            "uploads": [u.public() for u in self._uploads.values()],
            "blobs": [{"digest": f"sha256:{h}", "size": s} for h, s in sorted(self._blobs.items())],
        }


class ChunkWriter:
    """Accepts one PATCH body: buffered writes and hashing in a worker thread, pipelined with
    the event loop receiving the next buffer; ``commit`` makes the chunk durable or discards it.
    """

    def __init__(self, store: Store, upload: Upload, checksum: tuple[str, bytes] | None) -> None:
        self.store = store
        self.upload = upload
        self.start = upload.record.offset
        self.pos = self.start
        self.checksum = checksum
        self._chunk_hasher = hashlib.new(checksum[0]) if checksum else None
        self._whole: Any = None
        self._buf = bytearray()
        self._pending: asyncio.Future[None] | None = None
        self._fd: int | None = None
        self._loop = asyncio.get_running_loop()

    async def _prepare(self) -> None:
        if self._fd is None:
            await self.store.ready(self.upload)
            self._whole = self.upload.hasher.copy()
            self._fd = os.open(self.store._part(self.upload.id), os.O_WRONLY)

    @property
    def received(self) -> int:
        return self.pos - self.start + len(self._buf)

    async def feed(self, data: bytes) -> None:
        if self.start + self.received + len(data) > self.upload.record.length:
            raise StoreError(
                413, "the request body runs past Upload-Length; the chunk was discarded"
            )
        self._buf += data
        if len(self._buf) >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        await self._prepare()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        if self._buf:
            data, self._buf = self._buf, bytearray()
            self._pending = self._loop.run_in_executor(None, self._write, data)

    def _write(self, data: bytearray) -> None:
        assert self._fd is not None
        self._whole.update(data)
        if self._chunk_hasher is not None:
            self._chunk_hasher.update(data)
        view = memoryview(data)
        pos = self.pos
        try:
            while view:
                written = os.pwrite(self._fd, view, pos)
                view = view[written:]
                pos += written
            # Start writing this piece to disk now (asynchronously: WB_SYNC_NONE), while the
            # event loop receives the next one, so that commit's fdatasync finds little left
            # to flush instead of the whole chunk: the disk works during the transfer rather
            # than after it, with the client idle. The fdatasync still guarantees durability.
            if hasattr(os, "posix_fadvise"):  # not on macOS/Windows: there, fdatasync does it all
                os.posix_fadvise(self._fd, self.pos, pos - self.pos, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise StoreError(507, "the worker's disk is full; the chunk was discarded") from exc
            raise
        self.pos = pos

    async def _drain(self) -> None:
        await self._flush()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def commit(self) -> int:
        """Verify, fsync, record and (at the end) finalize; returns the new offset."""
        try:
            try:
                await self._drain()
            except BaseException:
                await self._loop.run_in_executor(None, self._truncate)
                raise
            if self.checksum is not None:
                assert self._chunk_hasher is not None
                if self._chunk_hasher.digest() != self.checksum[1]:
                    await self._loop.run_in_executor(None, self._truncate)
                    raise StoreError(
                        tus.STATUS_CHECKSUM_MISMATCH,
                        f"the chunk at offset {self.start} failed its {self.checksum[0]} "
                        "checksum and was discarded: send it again",
                    )
            if self.pos == self.start:
                return self.start
            await self._loop.run_in_executor(None, self._persist)
            return self.pos
        finally:
            self._close()

    def _persist(self) -> None:
        assert self._fd is not None
        os.fdatasync(self._fd)
        if self.pos == self.upload.record.length:
            self.upload.record.offset = self.pos
            self.store._finalize(self.upload, self._whole.hexdigest())
        else:
            self.store._record(self.upload, self.pos)
        # adopted only once the new offset is durable, so hash and offset never disagree
        self.upload.hasher = self._whole
        self.store.received_bytes += self.pos - self.start

    def _truncate(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, self.start)
        self.pos = self.start

    async def abort(self, *, keep: bool) -> int:
        """The body ended early. ``keep`` (no checksum to verify) makes what arrived durable,
        as tus recommends; otherwise the partial chunk is discarded. Returns the offset."""
        try:
            with contextlib.suppress(Exception):
                await self._drain()
            if keep and self.checksum is None and self.pos > self.start:
                await self._loop.run_in_executor(None, self._persist)
                return self.pos
            await self._loop.run_in_executor(None, self._truncate)
            return self.start
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
