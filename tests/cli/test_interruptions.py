"""Real processes killed mid-upload: the client (SIGKILL, SIGSTOP) and the worker (SIGKILL)."""

from __future__ import annotations

import contextlib
import hashlib
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

from ..support import cli_env, free_port, make_file, run_worker_in_thread, worker_process

MiB = 1024 * 1024
CHUNK = 4 * MiB
SIZE = 96 * MiB

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def stage_process(
    source: Path, url: str, env: dict[str, str], *extra: str
) -> Iterator[subprocess.Popen[str]]:
    cmd = [
        sys.executable,
        "-m",
        "staging_cli",
        "stage",
        str(source),
        "--model",
        "org/m",
        "--worker",
        url,
        "--chunk-size",
        str(CHUNK),
        "--json",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=10)


def stage_to_end(
    source: Path, url: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """Run ``staging-cli stage --json`` to completion (a resume, in these tests)."""
    cmd = [sys.executable, "-m", "staging_cli", "stage", str(source), "-m", "org/m", "-w", url,
           "--chunk-size", str(CHUNK), "--json", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def summary(out: str) -> dict[str, object]:
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    final = lines[-1]
    assert final["event"] == "staged", lines[-3:]
    return final["files"][0]  # type: ignore[no-any-return]


def offset_of(url: str) -> int:
    uploads = httpx.get(url + "/status").json()["uploads"]
    return int(uploads[0]["offset"]) if uploads else 0


def wait_for_offset(url: str, at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (offset := offset_of(url)) >= at_least:
                return offset
        time.sleep(0.05)
    raise AssertionError(f"the upload never reached {at_least} bytes")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("machine", ["same machine", "another machine"])
def test_client_sigkill_then_rerun_resumes(tmp_path: Path, machine: str) -> None:
    source = make_file(tmp_path / "model.bin", SIZE)
    with run_worker_in_thread(tmp_path / "w") as w:
        env = cli_env(tmp_path / "one")
        with stage_process(source, w.url, env, "--limit-rate", "24MiB") as proc:
            wait_for_offset(w.url, 3 * CHUNK)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        acknowledged = offset_of(w.url)
        assert 0 < acknowledged < SIZE
        rerun_env = env if machine == "same machine" else cli_env(tmp_path / "two")
        done = stage_to_end(source, w.url, rerun_env)
        assert done.returncode == 0, done.stderr
        result = summary(done.stdout)
        assert result["resumed_from"] == acknowledged
        assert result["bytes_sent"] <= SIZE - acknowledged + CHUNK
        assert sha256(w.dir / "blobs" / "sha256" / str(result["sha256"])) == sha256(source)


def test_worker_sigkill_and_restart_mid_upload(tmp_path: Path) -> None:
    source = make_file(tmp_path / "model.bin", SIZE)
    port = free_port()
    store = tmp_path / "w"
    env = cli_env(tmp_path / "client")
    with worker_process(store, port=port) as (worker, url):
        with stage_process(source, url, env, "--limit-rate", "32MiB") as client:
            acknowledged = wait_for_offset(url, 4 * CHUNK)
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            time.sleep(1.0)  # the client sees refused connections and backs off meanwhile
            with worker_process(store, port=port) as (_, url2):
                assert url2 == url
                assert offset_of(url) >= acknowledged  # every acknowledged byte survived
                out, err = client.communicate(timeout=120)
                assert client.returncode == 0, err
                result = summary(out)
                assert "retrying" in out
                # the client kept going from the restarted worker's offset: at most the
                # chunk in flight at the kill was sent twice
                assert result["bytes_sent"] <= SIZE + CHUNK
                assert sha256(store / "blobs" / "sha256" / str(result["sha256"])) == sha256(source)


def test_frozen_client_does_not_block_a_resume_for_long(tmp_path: Path) -> None:
    source = make_file(tmp_path / "model.bin", SIZE)
    idle = 2.0
    with run_worker_in_thread(tmp_path / "w", idle_timeout=idle) as w:
        with stage_process(
            source, w.url, cli_env(tmp_path / "a"), "--limit-rate", "16MiB"
        ) as frozen:
            wait_for_offset(w.url, 2 * CHUNK)
            time.sleep(0.1)  # mid-chunk
            frozen.send_signal(signal.SIGSTOP)
            acknowledged = offset_of(w.url)
            started = time.monotonic()
            done = stage_to_end(source, w.url, cli_env(tmp_path / "b"))
            elapsed = time.monotonic() - started
            assert done.returncode == 0, done.stderr
            result = summary(done.stdout)
            assert result["resumed_from"] >= acknowledged > 0
            # blocked for about the idle timeout plus a backoff, not for the stall window
            assert elapsed < idle + 30
            print(
                f"resume behind a frozen client finished in {elapsed:.1f}s (idle timeout {idle}s)"
            )
            assert sha256(w.dir / "blobs" / "sha256" / str(result["sha256"])) == sha256(source)


def test_ctrl_c_leaves_a_resumable_upload_and_exits_130(tmp_path: Path) -> None:
    source = make_file(tmp_path / "model.bin", SIZE)
    with run_worker_in_thread(tmp_path / "w") as w:
        env = cli_env(tmp_path / "c")
        with stage_process(source, w.url, env, "--limit-rate", "16MiB", "--no-load") as proc:
            wait_for_offset(w.url, 2 * CHUNK)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "run the same command again to resume" in err and "Traceback" not in err
        kept = offset_of(w.url)
        assert kept >= 2 * CHUNK
        done = stage_to_end(source, w.url, env, "--no-load")
        assert done.returncode == 0, done.stderr
        assert summary(done.stdout)["resumed_from"] == kept
