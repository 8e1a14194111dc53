"""The worker's tus endpoints over real HTTP: the happy path and a table of bad requests."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from pathlib import Path

import httpx
import pytest

from staging_cli import tus
from staging_cli.worker.store import Store

from ..support import RunningWorker, run_worker_in_thread

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {"Content-Type": "application/offset+octet-stream"}


def meta(data: bytes, **extra: str) -> str:
    return tus.encode_metadata(
        {"filename": "f.bin", "sha256": hashlib.sha256(data).hexdigest(), **extra}
    )


def create(client: httpx.Client, data: bytes, **headers: str) -> str:
    r = client.post(
        "/uploads",
        headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta(data), **headers},
    )
    assert r.status_code == 201, r.text
    return r.headers["location"]


def patch(
    client: httpx.Client, url: str, offset: int, body: bytes, **headers: str
) -> httpx.Response:
    return client.patch(
        url, content=body, headers={**TUS, **OCTET, "Upload-Offset": str(offset), **headers}
    )


def checksum(algo: str, body: bytes) -> str:
    return f"{algo} {base64.b64encode(hashlib.new(algo, body).digest()).decode()}"


def no_blobs(worker: RunningWorker) -> bool:
    return not worker.store.blobs() and not list((worker.dir / "blobs" / "sha256").iterdir())


def test_options_advertise_protocol(worker: RunningWorker) -> None:
    r = httpx.options(worker.url + "/uploads")
    assert r.status_code == 204
    assert r.headers["Tus-Version"] == "1.0.0"
    assert set(r.headers["Tus-Extension"].split(",")) >= {
        "creation",
        "expiration",
        "checksum",
        "termination",
    }
    assert {"sha1", "sha256"} <= set(r.headers["Tus-Checksum-Algorithm"].split(","))


def test_upload_in_chunks_becomes_a_blob(worker: RunningWorker) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=worker.url) as c:
        assert c.head(f"/blobs/sha256:{digest}").status_code == 404
        url = create(c, data)
        assert "Upload-Expires" in c.head(url, headers=TUS).headers
        r = patch(
            c, url, 0, data[:400_000], **{"Upload-Checksum": checksum("sha1", data[:400_000])}
        )
        assert r.status_code == 204 and r.headers["Upload-Offset"] == "400000"
        h = c.head(url, headers=TUS)
        assert h.headers["Upload-Offset"] == "400000" and h.headers["Upload-Length"] == str(
            len(data)
        )
        assert h.headers["Cache-Control"] == "no-store"
        found = c.get("/uploads", params={"sha256": digest, "length": len(data)}).json()["uploads"]
        assert [u["offset"] for u in found] == [400_000] and found[0]["url"] == url
        # the partial file is not visible as a blob
        assert c.head(f"/blobs/sha256:{digest}").status_code == 404
        r = patch(
            c,
            url,
            400_000,
            data[400_000:],
            **{"Upload-Checksum": checksum("sha256", data[400_000:])},
        )
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data))
        blob = c.head(f"/blobs/sha256:{digest}")
        assert blob.status_code == 200 and blob.headers["Content-Length"] == str(len(data))
        assert c.get(f"/blobs/sha256:{digest}").content == data
        assert c.head(url, headers=TUS).status_code == 404  # finished uploads are gone
        status = c.get("/status").json()
        assert status["uploads"] == [] and status["blobs"] == [
            {"digest": f"sha256:{digest}", "size": len(data)}
        ]
    assert (
        hashlib.sha256((worker.dir / "blobs" / "sha256" / digest).read_bytes()).hexdigest()
        == digest
    )


def test_creation_with_upload_and_empty_file(worker: RunningWorker) -> None:
    data = b"small model"
    with httpx.Client(base_url=worker.url) as c:
        r = c.post(
            "/uploads",
            content=data,
            headers={
                **TUS,
                **OCTET,
                "Upload-Length": str(len(data)),
                "Upload-Metadata": meta(data),
            },
        )
        assert r.status_code == 201 and r.headers["Upload-Offset"] == str(len(data))
        assert c.head(f"/blobs/sha256:{hashlib.sha256(data).hexdigest()}").status_code == 200
        r = c.post("/uploads", headers={**TUS, "Upload-Length": "0", "Upload-Metadata": meta(b"")})
        assert r.status_code == 201
        assert c.head(f"/blobs/sha256:{hashlib.sha256(b'').hexdigest()}").status_code == 200


def test_termination(worker: RunningWorker) -> None:
    data = b"x" * 1000
    with httpx.Client(base_url=worker.url) as c:
        url = create(c, data)
        patch(c, url, 0, data[:10])
        assert c.delete(url, headers=TUS).status_code == 204
        assert c.head(url, headers=TUS).status_code == 404
    assert list((worker.dir / "uploads").iterdir()) == []


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("wrong offset", 409),
        ("missing tus-resumable", 412),
        ("wrong tus-resumable", 412),
        ("wrong content type", 415),
        ("bad checksum", 460),
        ("unknown checksum algorithm", 400),
        ("unknown upload", 404),
        ("traversal in upload id", 404),
        ("body past length", 413),
        ("whole-file digest mismatch", 422),
    ],
)
def test_bad_patch_requests(worker: RunningWorker, case: str, status: int) -> None:
    data = b"0123456789" * 100
    with httpx.Client(base_url=worker.url) as c:
        url = create(c, data)
        headers: dict[str, str] = {}
        offset, body, target = 0, data, url
        if case == "wrong offset":
            offset = 5
        elif case == "missing tus-resumable":
            r = c.patch(url, content=body, headers={**OCTET, "Upload-Offset": "0"})
        elif case == "wrong tus-resumable":
            r = c.patch(
                url, content=body, headers={**OCTET, "Tus-Resumable": "0.2.2", "Upload-Offset": "0"}
            )
        elif case == "wrong content type":
            r = c.patch(
                url,
                content=body,
                headers={**TUS, "Content-Type": "application/octet-stream", "Upload-Offset": "0"},
            )
        elif case == "bad checksum":
            headers["Upload-Checksum"] = checksum("sha256", b"something else")
        elif case == "unknown checksum algorithm":
            headers["Upload-Checksum"] = "crc99 AAAA"
        elif case == "unknown upload":
            target = worker.url + "/uploads/" + "0" * 32
        elif case == "traversal in upload id":
            target = worker.url + "/uploads/..%2F..%2Fblobs"
        elif case == "body past length":
            body = data + b"extra"
        elif case == "whole-file digest mismatch":
            body = data[:-1] + b"!"
        if case not in ("missing tus-resumable", "wrong tus-resumable", "wrong content type"):
            r = patch(c, target, offset, body, **headers)
        assert r.status_code == status, r.text
        assert r.text.strip() or status == 404  # a sentence says why
        # nothing half-written became a blob, and a refused chunk left the offset alone
        assert no_blobs(worker)
        h = c.head(url, headers=TUS)
        if case == "whole-file digest mismatch":
            assert h.status_code == 404  # the bad upload was discarded
        else:
            assert h.headers["Upload-Offset"] == "0"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upload-Length": "abc"}, 400),
        ({}, 400),
        (
            {
                "Upload-Length": "10",
                "Upload-Metadata": "model " + base64.b64encode(b"../etc").decode(),
            },
            400,
        ),
        (
            {
                "Upload-Length": "10",
                "Upload-Metadata": "model " + base64.b64encode(b"/abs").decode(),
            },
            400,
        ),
        (
            {
                "Upload-Length": "10",
                "Upload-Metadata": "model " + base64.b64encode(b"a\x00b").decode(),
            },
            400,
        ),
        (
            {
                "Upload-Length": "10",
                "Upload-Metadata": "filename " + base64.b64encode(b"../x").decode(),
            },
            400,
        ),
        (
            {
                "Upload-Length": "10",
                "Upload-Metadata": "sha256 " + base64.b64encode(b"nothex").decode(),
            },
            400,
        ),
        ({"Upload-Length": "10", "Upload-Metadata": "model !!notbase64"}, 400),
        ({"Upload-Length": "10", "Upload-Defer-Length": "1"}, 400),
    ],
)
def test_bad_creation_requests(worker: RunningWorker, headers: dict[str, str], status: int) -> None:
    r = httpx.post(worker.url + "/uploads", headers={**TUS, **headers})
    assert r.status_code == status, r.text
    assert worker.store.uploads() == []


def test_good_model_names_are_accepted(worker: RunningWorker) -> None:
    for name in ("org/model", "name:tag", "llama-3-8b.Q4_K_M", "org/model:Q4_K_M"):
        r = httpx.post(
            worker.url + "/uploads",
            headers={
                **TUS,
                "Upload-Length": "1",
                "Upload-Metadata": tus.encode_metadata({"model": name}),
            },
        )
        assert r.status_code == 201, (name, r.text)


def test_auth(tmp_path: Path) -> None:
    with run_worker_in_thread(tmp_path / "w", token="s3cret") as w:
        assert httpx.get(w.url + "/healthz").status_code == 200
        missing = httpx.post(w.url + "/uploads", headers={**TUS, "Upload-Length": "1"})
        assert missing.status_code == 401 and "token" in missing.text
        wrong = httpx.post(
            w.url + "/uploads",
            headers={**TUS, "Upload-Length": "1", "Authorization": "Bearer nope"},
        )
        assert wrong.status_code == 403
        assert (
            httpx.get(w.url + "/status", headers={"Authorization": "Bearer nope"}).status_code
            == 403
        )
        assert httpx.head(w.url + "/blobs/sha256:" + "0" * 64).status_code == 401
        ok = httpx.post(
            w.url + "/uploads",
            headers={**TUS, "Upload-Length": "1", "Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 201
        assert len(w.store.uploads()) == 1


def test_max_size_and_free_space_are_checked_before_any_byte(tmp_path: Path) -> None:
    free = 100_000
    with run_worker_in_thread(tmp_path / "w", max_size=1_000_000, disk_free=lambda: free) as w:
        with httpx.Client(base_url=w.url, headers=TUS) as c:
            assert c.options("/uploads").headers["Tus-Max-Size"] == "1000000"
            assert c.post("/uploads", headers={"Upload-Length": "2000000"}).status_code == 413
            r = c.post("/uploads", headers={"Upload-Length": "500000"})
            assert r.status_code == 507 and "free" in r.text
            # two uploads that each fit, but not both: the second is refused
            assert c.post("/uploads", headers={"Upload-Length": "60000"}).status_code == 201
            assert c.post("/uploads", headers={"Upload-Length": "60000"}).status_code == 507
            assert c.get("/status").json()["disk"]["reserved"] == 60000
    assert len(list((tmp_path / "w" / "uploads").glob("*.json"))) == 1


def test_concurrent_patch_gets_423_and_idle_body_releases_the_upload(tmp_path: Path) -> None:
    data = b"z" * 200_000
    with (
        run_worker_in_thread(tmp_path / "w", idle_timeout=1.0) as w,
        httpx.Client(base_url=w.url) as c,
    ):
        url = create(c, data)
        path = httpx.URL(url).raw_path.decode()
        host, port = httpx.URL(w.url).host, httpx.URL(w.url).port
        # a client that sends half a chunk and then goes silent (like a SIGSTOPped process)
        stalled = socket.create_connection((host, port))
        head = (
            f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        stalled.sendall(head + data[:50_000])
        deadline = time.monotonic() + 5
        while not c.get("/status").json()["uploads"][0]["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = patch(c, url, 0, data)
        assert r.status_code == 423
        started = time.monotonic()
        while True:
            offset = int(c.head(url, headers=TUS).headers["Upload-Offset"])
            r = patch(c, url, offset, data[offset:])
            if r.status_code not in (423, 409):  # 409: the stalled body was dropped meanwhile
                break
            assert time.monotonic() - started < 10, "the stalled body kept the upload locked"
            time.sleep(0.2)
        # without a checksum the worker kept the 50 000 bytes that did arrive (tus: SHOULD)
        assert r.status_code == 204, r.text
        assert r.headers["Upload-Offset"] == str(len(data))
        stalled.close()
        assert c.head(f"/blobs/sha256:{hashlib.sha256(data).hexdigest()}").status_code == 200


def test_expired_uploads_are_removed(tmp_path: Path) -> None:
    now = [1000.0]
    store = Store(tmp_path / "w", expiry=60, clock=lambda: now[0])
    store.open()
    upload = store.create(10, {})
    assert store.get(upload.id) is upload
    now[0] += 61
    assert store.sweep_expired() == [upload.id]
    assert list((tmp_path / "w" / "uploads").iterdir()) == []
    store.close()


def test_second_worker_on_same_dir_is_refused(tmp_path: Path) -> None:
    from staging_cli.worker.store import StoreError

    first = Store(tmp_path / "w")
    first.open()
    with pytest.raises(StoreError, match="another worker"):
        Store(tmp_path / "w").open()
    first.close()
