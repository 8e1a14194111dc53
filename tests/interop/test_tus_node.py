"""OUR stager against a stock tus server nobody here wrote: @tus/server + @tus/file-store (npm).

@tus/server has none of the toolkit's conventions (blob HEAD, upload lookup by sha256, whole-file
digest check) and no checksum extension; the stager must degrade to plain tus 1.0 and still move
every byte correctly, and resume from its local record since the server cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from staging_cli.stager import (
    Event,
    FileResult,
    FileStarted,
    Notice,
    ResumeRecords,
    StageOptions,
    Stager,
    UploadProgress,
)

from ..support import make_file
from .conftest import NodeTusServer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

MiB = 1024 * 1024
CHUNK = 8 * MiB
SIZE = 40 * MiB + 4_321  # five full chunks and a short last one


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


@dataclass
class Sent:
    method: str
    url: str
    headers: httpx.Headers


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The stager's real transport, noting every request it makes (to check what went out)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Sent] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(Sent(request.method, str(request.url), request.headers))
        return await super().handle_async_request(request)


@dataclass
class Run:
    events: list[Event] = field(default_factory=list)
    transport: RecordingTransport = field(default_factory=RecordingTransport)

    def stager(self, server: NodeTusServer, options: StageOptions, **kwargs: object) -> Stager:
        return Stager(
            server.url,
            options=options,
            on_event=self.events.append,
            transport=self.transport,
            **kwargs,  # type: ignore[arg-type]
        )


def stored(server: NodeTusServer, upload_url: str) -> tuple[Path, dict[str, object]]:
    """The bytes @tus/file-store keeps for an upload, and its .json info file."""
    upload_id = httpx.URL(upload_url).path.rsplit("/", 1)[-1]
    data = server.directory / upload_id
    info = json.loads((server.directory / f"{upload_id}.json").read_text())
    return data, info


async def stage(
    server: NodeTusServer,
    path: Path,
    run: Run,
    options: StageOptions,
    *,
    model: str | None = None,
    records: ResumeRecords | None = None,
) -> FileResult:
    async with run.stager(server, options, records=records) as stager:
        return await stager.stage_file(path, model=model)


def test_stager_uploads_to_tus_node_server(tus_node: NodeTusServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "modèle ☃ Q4_K_M.gguf", SIZE, seed=11)
    digest = sha256_of(src)
    run = Run()
    result = asyncio.run(
        stage(tus_node, src, run, StageOptions(chunk_size=CHUNK), model="org/tiny-llm:q4")
    )
    log = tus_node.log()  # what the stager asked, before this test asks anything

    assert not result.skipped
    assert result.resumed_from == 0
    assert result.bytes_sent == SIZE  # every byte once: no retry, no resend
    assert result.upload_url is not None
    assert result.upload_url.startswith(tus_node.url + "/uploads/")
    data, info = stored(tus_node, result.upload_url)
    assert data.stat().st_size == SIZE
    assert sha256_of(data) == digest
    assert info["size"] == SIZE
    assert info["offset"] in (0, SIZE)  # @tus/file-store keeps the offset in the file's size
    assert info["metadata"] == {"filename": src.name, "sha256": digest, "model": "org/tiny-llm:q4"}
    # the server agrees the upload is complete
    head = httpx.head(result.upload_url, headers={"Tus-Resumable": "1.0.0"})
    assert head.status_code == 200
    assert head.headers["upload-offset"] == head.headers["upload-length"] == str(SIZE)

    # The toolkit conventions degraded gracefully, in this order, then plain tus.
    assert log[0] == "OPTIONS /uploads -> 204"
    assert log[1] == f"HEAD /blobs/sha256:{digest} -> 412"  # not a tus route, no Tus-Resumable
    assert log[2].startswith(f"GET /uploads?sha256={digest}&length={SIZE} -> 404")
    assert log[3] == "POST /uploads -> 201"
    patches = log[4:]
    assert len(patches) == -(-SIZE // CHUNK)
    assert all(line.startswith("PATCH /uploads/") and line.endswith("-> 204") for line in patches)

    # @tus/file-store does not announce the checksum extension: the stager said so, and sent none
    assert any(isinstance(e, Notice) and "checksum" in e.message for e in run.events), run.events
    patch_headers = [s.headers for s in run.transport.sent if s.method == "PATCH"]
    assert patch_headers
    assert all("upload-checksum" not in h for h in patch_headers)
    assert all(h["content-length"] and "transfer-encoding" not in h for h in patch_headers)
    offsets = [e.bytes_done for e in run.events if isinstance(e, UploadProgress)]
    assert offsets == sorted(offsets)
    assert offsets[-1] == SIZE


def test_stager_stages_an_empty_file_to_tus_node(tus_node: NodeTusServer, tmp_path: Path) -> None:
    src = tmp_path / "empty.bin"
    src.write_bytes(b"")
    run = Run()
    result = asyncio.run(stage(tus_node, src, run, StageOptions(chunk_size=CHUNK), model="m"))
    assert result.bytes_sent == 0
    assert result.upload_url is not None
    data, info = stored(tus_node, result.upload_url)
    assert data.stat().st_size == 0
    assert info["size"] == 0
    assert not [line for line in tus_node.log() if line.startswith("PATCH")]


def test_restaging_to_tus_node_uploads_again(tus_node: NodeTusServer, tmp_path: Path) -> None:
    """A plain tus server cannot say it already has the content: a second stage sends it all
    again into a new upload (correctly), rather than failing on the missing conventions."""
    src = make_file(tmp_path / "model.gguf", 12 * MiB, seed=12)
    digest = sha256_of(src)
    records = ResumeRecords(tmp_path / "records.sqlite3")
    options = StageOptions(chunk_size=CHUNK)
    first = asyncio.run(stage(tus_node, src, Run(), options, records=records))
    second = asyncio.run(stage(tus_node, src, Run(), options, records=records))
    assert first.upload_url != second.upload_url
    assert not second.skipped
    assert second.resumed_from == 0
    for result in (first, second):
        assert result.upload_url is not None
        data, _ = stored(tus_node, result.upload_url)
        assert sha256_of(data) == digest


async def _stage_until(
    server: NodeTusServer,
    src: Path,
    run: Run,
    options: StageOptions,
    records: ResumeRecords,
    stop: Callable[[list[Event]], bool],
    *,
    linger: float | None = None,
) -> int:
    """Stage until ``stop(events)`` holds after an event, then cancel the stage: at once, from
    the event callback (before another byte goes out), or ``linger`` seconds later (mid-chunk).
    Returns the last offset the server acknowledged."""
    stager = run.stager(server, options, records=records)
    reached = asyncio.Event()
    task: asyncio.Task[FileResult] | None = None

    def sink(event: Event) -> None:
        run.events.append(event)
        if not reached.is_set() and stop(run.events):
            reached.set()
            if linger is None:
                assert task is not None
                task.cancel()  # the stager's own task: cancelled at its next await

    stager.emit = sink
    task = asyncio.create_task(stager.stage_file(src, model="resume-me"))
    waiter = asyncio.create_task(reached.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        assert reached.is_set(), "the stage ended before it could be interrupted"
        if linger is not None:
            await asyncio.sleep(linger)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
    finally:
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stager.aclose()
    acked = [e.bytes_done for e in run.events if isinstance(e, UploadProgress)]
    return max(acked, default=0)


def first_ack(events: list[Event]) -> bool:
    return any(isinstance(e, UploadProgress) and e.bytes_done > 0 for e in events)


@pytest.mark.parametrize(
    ("linger", "rate"),
    [(None, None), (0.3, 12 * MiB)],
    ids=["cancel-at-chunk-boundary", "cancel-mid-chunk"],
)
def test_stager_resumes_on_tus_node_from_its_record(
    tus_node: NodeTusServer, tmp_path: Path, linger: float | None, rate: int | None
) -> None:
    src = make_file(tmp_path / "model.gguf", SIZE, seed=13)
    digest = sha256_of(src)
    records_path = tmp_path / "state" / "uploads.sqlite3"
    first_run = Run()

    acked = asyncio.run(
        _stage_until(
            tus_node,
            src,
            first_run,
            StageOptions(chunk_size=CHUNK, limit_rate=rate),
            ResumeRecords(records_path),
            first_ack,
            linger=linger,
        )
    )
    assert acked >= CHUNK
    started = [e for e in first_run.events if isinstance(e, FileStarted)]
    assert len(started) == 1
    upload_url = started[0].upload_url
    assert upload_url.startswith(tus_node.url + "/uploads/")
    head = httpx.head(upload_url, headers={"Tus-Resumable": "1.0.0"})
    assert head.status_code == 200, head.text
    server_offset = int(head.headers["upload-offset"])
    assert acked <= server_offset < SIZE
    if linger is None:
        assert server_offset == acked == CHUNK  # cancelled between chunks
    else:
        assert server_offset > acked  # @tus/file-store kept the cut chunk's bytes

    # A new stager, sharing only the records file (@tus/server has no lookup by content).
    second_run = Run()
    result = asyncio.run(
        stage(
            tus_node,
            src,
            second_run,
            StageOptions(chunk_size=CHUNK),
            model="resume-me",
            records=ResumeRecords(records_path),
        )
    )
    assert result.upload_url == upload_url
    assert result.resumed_from == server_offset
    assert result.resumed_from > 0
    assert result.bytes_sent == SIZE - server_offset
    posts = [line for line in tus_node.log() if line.startswith("POST")]
    assert posts == ["POST /uploads -> 201"]  # the second run created nothing
    data, info = stored(tus_node, upload_url)
    assert info["size"] == SIZE
    assert data.stat().st_size == SIZE
    assert sha256_of(data) == digest
    # finished: the record is gone, so a later stage would not try to resume it
    assert ResumeRecords(records_path).get(tus_node.url, digest, SIZE) is None


def test_stager_starts_over_when_tus_node_lost_the_recorded_upload(
    tus_node: NodeTusServer, tmp_path: Path
) -> None:
    """The record points at an upload the server terminated (DELETE, as an expiry would): the
    stager must notice (HEAD 404), forget the record and create a new upload."""
    src = make_file(tmp_path / "model.gguf", 20 * MiB, seed=14)
    digest = sha256_of(src)
    records_path = tmp_path / "state" / "uploads.sqlite3"
    first_run = Run()
    asyncio.run(
        _stage_until(
            tus_node,
            src,
            first_run,
            StageOptions(chunk_size=CHUNK),
            ResumeRecords(records_path),
            first_ack,
        )
    )
    lost = next(e for e in first_run.events if isinstance(e, FileStarted)).upload_url
    gone = httpx.delete(lost, headers={"Tus-Resumable": "1.0.0"})
    assert gone.status_code == 204, gone.text

    result = asyncio.run(
        stage(
            tus_node,
            src,
            Run(),
            StageOptions(chunk_size=CHUNK),
            records=ResumeRecords(records_path),
        )
    )
    assert result.upload_url is not None
    assert result.upload_url != lost
    assert result.resumed_from == 0
    assert result.bytes_sent == src.stat().st_size
    data, _ = stored(tus_node, result.upload_url)
    assert sha256_of(data) == digest


def test_stager_finishes_when_tus_node_completed_but_the_last_ack_was_lost(
    tus_node: NodeTusServer, tmp_path: Path
) -> None:
    """The client died between the server's last 204 and forgetting its record: the next run
    finds the upload complete (HEAD offset == length) and sends nothing."""
    src = make_file(tmp_path / "model.gguf", 10 * MiB, seed=15)
    digest = sha256_of(src)
    size = src.stat().st_size
    records_path = tmp_path / "state" / "uploads.sqlite3"
    done = asyncio.run(stage(tus_node, src, Run(), StageOptions(chunk_size=CHUNK)))
    assert done.upload_url is not None
    records = ResumeRecords(records_path)
    records.put(tus_node.url, digest, size, done.upload_url)  # as if never forgotten
    records.close()
    before = len(tus_node.log())

    again = asyncio.run(
        stage(
            tus_node,
            src,
            Run(),
            StageOptions(chunk_size=CHUNK),
            records=ResumeRecords(records_path),
        )
    )
    assert again.upload_url == done.upload_url
    assert again.resumed_from == size
    assert again.bytes_sent == 0
    assert not [line for line in tus_node.log()[before:] if line.startswith(("POST", "PATCH"))]
    assert ResumeRecords(records_path).get(tus_node.url, digest, size) is None


def test_stager_with_a_token_talks_to_tus_node(tus_node: NodeTusServer, tmp_path: Path) -> None:
    """A bearer token (meant for our worker) does not upset a tus server that ignores it."""
    src = make_file(tmp_path / "model.gguf", 3 * MiB + 7, seed=16)
    run = Run()

    async def go() -> FileResult:
        async with Stager(
            tus_node.url,
            token="s3cret",
            options=StageOptions(chunk_size=MiB),
            on_event=run.events.append,
            transport=run.transport,
        ) as stager:
            return await stager.stage_file(src)

    result = asyncio.run(go())
    assert all(s.headers["authorization"] == "Bearer s3cret" for s in run.transport.sent)
    assert result.upload_url is not None
    data, info = stored(tus_node, result.upload_url)
    assert sha256_of(data) == sha256_of(src)
    assert "model" not in info["metadata"]  # no model given: none sent


def test_two_stagers_racing_on_tus_node_both_finish_one_upload(
    tus_node: NodeTusServer, tmp_path: Path
) -> None:
    """Two stagers of the same file on one machine (shared records): the second joins the
    first's upload; @tus/server's locker cuts one's PATCH when the other's arrives, and 409s the
    loser of an offset race. Both must ride that out (retry, HEAD, continue) and succeed, with one
    upload holding the right bytes."""
    src = make_file(tmp_path / "model.gguf", SIZE, seed=17)
    digest = sha256_of(src)
    records_path = tmp_path / "state" / "uploads.sqlite3"
    options = StageOptions(chunk_size=4 * MiB, limit_rate=40 * MiB, backoff_initial=0.1)

    async def race() -> list[FileResult]:
        a_acked = asyncio.Event()

        async def one(signal: asyncio.Event | None) -> FileResult:
            def sink(event: Event) -> None:
                if signal is not None and isinstance(event, UploadProgress) and event.bytes_done:
                    signal.set()

            async with Stager(
                tus_node.url, options=options, records=ResumeRecords(records_path), on_event=sink
            ) as stager:
                return await stager.stage_file(src, model="race")

        a = asyncio.create_task(one(a_acked))
        await a_acked.wait()  # a's upload is recorded and has acknowledged bytes
        b = asyncio.create_task(one(None))
        return list(await asyncio.gather(a, b))

    a, b = asyncio.run(race())
    assert a.upload_url == b.upload_url
    assert b.resumed_from > 0
    assert [line for line in tus_node.log() if line.startswith("POST")] == ["POST /uploads -> 201"]
    assert a.upload_url is not None
    data, _ = stored(tus_node, a.upload_url)
    assert sha256_of(data) == digest


def test_stager_refuses_a_file_above_tus_node_max_size(tmp_path: Path) -> None:
    from staging_cli.errors import UploadTooLarge

    from .conftest import node_tus_server

    src = make_file(tmp_path / "big.gguf", 2 * MiB, seed=18)
    with node_tus_server(tmp_path / "store", tmp_path / "tus.log", max_size=MiB) as server:
        with pytest.raises(UploadTooLarge, match="Tus-Max-Size"):
            asyncio.run(stage(server, src, Run(), StageOptions(chunk_size=MiB)))
        assert server.log() == ["OPTIONS /uploads -> 204"]  # refused before creating anything
