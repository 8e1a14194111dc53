"""Prestaging end to end with real processes: one upload and one load per model, whatever the
number of concurrent stagers, on both coordinators; an owner killed mid-upload is taken over."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .support import RunningWorker, cli_env, make_file, run_worker_in_thread

MiB = 1024 * 1024
CHUNK = 4 * MiB

pytestmark = pytest.mark.slow


def stage_cmd(source: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "staging_cli",
        "stage",
        str(source),
        "--model",
        "org/model:q4",
        "--worker",
        url,
        "--chunk-size",
        str(CHUNK),
        "--json",
        *extra,
    ]


@contextlib.contextmanager
def processes(
    cmds: list[tuple[list[str], dict[str, str]]],
) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for cmd, env in cmds
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.communicate(timeout=10)


def summary(out: str) -> dict[str, object]:
    final = json.loads(out.strip().splitlines()[-1])
    assert final["event"] == "staged"
    return final  # type: ignore[no-any-return]


def dsn_args(backend: str, request: pytest.FixtureRequest) -> list[str]:
    return ["--dsn", request.getfixturevalue("pg_dsn")] if backend == "postgres" else []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_eight_concurrent_prestagers_one_upload_one_load(
    backend: str, request: pytest.FixtureRequest, worker: RunningWorker, tmp_path: Path
) -> None:
    size = 48 * MiB
    source = make_file(tmp_path / "model.gguf", size)
    # SQLite: processes of one machine share the state dir; PostgreSQL: every process is its
    # own "machine" (own state and cache dirs, own connections)
    envs = [cli_env(tmp_path / ("shared" if backend == "sqlite" else f"p{i}")) for i in range(8)]
    args = dsn_args(backend, request)
    with processes([(stage_cmd(source, worker.url, *args), env) for env in envs]) as procs:
        outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = [summary(out) for out, _ in outs]
    assert sum(r["role"] == "owner" for r in results) == 1
    # every process reports the same outcome: the one job, loaded, the same digest
    assert len({json.dumps(r["job"], sort_keys=True) for r in results}) == 1
    assert all(r["loaded"] for r in results)
    assert len({r["files"][0]["sha256"] for r in results}) == 1  # type: ignore[index]
    assert worker.store.received_bytes <= size + CHUNK
    assert worker.manager is not None and worker.manager.loads_started == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_owner_killed_mid_upload_is_taken_over(
    backend: str, request: pytest.FixtureRequest, worker: RunningWorker, tmp_path: Path
) -> None:
    size = 64 * MiB
    source = make_file(tmp_path / "model.gguf", size)
    args = dsn_args(backend, request)
    shared = cli_env(tmp_path / "machine")
    owner = subprocess.Popen(
        stage_cmd(source, worker.url, "--limit-rate", "16MiB", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=shared,
    )
    try:
        deadline = time.monotonic() + 60
        while not worker.store.uploads() or worker.store.uploads()[0].record.offset < 2 * CHUNK:
            assert time.monotonic() < deadline, "the owner never got going"
            time.sleep(0.05)
        # a second stager (another machine with PostgreSQL) waits on the owner...
        follower_env = shared if backend == "sqlite" else cli_env(tmp_path / "other")
        follower = subprocess.Popen(
            stage_cmd(source, worker.url, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=follower_env,
        )
        try:
            time.sleep(1.0)
            assert follower.poll() is None
            # ...until the owner dies
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=10)
            killed_at = time.monotonic()
            acknowledged = worker.store.uploads()[0].record.offset
            out, err = follower.communicate(timeout=120)
            took_over_in = time.monotonic() - killed_at
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.communicate()
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.communicate()
    assert follower.returncode == 0, err
    result = summary(out)
    assert result["role"] == "owner" and result["loaded"] is True
    assert result["job"]["attempt"] == 2  # type: ignore[index]
    (f,) = result["files"]  # type: ignore[misc]
    assert f["resumed_from"] >= acknowledged > 0
    assert f["bytes_sent"] <= size - acknowledged + CHUNK
    print(f"{backend}: takeover and completion {took_over_in:.1f}s after the owner's SIGKILL")
    blob = worker.dir / "blobs" / "sha256" / f["sha256"]
    import hashlib

    assert (
        hashlib.sha256(blob.read_bytes()).hexdigest()
        == hashlib.sha256(source.read_bytes()).hexdigest()
    )
    assert worker.manager is not None and worker.manager.loads_started == 1


def test_failed_load_is_reported_and_visible_in_jobs(tmp_path: Path) -> None:
    never_healthy = f'{sys.executable} -c "import time; time.sleep(600)" {{port}}'
    with run_worker_in_thread(
        tmp_path / "w",
        backend_cmd=never_healthy,
        manager_kwargs={"timeout_base": 1.5, "timeout_per_gib": 0, "stop_grace": 1},
    ) as w:
        source = make_file(tmp_path / "m.bin", MiB)
        env = cli_env(tmp_path / "c")
        done = subprocess.run(
            stage_cmd(source, w.url), capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 1
        assert "health" in done.stderr.lower() or "timed out" in done.stderr.lower(), done.stderr
        assert "Traceback" not in done.stderr
        jobs = subprocess.run(
            [sys.executable, "-m", "staging_cli", "jobs", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        (job,) = json.loads(jobs.stdout)
        assert job["status"] == "failed" and job["model"] == "org/model:q4" and job["error"]
        # within the grace period a second run reports the failure instead of retrying
        again = subprocess.run(
            stage_cmd(source, w.url), capture_output=True, text=True, env=env, timeout=60
        )
        assert again.returncode == 1 and "failed to stage" in again.stderr
        # no backend process is left behind
        model = httpx.post(w.url + "/v2/repository/index").json()
        assert all(m.get("pid") is None for m in model)


def test_load_unload_models_and_gc_commands(tmp_path: Path) -> None:
    with run_worker_in_thread(tmp_path / "w") as w:
        env = cli_env(tmp_path / "c")
        source = make_file(tmp_path / "m.bin", MiB)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "staging_cli", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )

        staged = cli("stage", str(source), "-m", "org/a", "-w", w.url, "--no-load", "--json")
        assert staged.returncode == 0, staged.stderr
        assert summary(staged.stdout)["loaded"] is False
        digest = summary(staged.stdout)["files"][0]["sha256"]  # type: ignore[index]
        assert json.loads(cli("models", "-w", w.url, "--json").stdout) == []
        loaded = cli("load", "org/a", "-w", w.url, "--sha256", str(digest), "--json")
        assert loaded.returncode == 0, loaded.stderr
        assert summary(loaded.stdout)["loaded"] is True
        (entry,) = json.loads(cli("models", "-w", w.url, "--json").stdout)
        assert entry["name"] == "org/a" and entry["state"] == "READY"
        # a referenced blob is never collected
        kept = json.loads(cli("gc", "-w", w.url, "--min-age", "0", "--no-dry-run", "--json").stdout)
        assert kept["removed"] == []
        assert "unloaded org/a" in cli("unload", "org/a", "-w", w.url).stdout
        dry = json.loads(cli("gc", "-w", w.url, "--min-age", "0", "--json").stdout)
        assert [b["sha256"] for b in dry["removed"]] == [digest] and w.store.blob_size(str(digest))
        real = json.loads(cli("gc", "-w", w.url, "--min-age", "0", "--no-dry-run", "--json").stdout)
        assert real["bytes_freed"] == MiB and w.store.blob_size(str(digest)) is None
        missing = cli("load", "org/a", "-w", w.url, "--sha256", str(digest))
        assert missing.returncode == 1 and str(digest)[:12] in missing.stderr


def test_postgres_restart_mid_job(
    request: pytest.FixtureRequest, worker: RunningWorker, tmp_path: Path
) -> None:
    server = request.getfixturevalue("pg_server")
    if server is None:
        pytest.skip("needs the suite's own PostgreSQL to stop and start it")
    dsn = request.getfixturevalue("pg_dsn")
    size = 64 * MiB
    source = make_file(tmp_path / "model.gguf", size)
    owner = subprocess.Popen(
        stage_cmd(source, worker.url, "--limit-rate", "12MiB", "--dsn", dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(tmp_path / "a"),
    )
    contender: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 60
        while not worker.store.uploads() or worker.store.uploads()[0].record.offset < 2 * CHUNK:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.stop()
        # a second stager arrives while the database is down
        contender = subprocess.Popen(
            stage_cmd(source, worker.url, "--dsn", dsn),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(tmp_path / "b"),
        )
        time.sleep(3)
        server.start()
        _out, err = owner.communicate(timeout=180)
        _c_out, c_err = contender.communicate(timeout=180)
    finally:
        for p in (owner, contender):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        if not server.running:
            server.start()  # the session's other tests need it back
    print(f"owner exit {owner.returncode}: {err.strip()[-300:]}")
    print(f"contender exit {contender.returncode}: {c_err.strip()[-300:]}")
    for code, text in ((owner.returncode, err), (contender.returncode, c_err)):
        assert code in (0, 1)
        assert "Traceback" not in text
        if code == 1:
            assert (
                "PostgreSQL" in text or "coordinator" in text.lower() or "another process" in text
            )
    # never two owners doing the work: the file crossed the wire once, the model loaded at most once
    assert worker.store.received_bytes <= size + CHUNK
    assert worker.manager is not None and worker.manager.loads_started <= 1
    assert owner.returncode == 0 or contender.returncode == 0 or worker.manager.loads_started == 0
