"""The stager: one file onto one worker over tus 1.0, resumable, verified, bounded.

For each file::

    digest (cached) -> HEAD /blobs/sha256:X (already there: done)
      -> find the worker's upload of this content (local record, then GET /uploads?sha256=)
         or create one (POST /uploads)
      -> PATCH chunks from the worker's Upload-Offset, each with Upload-Checksum, the next
         chunk read and hashed in a thread while the current one is on the wire
      -> the last PATCH's 204 means the worker verified the whole file and moved it into place.

Failures are sorted into three kinds: transient (connection errors, timeouts, 5xx, 408, 423,
409, 460) are retried with jittered exponential backoff inside the resume budget; refusals (400,
401, 403, 413, 415, 507, ...) and a whole-file digest mismatch end the run at once with a
sentence; a user cancel propagates as cancellation. The worker's offset is the only truth: after
any doubt the stager asks it (HEAD) and continues from there.

tuspy exists, but it buffers whole chunks synchronously, has no async API, no digest-aware
resume across machines and no progress-based budget; the loop here is small enough to own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from .. import tus
from ..config import DEFAULT_CHUNK_SIZE, DEFAULT_STALL_WINDOW
from ..errors import (
    AuthenticationError,
    BudgetExpired,
    ChecksumRetriesExhausted,
    DigestMismatch,
    FileChanged,
    InsufficientStorage,
    StallTimeout,
    TransferError,
    UploadRefused,
    UploadTooLarge,
    UsageError,
    WorkerUnreachable,
)
from .digest import DigestCache, FileVersion, hash_file
from .events import (
    EventSink,
    FileResult,
    FileSkipped,
    FileStaged,
    FileStarted,
    Hashing,
    Notice,
    Retrying,
    UploadProgress,
    ignore,
)
from .records import ResumeRecords
from .retry import Backoff, RateMeter, ResumeBudget, TokenBucket

SEND_SLICE = 1024 * 1024


@dataclass(frozen=True)
class StageOptions:
    """Tuning for the stager; the defaults suit multi-gigabyte files on a LAN."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    checksum: str | None = "sha256"  # per-chunk Upload-Checksum algorithm, None to disable
    stall_window: float = DEFAULT_STALL_WINDOW
    deadline: float | None = None
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    max_chunk_retries: int = 5  # 460 answers in a row for one chunk
    max_restarts: int = 3  # uploads lost by the worker (404/410) before giving up
    limit_rate: float | None = None  # bytes per second
    connect_timeout: float = 10.0
    io_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise UsageError("the chunk size must be at least 1 byte")
        if self.checksum is not None and self.checksum not in tus.CHECKSUM_ALGORITHMS:
            raise UsageError(
                f"checksum {self.checksum!r} is not supported: use "
                f"{', '.join(tus.CHECKSUM_ALGORITHMS)} or none"
            )
        if self.stall_window <= 0:
            raise UsageError("the stall window must be positive")


@dataclass
class _Chunk:
    offset: int
    data: memoryview  # a view of one of the reader's two buffers
    checksum: str | None


@dataclass
class _Server:
    """What OPTIONS told us about the tus server."""

    checksums: tuple[str, ...] | None = None  # None: unknown (no OPTIONS answer)
    max_size: int | None = None
    extensions: tuple[str, ...] = field(default_factory=tuple)


class _Transient(Exception):
    """A failure worth retrying after a backoff."""


def _reason(response: httpx.Response) -> str:
    text = response.text.strip() if response.content else ""
    return text[:500] or response.reason_phrase or f"HTTP {response.status_code}"


class Stager:
    """Stages files onto one worker. Reusable for many files; ``aclose()`` when done."""

    def __init__(
        self,
        worker: str,
        *,
        token: str | None = None,
        options: StageOptions | None = None,
        digest_cache: DigestCache | None = None,
        records: ResumeRecords | None = None,
        on_event: EventSink = ignore,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker.rstrip("/")
        self.options = options or StageOptions()
        self.digests = digest_cache or DigestCache(None)
        self.records = records or ResumeRecords(None)
        self.emit = on_event
        self.clock = clock
        headers = {"User-Agent": "staging-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        opts = self.options
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(
                opts.io_timeout, connect=opts.connect_timeout, pool=opts.connect_timeout
            ),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )
        if client is not None and token:
            self.client.headers.update(headers)
        self._server: _Server | None = None

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> Stager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the public operation --------------------------------------------------------------

    async def digest(
        self, path: Path, sha256: str | None = None, on_event: EventSink | None = None
    ) -> tuple[FileVersion, str]:
        """The file's version and sha256: given, cached, or computed (and then cached)."""
        emit = on_event or self.emit
        try:
            version = FileVersion.of(path)
        except FileNotFoundError as exc:
            raise UsageError(f"{path} does not exist") from exc
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
        if not path.is_file():
            raise UsageError(f"{path} is not a regular file")
        if sha256 is not None:
            try:
                return version, tus.validate_sha256(sha256)
            except tus.HeaderError as exc:
                raise UsageError(f"--sha256 for {path}: {exc}") from exc
        cached = self.digests.get(version)
        if cached:
            return version, cached
        name = str(path)
        emit(Hashing(name, 0, version.size))
        digest = await hash_file(path, lambda d, t: emit(Hashing(name, d, t)))
        if FileVersion.of(path) != version:
            raise FileChanged(
                f"{path} changed while it was being hashed: wait until it is complete"
            )
        self.digests.put(version, digest, str(path.resolve()))
        return version, digest

    async def stage_file(
        self,
        path: Path | str,
        *,
        model: str | None = None,
        sha256: str | None = None,
        on_event: EventSink | None = None,
    ) -> FileResult:
        """Put one file on the worker; returns what was done. ``on_event`` overrides the
        stager's event sink for this file (a stager may serve several cold loads at once)."""
        path = Path(path)
        emit = on_event or self.emit
        if model is not None:
            tus.validate_model_name(model)
        started = self.clock()
        version, digest = await self.digest(path, sha256, emit)
        run = _FileRun(self, path, version, digest, model, emit)
        result = await run.run()
        result = FileResult(**{**result.to_dict(), "seconds": self.clock() - started})
        emit(FileStaged(str(path), result))
        return result

    # -- HTTP plumbing shared by file runs -------------------------------------------------

    def url(self, path: str) -> str:
        return self.worker + path

    async def server(self) -> _Server:
        """OPTIONS once: which checksums and sizes the server takes (peers differ)."""
        if self._server is None:
            info = _Server()
            try:
                response = await self.client.options(self.url("/uploads"))
            except httpx.HTTPError:
                response = None
            if response is not None:
                if response.status_code in (401, 403):
                    raise _refusal(response, self.worker)
                if response.status_code < 300:
                    algos = response.headers.get("tus-checksum-algorithm")
                    if algos is not None:
                        info.checksums = tuple(a.strip().lower() for a in algos.split(","))
                    ext = response.headers.get("tus-extension", "")
                    info.extensions = tuple(e.strip() for e in ext.split(",") if e.strip())
                    if ext and "checksum" not in info.extensions:
                        info.checksums = ()
                    max_size = response.headers.get("tus-max-size", "")
                    info.max_size = int(max_size) if max_size.isdigit() else None
            self._server = info
        return self._server


def _refusal(response: httpx.Response, worker: str) -> UploadRefused:
    status = response.status_code
    reason = _reason(response)
    if status in (401, 403):
        return AuthenticationError(
            f"worker {worker} refused the token ({status}): {reason}", status=status
        )
    if status == 413:
        return UploadTooLarge(
            f"worker {worker} refused the file as too large: {reason}", status=status
        )
    if status == 507:
        return InsufficientStorage(f"worker {worker} has no room: {reason}", status=status)
    return UploadRefused(f"worker {worker} refused the upload ({status}): {reason}", status=status)


class _FileRun:
    """The state of staging one file: offset, budget, backoff, bytes sent."""

    def __init__(
        self,
        stager: Stager,
        path: Path,
        version: FileVersion,
        digest: str,
        model: str | None,
        emit: EventSink,
    ) -> None:
        self.s = stager
        self.emit = emit
        self.opts = stager.options
        self.path = path
        self.name = str(path)
        self.version = version
        self.size = version.size
        self.digest = digest
        self.model = model
        self.budget = ResumeBudget(self.opts.stall_window, self.opts.deadline, stager.clock)
        self.backoff = Backoff(self.opts.backoff_initial, self.opts.backoff_max)
        self.meter = RateMeter(clock=stager.clock)
        self.bucket = (
            TokenBucket(self.opts.limit_rate, stager.clock) if self.opts.limit_rate else None
        )
        self.sent = 0
        self.offset = 0
        self.url: str | None = None
        self.restarts = 0
        self.checksum: str | None = self.opts.checksum
        self.tus_headers = {"Tus-Resumable": tus.TUS_VERSION}

    # -- retry machinery -------------------------------------------------------------------

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request bounded by the budget; transport errors become _Transient."""
        remaining = self.budget.remaining()
        if remaining <= 0:
            self.budget.check(self.offset)
        try:
            async with asyncio.timeout(remaining):
                return await self.s.client.request(method, url, **kwargs)
        except TimeoutError as exc:
            self.budget.check(self.offset, "the request outlived the stall window")
            raise _Transient("timed out") from exc
        except httpx.TimeoutException as exc:
            raise _Transient(f"timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc

    async def _pause(self, why: str) -> None:
        """Back off before a retry, never past the budget."""
        self.budget.check(self.offset, why)
        delay = min(self.backoff.next_delay(), max(0.0, self.budget.remaining()))
        self.emit(Retrying(self.name, why, round(delay, 3), self.backoff.attempt))
        await asyncio.sleep(delay)
        self.budget.check(self.offset, why)

    async def _retrying(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """A request retried on transport errors and 5xx until the budget ends."""
        while True:
            try:
                response = await self._call(method, url, **kwargs)
            except _Transient as exc:
                await self._pause(str(exc))
                continue
            if response.status_code >= 500 and response.status_code != 507:
                await self._pause(f"{response.status_code} {_reason(response)}")
                continue
            return response

    # -- the steps -------------------------------------------------------------------------

    async def _blob_exists(self) -> bool:
        response = await self._retrying("HEAD", self.s.url(f"/blobs/sha256:{self.digest}"))
        if response.status_code in (401, 403):
            raise _refusal(response, self.s.worker)
        if response.status_code != 200:
            return False
        length = response.headers.get("content-length")
        if length is None or not length.isdigit():
            return False  # not the toolkit's blob answer (a catch-all 200): upload anyway
        if int(length) != self.size:
            raise DigestMismatch(
                f"worker {self.s.worker} holds sha256 {self.digest} with {length} bytes, but "
                f"{self.path} has {self.size}: the given --sha256 is wrong"
            )
        return True

    async def _head(self, url: str) -> int | None:
        """The worker's offset of an upload, or None when it is gone (404/410)."""
        response = await self._retrying("HEAD", url, headers=self.tus_headers)
        if response.status_code in (404, 410):
            return None
        if response.status_code in (401, 403):
            raise _refusal(response, self.s.worker)
        if response.status_code != 200:
            raise UploadRefused(
                f"worker {self.s.worker} answered HEAD {url} with {response.status_code}",
                status=response.status_code,
            )
        length = response.headers.get("upload-length")
        if length is not None and length.isdigit() and int(length) != self.size:
            return None
        try:
            return tus.parse_offset(response.headers.get("upload-offset"))
        except tus.HeaderError as exc:
            raise UploadRefused(f"worker {self.s.worker}: {exc}", status=200) from exc

    async def _lookup(self) -> tuple[str, int] | None:
        """An upload of this content already in progress on the worker (any client's)."""
        recorded = self.s.records.get(self.s.worker, self.digest, self.size)
        if recorded:
            offset = await self._head(recorded)
            if offset is not None:
                return recorded, offset
            self.s.records.forget(self.s.worker, self.digest, self.size)
        response = await self._retrying(
            "GET", self.s.url("/uploads"), params={"sha256": self.digest, "length": self.size}
        )
        if response.status_code in (401, 403):
            raise _refusal(response, self.s.worker)
        if response.status_code != 200:
            return None  # a tus server without the toolkit's lookup
        try:
            candidates = response.json().get("uploads", [])
        except (ValueError, AttributeError):
            return None
        for candidate in candidates:
            url = candidate.get("url") if isinstance(candidate, dict) else None
            if not isinstance(url, str):
                continue
            url = urljoin(self.s.worker + "/", url)
            offset = await self._head(url)
            if offset is not None:
                return url, offset
        return None

    async def _create(self) -> tuple[str, int]:
        metadata = {"filename": self.path.name, "sha256": self.digest}
        if self.model is not None:
            metadata["model"] = self.model
        headers = {
            **self.tus_headers,
            "Upload-Length": str(self.size),
            "Upload-Metadata": tus.encode_metadata(metadata),
        }
        response = await self._retrying("POST", self.s.url("/uploads"), headers=headers)
        if response.status_code != 201:
            raise _refusal(response, self.s.worker)
        location = response.headers.get("location")
        if not location:
            raise UploadRefused(
                f"worker {self.s.worker} created an upload without a Location", status=201
            )
        url = urljoin(self.s.worker + "/", location)
        self.s.records.put(self.s.worker, self.digest, self.size, url)
        return url, 0

    async def run(self) -> FileResult:
        server = await self.s.server()
        if server.max_size is not None and self.size > server.max_size:
            raise UploadTooLarge(
                f"{self.path} is {self.size} bytes; worker {self.s.worker} takes at most "
                f"{server.max_size} (Tus-Max-Size)",
                status=413,
            )
        if self.checksum and server.checksums is not None and self.checksum not in server.checksums:
            self.emit(
                Notice(
                    self.name,
                    f"the worker does not verify {self.checksum} chunk "
                    "checksums; sending without them",
                )
            )
            self.checksum = None
        if await self._blob_exists():
            self.emit(FileSkipped(self.name, self.size, self.digest, "the worker already has it"))
            return FileResult(self.name, self.digest, self.size, True, self.size, 0)
        found = await self._lookup()
        self.url, self.offset = found or await self._create()
        resumed_from = self.offset
        self.emit(FileStarted(self.name, self.size, self.digest, resumed_from, self.url))
        self.meter.add(self.offset)
        await self._upload()
        if FileVersion.of(self.path) != self.version:
            raise FileChanged(
                f"{self.path} changed while it was being staged (size or mtime differ): the "
                "worker may hold a mix of old and new bytes under the old digest's upload; "
                "stage it again once it is complete"
            )
        self.s.records.forget(self.s.worker, self.digest, self.size)
        return FileResult(
            self.name, self.digest, self.size, False, resumed_from, self.sent, self.url
        )

    async def _upload(self) -> None:
        assert self.url is not None
        fd = os.open(self.path, os.O_RDONLY)
        reader = _Reader(fd, self.size, self.opts.chunk_size, self.checksum)
        chunk_failures = 0
        try:
            while self.offset < self.size:
                chunk = await reader.get(self.offset)
                reader.prefetch(chunk.offset + len(chunk.data))
                try:
                    response = await self._patch(chunk)
                except _Transient as exc:
                    await self._pause(str(exc))
                    await self._resync()
                    continue
                status = response.status_code
                if status == 204:
                    new_offset = tus.parse_offset(response.headers.get("upload-offset"))
                    if new_offset > self.offset:
                        self.budget.progress()
                        self.backoff.reset()
                        chunk_failures = 0
                    self.offset = new_offset
                    self._progress()
                elif status == tus.STATUS_CHECKSUM_MISMATCH:
                    chunk_failures += 1
                    if chunk_failures > self.opts.max_chunk_retries:
                        raise ChecksumRetriesExhausted(
                            f"the chunk at offset {self.offset} of {self.path} failed its "
                            f"checksum on the worker {chunk_failures} times: the network or "
                            "the worker's memory corrupts data"
                        )
                    self.emit(
                        Retrying(
                            self.name,
                            "chunk checksum mismatch (460); sending it again",
                            0,
                            chunk_failures,
                        )
                    )
                elif status == tus.STATUS_DIGEST_MISMATCH:
                    self.s.records.forget(self.s.worker, self.digest, self.size)
                    raise DigestMismatch(f"worker {self.s.worker}: {_reason(response)}")
                elif status in (404, 410):
                    await self._restart()
                elif status in (409, 423, 408) or (status >= 500 and status != 507):
                    await self._pause(f"{status} {_reason(response)}")
                    await self._resync()
                else:
                    raise _refusal(response, self.s.worker)
        finally:
            await reader.aclose()
            os.close(fd)

    async def _patch(self, chunk: _Chunk) -> httpx.Response:
        assert self.url is not None
        headers = {
            **self.tus_headers,
            "Content-Type": tus.OFFSET_CONTENT_TYPE,
            "Upload-Offset": str(chunk.offset),
            "Content-Length": str(len(chunk.data)),
        }
        if chunk.checksum is not None:
            headers["Upload-Checksum"] = chunk.checksum
        return await self._call("PATCH", self.url, headers=headers, content=self._body(chunk.data))

    async def _body(self, data: memoryview) -> AsyncIterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), SEND_SLICE):
            piece = view[start : start + SEND_SLICE]
            if self.bucket is not None:
                delay = self.bucket.delay_for(len(piece))
                if delay > 0:
                    await asyncio.sleep(delay)
            self.sent += len(piece)
            yield piece  # type: ignore[misc]

    async def _resync(self) -> None:
        """Ask the worker where the upload stands after a doubt."""
        assert self.url is not None
        offset = await self._head(self.url)
        if offset is None:
            await self._restart()
            return
        if offset > self.offset:
            self.budget.progress()
        self.offset = offset
        self._progress()

    async def _restart(self) -> None:
        """The worker no longer has the upload: maybe it completed, else start over."""
        self.s.records.forget(self.s.worker, self.digest, self.size)
        if await self._blob_exists():
            self.offset = self.size
            self._progress()
            return
        self.restarts += 1
        if self.restarts > self.opts.max_restarts:
            raise TransferError(
                f"worker {self.s.worker} lost the upload of {self.path} {self.restarts} times "
                "(expired or removed): check its --expiry and disk"
            )
        self.emit(Notice(self.name, "the worker no longer has the upload; starting over"))
        self.url, self.offset = await self._create()

    def _progress(self) -> None:
        self.meter.add(self.offset)
        self.emit(
            UploadProgress(
                self.name,
                self.offset,
                self.size,
                self.sent,
                self.meter.rate(),
                self.meter.eta(self.size),
            )
        )


class _Reader:
    """Reads and checksums chunks in a thread, one chunk ahead of the one on the wire.

    Memory: two preallocated chunk buffers, reused for the whole file (the chunk on the wire and
    the one read ahead), whatever the file size. A buffer is refilled only once the request that
    sent it has been answered: ``get`` is called between requests, never during one.
    """

    def __init__(self, fd: int, size: int, chunk_size: int, algorithm: str | None) -> None:
        self.fd = fd
        self.size = size
        self.chunk_size = min(chunk_size, max(size, 1))
        self.algorithm = algorithm
        self._buffers = (bytearray(self.chunk_size), bytearray(self.chunk_size))
        self._current = 0  # index of the buffer holding the chunk being sent
        self._ahead: tuple[int, int, asyncio.Future[_Chunk]] | None = None

    def _read(self, offset: int, index: int) -> _Chunk:
        import hashlib

        n = min(self.chunk_size, self.size - offset)
        view = memoryview(self._buffers[index])[: max(n, 0)]
        got = os.preadv(self.fd, [view], offset) if n > 0 else 0
        if got != n:
            raise FileChanged(
                f"short read at offset {offset}: the file shrank while it was being staged"
            )
        checksum = None
        if self.algorithm is not None:
            digest = hashlib.new(self.algorithm, view).digest()
            checksum = tus.encode_checksum(self.algorithm, digest)
        return _Chunk(offset, view, checksum)

    async def get(self, offset: int) -> _Chunk:
        ahead, self._ahead = self._ahead, None
        loop = asyncio.get_running_loop()
        if ahead is not None:
            ahead_offset, index, future = ahead
            if ahead_offset == offset:
                self._current = index
                return await future
            with contextlib.suppress(Exception):
                await future  # never refill a buffer a thread is still writing
        return await loop.run_in_executor(None, self._read, offset, self._current)

    def prefetch(self, offset: int) -> None:
        if offset < self.size and self._ahead is None:
            index = 1 - self._current
            future = asyncio.get_running_loop().run_in_executor(None, self._read, offset, index)
            self._ahead = (offset, index, future)

    async def aclose(self) -> None:
        """Wait for a read-ahead still in its thread (before the caller closes the fd)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(BaseException):
                await ahead[2]


__all__ = ["BudgetExpired", "StageOptions", "Stager", "StallTimeout", "WorkerUnreachable"]
