"""The stager against a real worker on loopback, through faults, and against scripted odd answers."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest
import respx

from staging_cli.config import Paths
from staging_cli.errors import (
    AuthenticationError,
    ChecksumRetriesExhausted,
    DigestMismatch,
    FileChanged,
    InsufficientStorage,
    StallTimeout,
    UploadRefused,
    UploadTooLarge,
)
from staging_cli.stager import Event, StageOptions, Stager, open_stager
from staging_cli.stager.events import FileStarted, Retrying, UploadProgress

from ..faultproxy import FaultProxy, Faults
from ..support import RunningWorker, make_file, run_worker_in_thread

MiB = 1024 * 1024


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


async def stage(
    worker_url: str, path: Path, paths: Paths, **opts: object
) -> tuple[object, list[Event]]:
    events: list[Event] = []
    options = StageOptions(**{"backoff_initial": 0.05, "backoff_max": 0.5, **opts})  # type: ignore[arg-type]
    stager = open_stager(worker_url, options=options, on_event=events.append, paths=paths)
    try:
        result = await stager.stage_file(path, model="org/model:q4")
    finally:
        await stager.aclose()
    return result, events


@pytest.mark.anyio
async def test_stage_end_to_end_then_nothing_to_send(
    worker: RunningWorker, tmp_path: Path, paths: Paths
) -> None:
    source = make_file(tmp_path / "model.gguf", 300 * MiB)
    result, events = await stage(worker.url, source, paths)
    digest = sha256_of(source)
    assert result.sha256 == digest and not result.skipped
    assert result.bytes_sent == source.stat().st_size and result.resumed_from == 0
    assert sha256_of(worker.dir / "blobs" / "sha256" / digest) == digest
    progress = [e for e in events if isinstance(e, UploadProgress)]
    # progress is what the worker acknowledged: chunk by chunk, ending at the size
    assert progress[-1].bytes_done == result.size
    assert all(p.bytes_done % (32 * MiB) == 0 for p in progress[:-1])
    received = worker.store.received_bytes
    again, _ = await stage(worker.url, source, paths)
    assert again.skipped and again.bytes_sent == 0
    assert worker.store.received_bytes == received


@pytest.mark.anyio
async def test_digest_is_cached_and_given_digest_skips_hashing(
    worker: RunningWorker, tmp_path: Path, paths: Paths
) -> None:
    source = make_file(tmp_path / "m.bin", 3 * MiB)
    _, events = await stage(worker.url, source, paths)
    assert any(e.event == "hashing" for e in events)
    source2 = make_file(tmp_path / "m2.bin", 3 * MiB, seed=2)
    stager = open_stager(worker.url, paths=paths)
    try:
        # cached: no hashing event the second time, even for a new Stager
        seen: list[Event] = []
        stager.emit = seen.append
        await stager.stage_file(source, model="m")
        assert not any(e.event == "hashing" for e in seen)
        # a wrong --sha256 is caught by the worker: clear error, nothing stored under it
        with pytest.raises(DigestMismatch, match="not the announced"):
            await stager.stage_file(source2, model="m", sha256="a" * 64)
        assert worker.store.blob_path("a" * 64) is None
    finally:
        await stager.aclose()


@pytest.mark.anyio
async def test_connections_cut_at_random_offsets(
    worker: RunningWorker, tmp_path: Path, paths: Paths
) -> None:
    source = make_file(tmp_path / "model.bin", 64 * MiB)
    faults = Faults(cuts=12, cut_min=64 * 1024, cut_max=6 * MiB, seed=7)
    with FaultProxy(worker.url, faults).running() as proxy:
        result, events = await stage(proxy.url, source, paths, chunk_size=4 * MiB)
    assert faults.done_cuts == 12
    assert sum(isinstance(e, Retrying) for e in events) >= 12
    assert sha256_of(worker.dir / "blobs" / "sha256" / result.sha256) == sha256_of(source)
    # each cut costs at most the chunk in flight
    assert result.bytes_sent <= source.stat().st_size + 12 * 4 * MiB


@pytest.mark.anyio
async def test_chunk_corrupted_in_flight_is_sent_again(
    worker: RunningWorker, tmp_path: Path, paths: Paths
) -> None:
    source = make_file(tmp_path / "model.bin", 16 * MiB)
    faults = Faults(corrupt_at=3 * MiB)
    with FaultProxy(worker.url, faults).running() as proxy:
        result, events = await stage(proxy.url, source, paths, chunk_size=4 * MiB)
    assert faults.corrupted == 1
    assert any(isinstance(e, Retrying) and "460" in e.reason for e in events)
    assert sha256_of(worker.dir / "blobs" / "sha256" / result.sha256) == sha256_of(source)


@pytest.mark.anyio
async def test_resume_from_the_workers_offset_on_another_machine(
    worker: RunningWorker, tmp_path: Path, paths: Paths
) -> None:
    source = make_file(tmp_path / "model.bin", 40 * MiB)
    acknowledged = asyncio.Event()

    def stop_after_two_chunks(event: Event) -> None:
        if isinstance(event, UploadProgress) and event.bytes_done >= 8 * MiB:
            acknowledged.set()

    first = open_stager(
        worker.url,
        options=StageOptions(chunk_size=4 * MiB, limit_rate=40 * MiB),
        on_event=stop_after_two_chunks,
        paths=paths,
    )
    task = asyncio.create_task(first.stage_file(source, model="m"))
    await asyncio.wait_for(acknowledged.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await first.aclose()
    offset = worker.store.uploads()[0].record.offset
    assert offset >= 8 * MiB
    # a different machine: fresh cache and state dirs, so only the worker knows the upload
    other = Paths(*(tmp_path / "other" / n for n in ("config", "state", "cache", "data")))
    result, events = await stage(worker.url, source, other, chunk_size=4 * MiB)
    assert result.resumed_from == offset
    assert result.bytes_sent == source.stat().st_size - offset
    assert next(e for e in events if isinstance(e, FileStarted)).resumed_from == offset
    assert sha256_of(worker.dir / "blobs" / "sha256" / result.sha256) == sha256_of(source)


@pytest.mark.anyio
async def test_refusals_are_distinct_errors(tmp_path: Path, paths: Paths) -> None:
    source = make_file(tmp_path / "m.bin", 2 * MiB)
    with run_worker_in_thread(tmp_path / "a", token="t") as w:
        with pytest.raises(AuthenticationError, match="refused the token"):
            await stage(w.url, source, paths)
    with run_worker_in_thread(tmp_path / "b", max_size=MiB) as w:
        with pytest.raises(UploadTooLarge, match="at most 1048576"):
            await stage(w.url, source, paths)
    with run_worker_in_thread(tmp_path / "c", disk_free=lambda: MiB) as w:
        with pytest.raises(InsufficientStorage, match="needs 2097152"):
            await stage(w.url, source, paths)
        assert w.store.uploads() == []


# -- scripted odd answers from a third-party tus server (respx) --------------------------------

SERVER = "http://tus.example"


def _scripted(router: respx.Router, patch_answers: list[httpx.Response]) -> respx.Route:
    router.options(f"{SERVER}/uploads").respond(204, headers={"Tus-Version": "1.0.0"})
    router.head(url__regex=rf"{SERVER}/blobs/.*").respond(404)
    router.get(f"{SERVER}/uploads").respond(404)
    router.post(f"{SERVER}/uploads").respond(201, headers={"Location": "/uploads/abc"})
    router.head(f"{SERVER}/uploads/abc").respond(
        200, headers={"Upload-Offset": "0", "Upload-Length": "1000"}
    )
    return router.patch(f"{SERVER}/uploads/abc").mock(side_effect=patch_answers)


async def _stage_scripted(
    tmp_path: Path, paths: Paths, **opts: object
) -> tuple[object, list[Event]]:
    source = tmp_path / "small.bin"
    source.write_bytes(b"a" * 1000)
    events: list[Event] = []
    options = StageOptions(**{"backoff_initial": 0.01, "backoff_max": 0.02, **opts})  # type: ignore[arg-type]
    stager = Stager(SERVER, options=options, on_event=events.append)
    try:
        return await stager.stage_file(source, model="m"), events
    finally:
        await stager.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("transient", [423, 500, 503, 409, 408])
async def test_transient_answers_are_retried(tmp_path: Path, paths: Paths, transient: int) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = _scripted(
            router,
            [
                httpx.Response(transient),
                httpx.Response(204, headers={"Upload-Offset": "1000"}),
            ],
        )
        result, events = await _stage_scripted(tmp_path, paths)
    assert route.call_count == 2
    assert result.size == 1000  # type: ignore[attr-defined]
    assert any(isinstance(e, Retrying) and str(transient) in e.reason for e in events)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, UploadRefused),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (413, UploadTooLarge),
        (507, InsufficientStorage),
        (422, DigestMismatch),
    ],
)
async def test_refusals_are_not_retried(
    tmp_path: Path, paths: Paths, status: int, error: type[Exception]
) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = _scripted(
            router,
            [
                httpx.Response(status, text="no"),
                httpx.Response(204, headers={"Upload-Offset": "1000"}),
            ],
        )
        with pytest.raises(error):
            await _stage_scripted(tmp_path, paths)
    assert route.call_count == 1


@pytest.mark.anyio
async def test_checksum_failures_are_bounded(tmp_path: Path, paths: Paths) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = _scripted(router, [httpx.Response(460)] * 10)
        with pytest.raises(ChecksumRetriesExhausted):
            await _stage_scripted(tmp_path, paths, max_chunk_retries=3)
    assert route.call_count == 4


@pytest.mark.anyio
async def test_stall_window_ends_a_run_without_progress(tmp_path: Path, paths: Paths) -> None:
    with respx.mock(assert_all_called=False) as router:
        _scripted(router, [httpx.Response(503)] * 1000)
        with pytest.raises(StallTimeout, match="stall window"):
            await _stage_scripted(tmp_path, paths, stall_window=0.5)


@pytest.mark.anyio
async def test_a_file_that_changes_while_staged_fails_clearly(
    worker: RunningWorker, tmp_path: Path, paths: Paths
) -> None:
    source = make_file(tmp_path / "growing.bin", 12 * MiB)
    touched = False

    def append_after_first_chunk(event: Event) -> None:
        nonlocal touched
        if isinstance(event, UploadProgress) and not touched:
            touched = True
            with source.open("ab") as fh:
                fh.write(b"more")

    stager = open_stager(
        worker.url,
        options=StageOptions(chunk_size=4 * MiB),
        on_event=append_after_first_chunk,
        paths=paths,
    )
    try:
        with pytest.raises(FileChanged, match="changed while it was being staged"):
            await stager.stage_file(source, model="m")
    finally:
        await stager.aclose()
