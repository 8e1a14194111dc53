"""Models do not stay loaded forever: idle TTL, --max-loaded and the in-flight requests that
protect a model from both; a real worker on loopback with real demo backend processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from staging_cli.worker.demo_backend import demo_backend_cmd, demo_gguf_bytes
from staging_cli.worker.models import ModelManager
from staging_cli.worker.store import Store
from tests.support import RunningWorker, run_worker_in_thread
from tests.worker.test_repository import alive, index, load, unload_path, upload, wait_gone


def client(w: RunningWorker, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=w.url, timeout=30, **kwargs)


def entry(c: httpx.Client, name: str) -> dict[str, Any]:
    for e in index(c):
        if e["name"] == name:
            return e
    raise AssertionError(f"{name} is not in the index")


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def model_file(tag: str) -> bytes:
    return demo_gguf_bytes(tag, padding=tag.encode() * 100)


def load_ok(c: httpx.Client, name: str, digest: str) -> int:
    response = load(c, name, digest)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "READY"
    pid = response.json()["pid"]
    assert isinstance(pid, int) and alive(pid)
    return pid


class Stream(threading.Thread):
    """A long streaming chat request in a thread: (delay * max_tokens / 4) seconds of SSE."""

    def __init__(self, w: RunningWorker, model: str, delay: float, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.w = w
        self.body = {"model": model, "stream": True, "delay": delay, "max_tokens": max_tokens}
        self.status: int | None = None
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.first_event = threading.Event()
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            with (
                client(self.w) as c,
                c.stream("POST", "/v1/chat/completions", json=self.body) as response,
            ):
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first_event.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_event.set()

    def finish(self, seconds: float = 30.0) -> None:
        self.join(seconds)
        assert not self.is_alive(), "the stream did not end"
        assert self.error is None, self.error
        assert self.status == 200
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]


def test_idle_model_is_unloaded_after_the_ttl_and_can_be_loaded_again(tmp_path: Path) -> None:
    with (
        run_worker_in_thread(
            tmp_path / "w", backend_cmd=demo_backend_cmd(), manager_kwargs={"idle_ttl": 1.0}
        ) as w,
        client(w) as c,
    ):
        digest = upload(w.url, model_file("idle"))
        pid = load_ok(c, "org/idle", digest)
        fresh = entry(c, "org/idle")
        assert fresh["in_flight"] == 0
        assert isinstance(fresh["idle_seconds"], float) and fresh["idle_seconds"] < 1.0

        assert wait_for(lambda: entry(c, "org/idle")["state"] == "UNAVAILABLE", 10)
        assert wait_gone(pid, 10), f"backend pid {pid} still running"
        gone = entry(c, "org/idle")
        assert "--idle-ttl" in gone["reason"] and "load it again" in gone["reason"]
        assert gone["idle_seconds"] is None and gone["in_flight"] == 0
        assert "pid" not in gone
        # The record stays (the files are protected from gc), without the stopped process.
        recorded = json.loads((w.dir / "models.json").read_text())["models"]["org/idle"]
        assert recorded["files"] == [{"sha256": digest}] and "backend_process" not in recorded
        status = c.get("/status").json()
        assert status["evictions"] == 1 and status["idle_ttl"] == 1.0
        chat = c.post("/v1/chat/completions", json={"model": "org/idle", "messages": []})
        assert chat.status_code == 404
        assert chat.json()["error"]["code"] == "model_not_loaded"
        assert "--idle-ttl" in chat.json()["error"]["message"]

        # A load brings it back with a new backend, and using it keeps it loaded.
        again = load_ok(c, "org/idle", digest)
        assert again != pid
        for _ in range(6):  # 1.8 s of use, a request every 0.3 s: never idle for 1 s
            ok = c.post("/v1/chat/completions", json={"model": "org/idle", "messages": []})
            assert ok.status_code == 200
            time.sleep(0.3)
        assert entry(c, "org/idle")["state"] == "READY" and alive(again)
        assert wait_gone(again, 10)


def test_a_streaming_request_keeps_its_model_loaded_until_it_ends(tmp_path: Path) -> None:
    with (
        run_worker_in_thread(
            tmp_path / "w", backend_cmd=demo_backend_cmd(), manager_kwargs={"idle_ttl": 1.0}
        ) as w,
        client(w) as c,
    ):
        digest = upload(w.url, model_file("busy"))
        pid = load_ok(c, "busy", digest)
        stream = Stream(w, "busy", delay=0.2, max_tokens=4 * 20)  # ~4 s, 4x the TTL
        started = time.monotonic()
        stream.start()
        assert stream.first_event.wait(10) and stream.error is None
        seen_busy = False
        while stream.is_alive():
            e = entry(c, "busy")
            assert e["state"] == "READY", e
            assert alive(pid)
            if e["in_flight"] == 1:
                seen_busy = True
                assert e["idle_seconds"] == 0.0  # serving: not idle
            time.sleep(0.2)
        stream.finish()
        assert seen_busy
        assert stream.ended_at is not None and stream.ended_at - started > 3.0
        assert len(stream.events) >= 20
        after = entry(c, "busy")
        assert after["in_flight"] == 0
        # Idle is counted from the end of the stream, not its start.
        time.sleep(0.5)
        assert entry(c, "busy")["state"] == "READY" and alive(pid)
        assert wait_for(lambda: entry(c, "busy")["state"] == "UNAVAILABLE", 10)
        assert wait_gone(pid, 10)
        assert time.monotonic() - stream.ended_at >= 1.0


def test_a_client_leaving_mid_stream_ends_its_request(tmp_path: Path) -> None:
    with (
        run_worker_in_thread(
            tmp_path / "w", backend_cmd=demo_backend_cmd(), manager_kwargs={"idle_ttl": 1.0}
        ) as w,
        client(w) as c,
    ):
        digest = upload(w.url, model_file("left"))
        pid = load_ok(c, "left", digest)
        body = {"model": "left", "stream": True, "delay": 0.2, "max_tokens": 4 * 200}
        with client(w) as leaving, leaving.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            assert entry(c, "left")["in_flight"] == 1
        # The client closed its connection after the first event of a 40 s stream.
        assert wait_for(lambda: entry(c, "left")["in_flight"] == 0, 10)
        assert wait_for(lambda: entry(c, "left")["state"] == "UNAVAILABLE", 10)
        assert wait_gone(pid, 10)


def test_max_loaded_1_evicts_the_idle_model_for_the_next(tmp_path: Path) -> None:
    with (
        run_worker_in_thread(
            tmp_path / "w", backend_cmd=demo_backend_cmd(), manager_kwargs={"max_loaded": 1}
        ) as w,
        client(w) as c,
    ):
        first = upload(w.url, model_file("first"))
        second = upload(w.url, model_file("second"))
        pid1 = load_ok(c, "first", first)
        assert c.post("/v1/chat/completions", json={"model": "first"}).status_code == 200
        pid2 = load_ok(c, "second", second)
        assert not alive(pid1), "the evicted backend stops before the next one starts"
        one, two = entry(c, "first"), entry(c, "second")
        assert one["state"] == "UNAVAILABLE" and "make room for model second" in one["reason"]
        assert "--max-loaded 1" in one["reason"]
        assert two["state"] == "READY" and two["pid"] == pid2
        chat = c.post("/v1/chat/completions", json={"model": "second"}).json()
        assert second[:12] in chat["choices"][0]["message"]["content"]
        # Loading the first again evicts the second in turn; a repeated load is a no-op.
        pid1b = load_ok(c, "first", first)
        assert wait_gone(pid2, 5) and entry(c, "second")["state"] == "UNAVAILABLE"
        assert load_ok(c, "first", first) == pid1b
        assert c.get("/status").json()["evictions"] == 2
        # An explicit unload of an evicted model forgets its record.
        assert c.post(unload_path("second")).status_code == 200
        assert [e["name"] for e in index(c)] == ["first"]


def test_max_loaded_2_evicts_the_least_recently_used(tmp_path: Path) -> None:
    with (
        run_worker_in_thread(
            tmp_path / "w", backend_cmd=demo_backend_cmd(), manager_kwargs={"max_loaded": 2}
        ) as w,
        client(w) as c,
    ):
        digests = {n: upload(w.url, model_file(n)) for n in ("a", "b", "c")}
        pid_a = load_ok(c, "a", digests["a"])
        pid_b = load_ok(c, "b", digests["b"])
        # a was loaded first, but used last: b is the least recently used.
        assert c.post("/v1/chat/completions", json={"model": "a"}).status_code == 200
        pid_c = load_ok(c, "c", digests["c"])
        assert wait_gone(pid_b, 5)
        assert alive(pid_a) and alive(pid_c)
        states = {e["name"]: e["state"] for e in index(c)}
        assert states == {"a": "READY", "b": "UNAVAILABLE", "c": "READY"}


def test_max_loaded_1_with_the_model_busy_refuses_503_and_keeps_serving(tmp_path: Path) -> None:
    with (
        run_worker_in_thread(
            tmp_path / "w", backend_cmd=demo_backend_cmd(), manager_kwargs={"max_loaded": 1}
        ) as w,
        client(w) as c,
    ):
        first = upload(w.url, model_file("first"))
        second = upload(w.url, model_file("second"))
        pid1 = load_ok(c, "first", first)
        stream = Stream(w, "first", delay=0.2, max_tokens=4 * 15)  # ~3 s
        stream.start()
        assert stream.first_event.wait(10) and stream.error is None
        assert entry(c, "first")["in_flight"] == 1

        refused = load(c, "second", second)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        message = refused.json()["error"]
        assert "all 1 loaded models are serving requests" in message
        assert "retry shortly or raise --max-loaded" in message
        assert [e["name"] for e in index(c)] == ["first"]  # the refused load left no record
        assert alive(pid1) and entry(c, "first")["state"] == "READY"
        # Other requests to the busy model are still served meanwhile.
        assert c.post("/v1/chat/completions", json={"model": "first"}).status_code == 200

        stream.finish()
        assert stream.ended_at is not None
        assert alive(pid1)
        assert wait_for(lambda: entry(c, "first")["in_flight"] == 0, 5)
        # Once the stream is over the first model is idle: the retry evicts it.
        pid2 = load_ok(c, "second", second)
        assert wait_gone(pid1, 5)
        assert entry(c, "second")["pid"] == pid2


def test_limits_are_validated_and_do_not_apply_without_a_backend(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.open()
    try:
        with pytest.raises(ValueError, match="idle_ttl"):
            ModelManager(store, idle_ttl=0)
        with pytest.raises(ValueError, match="max_loaded"):
            ModelManager(store, max_loaded=0)
    finally:
        store.close()
    with (
        run_worker_in_thread(
            tmp_path / "w", manager_kwargs={"max_loaded": 1, "idle_ttl": 0.2}
        ) as w,
        client(w) as c,
    ):
        one = upload(w.url, b"one" * 100)
        two = upload(w.url, b"two" * 100)
        assert load(c, "one", one).status_code == 200
        assert load(c, "two", two).status_code == 200
        time.sleep(0.6)
        assert {e["name"]: e["state"] for e in index(c)} == {"one": "READY", "two": "READY"}
