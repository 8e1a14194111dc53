"""tuspy (PyPI ``tuspy``, import ``tusclient``), a tus client nobody here wrote, against OUR worker.

Proves the worker speaks plain tus 1.0 to a stock client: creation with metadata, chunked PATCHes
with the checksum extension (tuspy sends ``Upload-Checksum: sha1 ...``), resume from the worker's
``Upload-Offset`` by a fresh client (also with a different chunk size, and across a worker
restart), uploads without a declared sha256, and the empty file (creation only, no PATCH).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from ..support import RunningWorker, make_file, run_worker_in_thread
from .conftest import missing_peer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

MiB = 1024 * 1024
CHUNK = 8 * MiB
SIZE = 40 * MiB + 12_345  # five full chunks and a short last one


@pytest.fixture(scope="module")
def tusclient() -> ModuleType:
    try:
        return importlib.import_module("tusclient.client")
    except ImportError:
        missing_peer("tuspy is not installed: pip install -e '.[test]' (or pip install tuspy)")


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[RunningWorker]:
    with run_worker_in_thread(tmp_path / "worker") as w:
        yield w


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def assert_blob(worker: RunningWorker, digest: str, size: int) -> None:
    """The worker serves the blob, its bytes hash to its name, and nothing is left in progress."""
    r = httpx.head(f"{worker.url}/blobs/sha256:{digest}")
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == size
    blob = worker.dir / "blobs" / "sha256" / digest
    assert blob.is_file()
    assert blob.stat().st_size == size
    assert sha256_of(blob) == digest
    assert worker.store.uploads() == []
    assert sorted(p.name for p in (worker.dir / "uploads").iterdir()) == []
    status = httpx.get(f"{worker.url}/status").json()
    assert {"digest": f"sha256:{digest}", "size": size} in status["blobs"]


def test_tuspy_uploads_in_checksummed_chunks(
    tusclient: ModuleType, worker: RunningWorker, tmp_path: Path
) -> None:
    src = make_file(tmp_path / "model.gguf", SIZE, seed=1)
    digest = sha256_of(src)
    client = tusclient.TusClient(worker.url + "/uploads")
    uploader = client.uploader(
        file_path=str(src),
        chunk_size=CHUNK,
        metadata={"filename": src.name, "sha256": digest, "model": "org/tiny-llm:q4"},
        upload_checksum=True,
    )
    uploader.upload()

    assert uploader.offset == SIZE
    # tuspy really sent the checksum extension's header, and the worker accepted it
    assert uploader.request._request_headers["upload-checksum"].startswith("sha1 ")
    assert uploader.request.status_code == 204
    assert worker.store.received_bytes == SIZE
    assert_blob(worker, digest, SIZE)
    # the blob is complete, so the upload URL is gone (tus: 404 for an unknown upload)
    assert httpx.head(uploader.url, headers={"Tus-Resumable": "1.0.0"}).status_code == 404


def test_tuspy_interrupted_upload_resumes_with_a_new_uploader(
    tusclient: ModuleType, worker: RunningWorker, tmp_path: Path
) -> None:
    src = make_file(tmp_path / "model.gguf", SIZE, seed=2)
    digest = sha256_of(src)
    meta = {"filename": src.name, "sha256": digest, "model": "resume-me"}
    first = tusclient.TusClient(worker.url + "/uploads").uploader(
        file_path=str(src), chunk_size=CHUNK, metadata=meta, upload_checksum=True
    )
    first.upload_chunk()
    first.upload_chunk()
    assert first.offset == 2 * CHUNK
    url = first.url
    del first  # the "crashed" client: only its upload URL survives

    # the worker reports the upload in progress (HEAD and the toolkit's lookup)
    head = httpx.head(url, headers={"Tus-Resumable": "1.0.0"})
    assert head.status_code == 200
    assert int(head.headers["upload-offset"]) == 2 * CHUNK
    assert int(head.headers["upload-length"]) == SIZE
    found = httpx.get(f"{worker.url}/uploads", params={"sha256": digest}).json()["uploads"]
    assert [(u["url"], u["offset"]) for u in found] == [(url, 2 * CHUNK)]

    # a NEW uploader, with a chunk size that does not divide the first one's, resumes
    second = tusclient.TusClient(worker.url + "/uploads").uploader(
        file_path=str(src), url=url, chunk_size=3 * MiB, metadata=meta, upload_checksum=True
    )
    assert second.offset == 2 * CHUNK  # asked the worker (HEAD)
    second.upload()
    assert second.offset == SIZE
    assert worker.store.received_bytes == SIZE  # no byte was sent twice
    assert_blob(worker, digest, SIZE)


def test_tuspy_resumes_after_the_worker_restarts(tusclient: ModuleType, tmp_path: Path) -> None:
    src = make_file(tmp_path / "model.gguf", SIZE, seed=3)
    digest = sha256_of(src)
    meta = {"filename": src.name, "sha256": digest}
    store_dir = tmp_path / "worker"
    with run_worker_in_thread(store_dir) as before:
        first = tusclient.TusClient(before.url + "/uploads").uploader(
            file_path=str(src), chunk_size=CHUNK, metadata=meta, upload_checksum=True
        )
        first.upload_chunk()
        upload_path = httpx.URL(first.url).path
    with run_worker_in_thread(store_dir) as after:  # same directory, new process state and port
        second = tusclient.TusClient(after.url + "/uploads").uploader(
            file_path=str(src), url=after.url + upload_path, chunk_size=CHUNK, upload_checksum=True
        )
        assert second.offset == CHUNK
        second.upload()
        assert_blob(after, digest, SIZE)


@pytest.mark.parametrize(
    "metadata",
    [{"filename": "weights.safetensors", "model": "no-digest"}, {}],
    ids=["filename-and-model", "no-metadata-at-all"],
)
def test_tuspy_without_sha256_gets_a_blob_named_by_the_computed_digest(
    tusclient: ModuleType, worker: RunningWorker, tmp_path: Path, metadata: dict[str, str]
) -> None:
    # With no metadata tuspy still sends the header, empty: `upload-metadata: `.
    src = make_file(tmp_path / "weights.safetensors", 20 * MiB + 1, seed=4)
    digest = sha256_of(src)
    uploader = tusclient.TusClient(worker.url + "/uploads").uploader(
        file_path=str(src), chunk_size=CHUNK, metadata=metadata, upload_checksum=True
    )
    uploader.upload()
    assert_blob(worker, digest, src.stat().st_size)


def test_tuspy_empty_file_is_complete_at_creation(
    tusclient: ModuleType, worker: RunningWorker, tmp_path: Path
) -> None:
    src = tmp_path / "empty.bin"
    src.write_bytes(b"")
    digest = hashlib.sha256(b"").hexdigest()
    uploader = tusclient.TusClient(worker.url + "/uploads").uploader(
        file_path=str(src), chunk_size=CHUNK, metadata={"filename": src.name, "sha256": digest}
    )
    uploader.upload()  # POST only: tuspy sends no PATCH for an empty file
    assert uploader.offset == 0
    assert_blob(worker, digest, 0)


def test_tuspy_wrong_declared_sha256_leaves_no_blob(
    tusclient: ModuleType, worker: RunningWorker, tmp_path: Path
) -> None:
    """The whole-file digest check holds for a foreign client too: tuspy's last PATCH fails."""
    from tusclient.exceptions import TusUploadFailed

    src = make_file(tmp_path / "model.gguf", 10 * MiB, seed=5)
    wrong = hashlib.sha256(b"something else").hexdigest()
    uploader = tusclient.TusClient(worker.url + "/uploads").uploader(
        file_path=str(src), chunk_size=4 * MiB, metadata={"sha256": wrong}, upload_checksum=True
    )
    with pytest.raises(TusUploadFailed) as failed:
        uploader.upload()
    assert failed.value.status_code == 422
    assert worker.store.blobs() == {}
    assert httpx.head(f"{worker.url}/blobs/sha256:{wrong}").status_code == 404
    assert httpx.head(f"{worker.url}/blobs/sha256:{sha256_of(src)}").status_code == 404
