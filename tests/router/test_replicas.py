"""Two router replicas (separate processes) sharing one PostgreSQL and one worker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from staging_cli.worker.demo_backend import demo_backend_cmd

from ..support import RunningWorker, cli_env, run_worker_in_thread, serve_process
from .test_serve import CHAT, CHUNK, MiB, loaded, models_dir, staging_started, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_worker(tmp_path: Path) -> Iterator[RunningWorker]:
    with run_worker_in_thread(tmp_path / "worker", backend_cmd=demo_backend_cmd()) as w:
        yield w


@contextlib.contextmanager
def two_replicas(
    models: Path, worker: RunningWorker, dsn: str, tmp_path: Path, *extra: str
) -> Iterator[list[tuple[object, str]]]:
    args = ["--worker", worker.url, "--dsn", dsn, "--chunk-size", str(CHUNK), *extra]
    with (
        serve_process(models, *args, env=cli_env(tmp_path / "r1")) as a,
        serve_process(models, *args, env=cli_env(tmp_path / "r2")) as b,
    ):
        yield [a, b]


def test_hundred_requests_over_two_replicas_one_upload_one_load(
    demo_worker: RunningWorker, tmp_path: Path, pg_dsn: str
) -> None:
    size = 32 * MiB
    models = models_dir(tmp_path, size)
    with two_replicas(
        models, demo_worker, pg_dsn, tmp_path, "--limit-rate", "16MiB", "--load-wait", "3"
    ) as replicas:
        urls = [url for _, url in replicas]

        async def one(i: int, client: httpx.AsyncClient) -> httpx.Response | None:
            url = urls[i % 2] + "/v1/chat/completions"
            if i % 4 < 2:  # half of the clients give up early
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3 + (i % 7) * 0.1):
                        await client.post(url, json=CHAT)
                return None
            return await client.post(url, json=CHAT)

        async def storm() -> list[httpx.Response | None]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*(one(i, client) for i in range(100)))

        answers = [r for r in asyncio.run(storm()) if r is not None]
        assert len(answers) == 50
        for r in answers:
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "model_loading"
        wait_until(lambda: loaded(demo_worker), 90, "the model to load")
        for url in urls:
            assert (
                httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
            )
    # exactly one upload and one load for the whole storm
    assert demo_worker.store.received_bytes <= size + CHUNK
    assert demo_worker.manager is not None and demo_worker.manager.loads_started == 1


def test_owner_replica_killed_mid_staging_is_taken_over(
    demo_worker: RunningWorker, tmp_path: Path, pg_dsn: str
) -> None:
    size = 48 * MiB
    models = models_dir(tmp_path, size)
    with two_replicas(
        models, demo_worker, pg_dsn, tmp_path, "--limit-rate", "8MiB", "--load-wait", "0"
    ) as replicas:
        (owner, owner_url), (_, other_url) = replicas
        first = httpx.post(owner_url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert first.status_code == 503  # --load-wait 0: the cold load runs in the background
        wait_until(lambda: staging_started(demo_worker), 30, "staging")
        time.sleep(1.0)
        owner.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        owner.wait(timeout=10)  # type: ignore[attr-defined]
        offset = demo_worker.store.uploads()[0].record.offset
        killed = time.monotonic()
        # nobody asks the other replica: it adopts the orphaned job by itself
        wait_until(lambda: loaded(demo_worker), 120, "the other replica to finish the load")
        print(f"takeover + rest of the load took {time.monotonic() - killed:.1f}s after SIGKILL")
        # the worker is READY; the replica learns it from its load's answer a moment later
        deadline = time.monotonic() + 30
        while (
            answer := httpx.post(other_url + "/v1/chat/completions", json=CHAT, timeout=30)
        ).status_code == 503:
            assert answer.headers["Retry-After"] and time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.status_code == 200, answer.text
        jobs = httpx.get(other_url + "/staging/jobs").json()["jobs"]
        (job,) = [j for j in jobs if j["bytes_total"] == size]  # the database is the session's
        assert job["status"] == "succeeded" and job["attempt"] == 2
    assert offset > 0
    # resumed from the worker's offset: at most the chunk in flight at the kill was sent twice
    assert demo_worker.store.received_bytes <= size + CHUNK
    assert demo_worker.manager is not None and demo_worker.manager.loads_started == 1
