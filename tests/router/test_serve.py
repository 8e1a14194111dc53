"""`staging-cli serve` for real: router processes, a real worker with the demo backend, real
uploads. The seed's regression first: a client that gives up never cancels a cold load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from staging_cli.worker.demo_backend import demo_backend_cmd

from ..faultproxy import FaultProxy, Faults
from ..support import RunningWorker, cli_env, make_file, run_worker_in_thread, serve_process

MiB = 1024 * 1024
CHUNK = 4 * MiB
CHAT = {"model": "cold", "messages": [{"role": "user", "content": "hi"}]}

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_worker(tmp_path: Path) -> Iterator[RunningWorker]:
    with run_worker_in_thread(tmp_path / "worker", backend_cmd=demo_backend_cmd()) as w:
        yield w


def models_dir(tmp_path: Path, size: int) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    settled(make_file(d / "cold.bin", size))
    return d


def settled(path: Path) -> Path:
    """Age a file's mtime so the catalog takes it as completely written at once."""
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def router_args(worker: RunningWorker, *extra: str) -> list[str]:
    return ["--worker", worker.url, "--chunk-size", str(CHUNK), *extra]


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def staging_started(worker: RunningWorker) -> bool:
    uploads = worker.store.uploads()
    return bool(uploads) and uploads[0].record.offset > 0


def loaded(worker: RunningWorker, name: str = "cold") -> bool:
    assert worker.manager is not None
    model = worker.manager.get(name)
    return model is not None and model.state == "READY"


def test_client_disconnect_never_cancels_the_cold_load(
    demo_worker: RunningWorker, tmp_path: Path
) -> None:
    size = 40 * MiB
    models = models_dir(tmp_path, size)
    env = cli_env(tmp_path / "router")
    with serve_process(
        models, *router_args(demo_worker, "--limit-rate", "8MiB", "--load-wait", "inf"), env=env
    ) as (_, url):

        async def ask_and_leave() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                request = asyncio.create_task(client.post(url + "/v1/chat/completions", json=CHAT))
                await asyncio.to_thread(
                    wait_until, lambda: staging_started(demo_worker), 30, "staging"
                )
                request.cancel()  # the browser refresh / the client giving up
                with pytest.raises(asyncio.CancelledError):
                    await request

        asyncio.run(ask_and_leave())
        offset_at_disconnect = demo_worker.store.uploads()[0].record.offset
        assert offset_at_disconnect < size
        # the load goes on without any client, to the end
        wait_until(lambda: loaded(demo_worker), 60, "the model to load")
        assert demo_worker.store.received_bytes <= size + CHUNK
        received = demo_worker.store.received_bytes
        answer = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert answer.status_code == 200, answer.text
        assert "demo backend" in answer.json()["choices"][0]["message"]["content"]
        assert demo_worker.store.received_bytes == received  # no new upload
        assert demo_worker.manager is not None and demo_worker.manager.loads_started == 1


def test_load_balancer_idle_timeout_does_not_cancel_the_cold_load(
    demo_worker: RunningWorker, tmp_path: Path
) -> None:
    size = 32 * MiB
    models = models_dir(tmp_path, size)
    env = cli_env(tmp_path / "router")
    with serve_process(
        models, *router_args(demo_worker, "--limit-rate", "8MiB", "--load-wait", "inf"), env=env
    ) as (_, url):
        faults = Faults(idle_timeout=1.0)
        with FaultProxy(url, faults).running() as lb:
            with pytest.raises(httpx.TransportError):
                httpx.post(lb.url + "/v1/chat/completions", json=CHAT, timeout=60)
            assert faults.idle_cuts == 1
            assert not loaded(demo_worker)
            wait_until(lambda: loaded(demo_worker), 60, "the model to load")
            answer = httpx.post(lb.url + "/v1/chat/completions", json=CHAT, timeout=30)
            assert answer.status_code == 200
    assert demo_worker.store.received_bytes <= size + CHUNK


def test_load_wait_answers_503_with_progress_then_serves(
    demo_worker: RunningWorker, tmp_path: Path
) -> None:
    size = 24 * MiB
    models = models_dir(tmp_path, size)
    env = cli_env(tmp_path / "router")
    with serve_process(
        models, *router_args(demo_worker, "--limit-rate", "8MiB", "--load-wait", "0.5"), env=env
    ) as (_, url):
        first = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert first.status_code == 503
        assert 1 <= int(first.headers["Retry-After"]) <= 30
        error = first.json()["error"]
        assert error["code"] == "model_loading"
        assert set(error["loading"]) >= {
            "model",
            "phase",
            "bytes_done",
            "bytes_total",
            "eta_seconds",
            "worker",
        }
        assert error["loading"]["model"] == "cold"
        wait_until(lambda: loaded(demo_worker), 60, "the model to load")
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
        jobs = httpx.get(url + "/staging/jobs").json()["jobs"]
        assert [j["status"] for j in jobs] == ["succeeded"]
        metrics = httpx.get(url + "/metrics").text
        assert 'staging_router_cold_loads_total{outcome="owner"} 1.0' in metrics
        staged = next(
            line
            for line in metrics.splitlines()
            if line.startswith("staging_router_bytes_staged_total ")
        )
        assert float(staged.split()[1]) == size


def test_errors_in_openai_form(demo_worker: RunningWorker, tmp_path: Path) -> None:
    models = models_dir(tmp_path, MiB)
    env = cli_env(tmp_path / "router")
    with serve_process(models, *router_args(demo_worker, "--token", "secret"), env=env) as (_, url):
        auth = {"Authorization": "Bearer secret"}
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 401
        unknown = httpx.post(
            url + "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        models_list = httpx.get(url + "/v1/models", headers=auth).json()
        assert [m["id"] for m in models_list["data"]] == ["cold"]
        # a model file added later is noticed without a restart
        make_file(models / "later.gguf", MiB)
        time.sleep(2.5)  # until the catalog sees it as stable
        later = httpx.post(
            url + "/v1/chat/completions", json={**CHAT, "model": "later"}, headers=auth, timeout=60
        )
        assert later.status_code == 200, later.text


def test_streaming_is_not_held_back(demo_worker: RunningWorker, tmp_path: Path) -> None:
    models = models_dir(tmp_path, MiB)
    env = cli_env(tmp_path / "router")
    with serve_process(models, *router_args(demo_worker), env=env) as (_, url):
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        body = {**CHAT, "stream": True}

        def events(base: str) -> tuple[list[str], float, float]:
            started = time.monotonic()
            first = None
            lines = []
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                for line in r.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.monotonic() - started
                    if line:
                        lines.append(line)
            return lines, first or 0.0, time.monotonic() - started

        direct, _, _ = events(demo_worker.url)
        routed, first, total = events(url)

        def choices(lines: list[str]) -> list[object]:
            return [json.loads(x[5:])["choices"] if x != "data: [DONE]" else x for x in lines]

        assert choices(routed) == choices(direct)
        assert routed[-1] == "data: [DONE]"
        # the first event arrives long before the backend finishes the stream
        assert first < total / 2, (first, total)


def test_worker_gone_while_forwarding_is_a_502(tmp_path: Path) -> None:
    models = models_dir(tmp_path, MiB)
    env = cli_env(tmp_path / "router")
    worker_cm = run_worker_in_thread(tmp_path / "worker", backend_cmd=demo_backend_cmd())
    worker = worker_cm.__enter__()
    try:
        with serve_process(models, *router_args(worker), env=env) as (_, url):
            assert (
                httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
            )
            worker_cm.__exit__(None, None, None)
            worker_cm = None  # type: ignore[assignment]
            gone = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
            assert gone.status_code in (502, 503), gone.text
            assert gone.json()["error"]["code"] in (
                "worker_unreachable",
                "model_load_failed",
                "model_loading",
            )
    finally:
        if worker_cm is not None:
            worker_cm.__exit__(None, None, None)


def test_shutdown_leaves_the_cold_load_resumable(
    demo_worker: RunningWorker, tmp_path: Path
) -> None:
    size = 48 * MiB
    models = models_dir(tmp_path, size)
    env = cli_env(tmp_path / "router")  # the same machine both times: the SQLite coordinator
    args = router_args(demo_worker, "--limit-rate", "8MiB", "--load-wait", "0")
    with serve_process(models, *args, env=env) as (proc, url):
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 503
        wait_until(lambda: staging_started(demo_worker), 30, "staging")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises it after draining
        jobs = subprocess.run(
            [sys.executable, "-m", "staging_cli", "jobs", "--json"],
            capture_output=True,
            text=True,
            env=env,
        )
        (job,) = json.loads(jobs.stdout)
        assert job["status"] == "released" and job["phase"] == "staging"
    upload = demo_worker.store.uploads()[0]
    kept = upload.record.offset
    assert 0 < kept < size  # the worker keeps the partial upload
    before = demo_worker.store.received_bytes
    # the next start adopts the released job by itself and resumes from the worker's offset
    with serve_process(models, *args, env=env) as (_, url):
        wait_until(lambda: loaded(demo_worker), 90, "the next start to finish the load")
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    assert demo_worker.store.received_bytes - before <= size - kept + CHUNK


def test_events_stream_jobs_and_failed_loads_are_reported(tmp_path: Path) -> None:
    never_healthy = f'{sys.executable} -c "import time; time.sleep(600)" {{port}}'
    with run_worker_in_thread(
        tmp_path / "worker",
        backend_cmd=never_healthy,
        manager_kwargs={"timeout_base": 1.0, "timeout_per_gib": 0, "stop_grace": 1},
    ) as w:
        models = models_dir(tmp_path, MiB)
        with serve_process(
            models, *router_args(w, "--load-wait", "inf"), env=cli_env(tmp_path / "r")
        ) as (_, url):
            seen: list[dict[str, object]] = []

            def follow() -> None:
                with httpx.stream("GET", url + "/staging/events", timeout=30) as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            seen.append(json.loads(line[5:]))
                            if seen[-1]["status"] == "failed":
                                return

            async def both() -> httpx.Response:
                watcher = asyncio.create_task(asyncio.to_thread(follow))
                await asyncio.sleep(0.5)
                async with httpx.AsyncClient(timeout=60) as client:
                    answer = await client.post(url + "/v1/chat/completions", json=CHAT)
                await asyncio.wait_for(watcher, 30)
                return answer

            answer = asyncio.run(both())
            # the load failed: its reason, not a generic error, for the grace period
            assert (
                answer.status_code == 503 and answer.json()["error"]["code"] == "model_load_failed"
            )
            assert "health" in answer.json()["error"]["message"].lower()
            again = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
            assert (
                again.json()["error"]["code"] == "model_load_failed"
                and int(again.headers["Retry-After"]) >= 1
            )
            phases = [e["phase"] for e in seen]
            assert "loading" in phases and seen[-1]["status"] == "failed", phases
            assert w.manager is not None and w.manager.loads_started == 1  # no retry storm


def test_model_lost_by_the_worker_is_loaded_again(
    demo_worker: RunningWorker, tmp_path: Path
) -> None:
    models = models_dir(tmp_path, MiB)
    with serve_process(models, *router_args(demo_worker), env=cli_env(tmp_path / "r")) as (_, url):
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        # evicted / unloaded behind the router's back
        assert httpx.post(demo_worker.url + "/v2/repository/models/cold/unload").status_code == 200
        received = demo_worker.store.received_bytes
        answer = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert answer.status_code == 200, answer.text
        assert demo_worker.manager is not None and demo_worker.manager.loads_started == 2
        assert demo_worker.store.received_bytes == received  # the blob was still there


def test_workers_and_tokens_from_the_config_file(tmp_path: Path) -> None:
    with run_worker_in_thread(
        tmp_path / "worker", token="w-secret", backend_cmd=demo_backend_cmd()
    ) as w:
        models = models_dir(tmp_path, MiB)
        env = cli_env(tmp_path / "r")
        config = tmp_path / "r" / "config" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(f'[[workers]]\nurl = "{w.url}"\ntoken = "w-secret"\n')
        with serve_process(models, env=env) as (_, url):
            answer = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
            assert answer.status_code == 200, answer.text


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_embedded_worker_and_its_backends_stop_with_serve(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "alone")  # no --worker: the embedded worker and the demo backend
    models = Path(env["STAGING_CLI_DATA_DIR"]) / "models"
    models.mkdir(parents=True)
    settled(make_file(models / "cold.bin", MiB))
    with serve_process(models, env=env) as (proc, url):
        answer = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert answer.status_code == 200 and "demo backend" in answer.text
        backends = _children(proc.pid)
        assert backends, "the demo backend should run as a child of serve"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in backends):
        assert time.monotonic() < deadline, "a backend outlived serve"
        time.sleep(0.1)
