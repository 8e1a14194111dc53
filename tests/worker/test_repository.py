"""The KServe v2 repository endpoints, gc and the /v1 proxy, on a real worker over loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from staging_cli.worker.app import WorkerOptions, create_app
from staging_cli.worker.demo_backend import demo_backend_cmd, demo_gguf_bytes
from staging_cli.worker.models import ModelManager
from staging_cli.worker.repository import repository_routes
from staging_cli.worker.store import Store
from tests.support import serve_app

PY = sys.executable


@dataclass
class Worker:
    url: str
    store: Store
    manager: ModelManager
    dir: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def worker(
    directory: Path, backend_cmd: str | None = None, **manager_kwargs: float
) -> Iterator[Worker]:
    """A worker with the repository routes, served on loopback; stops every backend after."""
    store = Store(directory)
    store.open()
    manager = ModelManager(store, backend_cmd, **manager_kwargs)
    manager.open()
    try:
        app = create_app(
            store,
            WorkerOptions(),
            extra_routes=repository_routes(manager),
            lifespan_hooks=[manager.aclose],
        )
        with serve_app(app) as url:
            yield Worker(url, store, manager, directory)
    finally:
        store.close()


def upload(url: str, data: bytes) -> str:
    """Put ``data`` into the worker's store with tus creation-with-upload; its sha256."""
    response = httpx.post(
        url + "/uploads",
        content=data,
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Length": str(len(data)),
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert response.status_code == 201, response.text
    assert response.headers["Upload-Offset"] == str(len(data))
    return hashlib.sha256(data).hexdigest()


def encode(name: str) -> str:
    # Dots too: a client must not turn a ".." name into a dot-segment of the URL path.
    return quote(name, safe="").replace(".", "%2E")


def load_path(name: str) -> str:
    return f"/v2/repository/models/{encode(name)}/load"


def unload_path(name: str) -> str:
    return f"/v2/repository/models/{encode(name)}/unload"


def load(c: httpx.Client, name: str, *files: str) -> httpx.Response:
    return c.post(load_path(name), json={"parameters": {"files": list(files)}})


def index(c: httpx.Client) -> list[dict[str, object]]:
    response = c.post("/v2/repository/index")
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list)
    return body


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# -- without a backend -------------------------------------------------------------------------


def test_load_without_backend_is_ready_recorded_and_proxy_says_501(tmp_path: Path) -> None:
    with worker(tmp_path / "w") as w, w.client() as c:
        digest = upload(w.url, b"weights" * 1000)
        response = load(c, "org/model:tag", digest)
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "READY"
        entries = index(c)
        assert [(e["name"], e["state"]) for e in entries] == [("org/model:tag", "READY")]
        assert entries[0]["files"] == [digest]
        recorded = json.loads((w.dir / "models.json").read_text())
        assert recorded["models"]["org/model:tag"]["files"] == [{"sha256": digest}]

        chat = c.post("/v1/chat/completions", json={"model": "org/model:tag", "messages": []})
        assert chat.status_code == 501
        assert "--backend-cmd or --demo-backend" in chat.json()["error"]["message"]
        # The literal (unencoded) form of the name reaches the same model.
        assert (
            c.post(
                "/v2/repository/models/org/model:tag/load", json={"parameters": {"files": [digest]}}
            ).status_code
            == 200
        )


def test_load_with_missing_blob_is_refused_and_not_recorded(tmp_path: Path) -> None:
    missing = "ab" * 32
    with worker(tmp_path / "w") as w, w.client() as c:
        present = upload(w.url, b"x" * 100)
        response = load(c, "m", present, missing)
        assert response.status_code == 404
        message = response.json()["error"]
        assert f"sha256:{missing}" in message and "stage it first" in message
        assert index(c) == []
        assert not (w.dir / "models.json").exists()


def test_bad_names_and_bodies_are_400(tmp_path: Path) -> None:
    with worker(tmp_path / "w") as w, w.client() as c:
        digest = upload(w.url, b"y" * 10)
        for name in ("..", "a/../b", "/etc/passwd", "a//b", " padded", "bad\x01name"):
            response = load(c, name, digest)
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"]
        assert c.post(load_path("m"), content=b"{not json").status_code == 400
        assert c.post(load_path("m"), json={"parameters": {"files": ["nothex"]}}).status_code == 400
        assert c.post(load_path("m"), json={"parameters": {}}).status_code == 400
        assert c.post(unload_path("nope")).status_code == 404
        assert index(c) == []


def test_recorded_models_survive_a_restart_as_unavailable(tmp_path: Path) -> None:
    with worker(tmp_path / "w") as w, w.client() as c:
        digest = upload(w.url, b"z" * 50)
        assert load(c, "keep/me", digest).status_code == 200
    with worker(tmp_path / "w") as w, w.client() as c:
        (entry,) = index(c)
        assert entry["name"] == "keep/me" and entry["state"] == "UNAVAILABLE"
        assert "restarted" in str(entry["reason"])
        assert load(c, "keep/me", digest).status_code == 200
        assert index(c)[0]["state"] == "READY"


def test_gc_dry_run_then_real_never_removes_referenced_blobs(tmp_path: Path) -> None:
    with worker(tmp_path / "w") as w, w.client() as c:
        used = upload(w.url, b"used" * 100)
        stray = upload(w.url, b"stray" * 100)
        assert load(c, "m", used).status_code == 200

        young = c.post("/v2/repository/gc", json={"dry_run": False}).json()
        assert young["removed"] == [] and young["kept_too_young"] == [stray]

        dry = c.post("/v2/repository/gc", json={"dry_run": True, "min_age": 0}).json()
        assert dry["dry_run"] is True
        assert dry["removed"] == [{"sha256": stray, "size": 500}]
        assert dry["bytes_freed"] == 500
        assert w.store.blob_path(stray) is not None

        real = c.post("/v2/repository/gc", json={"dry_run": False, "min_age": 0}).json()
        assert real["removed"] == [{"sha256": stray, "size": 500}]
        assert w.store.blob_path(stray) is None
        assert w.store.blob_path(used) is not None
        assert c.head(f"/blobs/sha256:{used}").status_code == 200

        # Unloading forgets the record; then the blob is collectable.
        assert c.post(unload_path("m")).status_code == 200
        again = c.post("/v2/repository/gc", json={"dry_run": False, "min_age": 0}).json()
        assert [r["sha256"] for r in again["removed"]] == [used]
        assert c.post("/v2/repository/gc", json={"dry_run": "yes"}).status_code == 400


# -- with the demo backend ---------------------------------------------------------------------


def test_demo_backend_load_chat_stream_unload(tmp_path: Path) -> None:
    with worker(tmp_path / "w", demo_backend_cmd(), timeout_base=30) as w, w.client() as c:
        digest = upload(w.url, demo_gguf_bytes("tiny-demo", padding=os.urandom(4096)))
        response = load(c, "demo/tiny:q4", digest)
        assert response.status_code == 200, response.text
        entry = response.json()
        assert entry["state"] == "READY"
        pid = entry["pid"]
        assert alive(pid)

        # Same files again: a no-op, the same process.
        again = load(c, "demo/tiny:q4", digest)
        assert again.status_code == 200 and again.json()["pid"] == pid

        chat = c.post(
            "/v1/chat/completions",
            json={"model": "demo/tiny:q4", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200, chat.text
        text = chat.json()["choices"][0]["message"]["content"]
        assert "demo backend" in text and digest[:12] in text
        assert "GGUF v3" in text and "general.name=tiny-demo" in text
        assert "general.architecture=llama" in text

        started = time.monotonic()
        first_at = None
        events = []
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "demo/tiny:q4", "stream": True, "messages": []},
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    if first_at is None:
                        first_at = time.monotonic() - started
                    events.append(line[6:])
        total = time.monotonic() - started
        assert events[-1] == "[DONE]"
        assert len(events) >= 5
        streamed = "".join(
            json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
        )
        assert digest[:12] in streamed
        # The first event arrived well before the backend finished (chunks are 20 ms apart).
        assert first_at is not None and first_at < total - 0.05, (first_at, total)

        assert c.get("/v1/models").json()["data"][0]["id"] == "demo/tiny:q4"
        missing = c.post("/v1/chat/completions", json={"model": "other", "messages": []})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert c.post("/v1/chat/completions", content=b"{oops").status_code == 400

        assert c.post(unload_path("demo/tiny:q4")).status_code == 200
        assert wait_gone(pid)
        assert index(c) == []


def test_load_with_other_files_replaces_the_backend(tmp_path: Path) -> None:
    with worker(tmp_path / "w", demo_backend_cmd()) as w, w.client() as c:
        first = upload(w.url, b"first" * 100)
        second = upload(w.url, b"second" * 100)
        pid1 = load(c, "m", first).json()["pid"]
        response = load(c, "m", second)
        assert response.status_code == 200
        pid2 = response.json()["pid"]
        assert pid2 != pid1
        assert wait_gone(pid1)
        text = c.post("/v1/chat/completions", json={"model": "m"}).json()
        assert second[:12] in text["choices"][0]["message"]["content"]


def test_concurrent_loads_join_one_backend(tmp_path: Path) -> None:
    with worker(tmp_path / "w", demo_backend_cmd()) as w:
        digest = upload(w.url, b"joined" * 100)
        results: list[httpx.Response] = []

        def call() -> None:
            with w.client() as c:
                results.append(load(c, "m", digest))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 4
        assert len({r.json()["pid"] for r in results}) == 1


def test_backend_death_is_502_and_shown_in_index(tmp_path: Path) -> None:
    with worker(tmp_path / "w", demo_backend_cmd()) as w, w.client() as c:
        digest = upload(w.url, b"dies" * 100)
        pid = load(c, "m", digest).json()["pid"]
        os.kill(pid, 9)
        assert wait_gone(pid)
        deadline = time.monotonic() + 5
        while index(c)[0]["state"] != "UNAVAILABLE" and time.monotonic() < deadline:
            time.sleep(0.05)
        (entry,) = index(c)
        assert entry["state"] == "UNAVAILABLE" and "exited with code -9" in str(entry["reason"])
        response = c.post("/v1/chat/completions", json={"model": "m"})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "backend_died"
        # Loading again brings it back.
        assert load(c, "m", digest).json()["state"] == "READY"


# -- failing backends --------------------------------------------------------------------------

HANGS = (
    "import os, subprocess, sys, time; "
    "child = subprocess.Popen(['sleep', '600']); "
    "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}'); "
    "time.sleep(600)"
)


def _pids(pidfile: Path) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pidfile.exists() and len(pidfile.read_text().split()) == 2:
            return [int(p) for p in pidfile.read_text().split()]
        time.sleep(0.05)
    raise AssertionError("the backend never wrote its pid file")


def test_never_healthy_backend_times_out_and_leaves_no_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    cmd = f'{PY} -c "{HANGS}" {pidfile} {{port}}'
    with (
        worker(tmp_path / "w", cmd, timeout_base=1.5, timeout_per_gib=0, stop_grace=1) as w,
        w.client() as c,
    ):
        digest = upload(w.url, b"hang" * 10)
        started = time.monotonic()
        response = load(c, "slow", digest)
        assert response.status_code == 504
        assert time.monotonic() - started < 10
        reason = response.json()["error"]
        assert "did not become healthy" in reason and "within 2 s" in reason
        for pid in _pids(pidfile):  # the backend and the helper it spawned
            assert not alive(pid), pid
        (entry,) = index(c)
        assert entry["state"] == "UNAVAILABLE" and "did not become healthy" in str(entry["reason"])


def test_backend_answering_503_times_out(tmp_path: Path) -> None:
    script = tmp_path / "busy.py"
    script.write_text(
        "import sys\nfrom http.server import BaseHTTPRequestHandler, HTTPServer\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(503); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    cmd = f"{PY} {script} {{port}}"
    with worker(tmp_path / "w", cmd, timeout_base=1, timeout_per_gib=0) as w, w.client() as c:
        digest = upload(w.url, b"busy" * 10)
        response = load(c, "busy", digest)
        assert response.status_code == 504
        assert "last answer 503" in response.json()["error"]
        assert not any(alive(int(p)) for p in _children_of(os.getpid()) if "busy.py" in _cmdline(p))


def _children_of(pid: int) -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == pid]


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_backend_exiting_at_once_fails_fast_with_code_and_output(tmp_path: Path) -> None:
    cmd = (
        f"{PY} -c \"import sys; print('loading {{model}}'); "
        f"print('error: no such tensor blk.0', file=sys.stderr); sys.exit(3)\" {{port}}"
    )
    with worker(tmp_path / "w", cmd, timeout_base=60) as w, w.client() as c:
        digest = upload(w.url, b"exit" * 10)
        started = time.monotonic()
        response = load(c, "org/broken", digest)
        assert time.monotonic() - started < 10
        assert response.status_code == 500
        reason = response.json()["error"]
        assert "exited with code 3" in reason
        assert "error: no such tensor blk.0" in reason and "loading org/broken" in reason


def test_abandoned_load_stops_the_backend(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    cmd = f'{PY} -c "{HANGS}" {pidfile} {{port}}'
    with worker(tmp_path / "w", cmd, timeout_base=120, stop_grace=1) as w:
        digest = upload(w.url, b"gone" * 10)
        with (
            httpx.Client(base_url=w.url, timeout=httpx.Timeout(30, read=1.0)) as c,
            pytest.raises(httpx.ReadTimeout),
        ):
            load(c, "abandoned", digest)
        pids = _pids(pidfile)
        assert all(wait_gone(pid) for pid in pids), pids
        with w.client() as c:
            deadline = time.monotonic() + 5
            while index(c)[0]["state"] != "UNAVAILABLE" and time.monotonic() < deadline:
                time.sleep(0.05)
            (entry,) = index(c)
            assert entry["state"] == "UNAVAILABLE" and "abandoned" in str(entry["reason"])


def test_worker_shutdown_stops_backends(tmp_path: Path) -> None:
    with worker(tmp_path / "w", demo_backend_cmd()) as w, w.client() as c:
        digest = upload(w.url, b"shutdown" * 10)
        pid = load(c, "m", digest).json()["pid"]
        assert alive(pid)
    assert wait_gone(pid, 2)


WORKER_SCRIPT = """
import sys
from pathlib import Path
import uvicorn
from staging_cli.worker.app import create_app
from staging_cli.worker.demo_backend import demo_backend_cmd
from staging_cli.worker.models import ModelManager
from staging_cli.worker.repository import repository_routes
from staging_cli.worker.server import bind, url_of, uvicorn_config
from staging_cli.worker.store import Store

store = Store(Path(sys.argv[1]))
store.open()
manager = ModelManager(store, demo_backend_cmd())
manager.open()
app = create_app(store, extra_routes=repository_routes(manager), lifespan_hooks=[manager.aclose])
sock = bind("127.0.0.1", 0)
print(url_of(sock), flush=True)
uvicorn.Server(uvicorn_config(app)).run(sockets=[sock])
"""


def test_backends_left_by_a_killed_worker_are_stopped_by_the_next(tmp_path: Path) -> None:
    directory = tmp_path / "w"
    proc = subprocess.Popen(
        [PY, "-c", WORKER_SCRIPT, str(directory)], stdout=subprocess.PIPE, text=True
    )
    pid = None
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), url
        digest = upload(url, b"orphan" * 100)
        with httpx.Client(base_url=url, timeout=30) as c:
            pid = load(c, "m", digest).json()["pid"]
        proc.kill()  # no lifespan shutdown: the backend survives its worker
        proc.wait(10)
        assert alive(pid)
        with worker(directory, demo_backend_cmd()) as w, w.client() as c:
            assert wait_gone(pid, 2)
            (entry,) = index(c)
            assert entry["state"] == "UNAVAILABLE"
            assert f"pid {pid}, left running by the previous worker process" in str(entry["reason"])
            assert load(c, "m", digest).json()["state"] == "READY"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        if pid is not None and alive(pid):
            os.kill(pid, 9)


def test_model_dir_holds_files_under_their_names(tmp_path: Path) -> None:
    show = (
        "import os, sys; d = sys.argv[1]; "
        "print(sorted((n, os.readlink(os.path.join(d, n))) for n in os.listdir(d))); sys.exit(4)"
    )
    cmd = f'{PY} -c "{show}" {{model_dir}} {{port}}'
    with worker(tmp_path / "w", cmd) as w, w.client() as c:
        first = upload(w.url, b"split one" * 10)
        second = upload(w.url, b"split two" * 10)
        files = [
            {"sha256": first, "filename": "m-00001-of-00002.gguf"},
            {"sha256": second, "filename": "m-00002-of-00002.gguf"},
        ]
        response = c.post(load_path("org/split"), json={"parameters": {"files": files}})
        assert response.status_code == 500
        reason = response.json()["error"]
        assert "exited with code 4" in reason
        assert f"('m-00001-of-00002.gguf', '{w.dir}/blobs/sha256/{first}')" in reason
        assert f"('m-00002-of-00002.gguf', '{w.dir}/blobs/sha256/{second}')" in reason
        bad = [{"sha256": first, "filename": "../escape"}]
        assert c.post(load_path("x"), json={"parameters": {"files": bad}}).status_code == 400
