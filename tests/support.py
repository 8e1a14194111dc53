"""Test helpers shared by the suite: real servers on loopback, started and always stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from staging_cli.worker.app import WorkerOptions, create_app
from staging_cli.worker.models import ModelManager
from staging_cli.worker.repository import repository_routes
from staging_cli.worker.server import serve_in_thread
from staging_cli.worker.store import Store

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningWorker:
    url: str
    store: Store
    dir: Path
    token: str | None = None
    manager: ModelManager | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


serve_app = serve_in_thread  # an ASGI app on a free loopback port, in a thread


@contextlib.contextmanager
def run_worker_in_thread(
    directory: Path,
    *,
    token: str | None = None,
    idle_timeout: float = 5.0,
    backend_cmd: str | None = None,
    manager_kwargs: dict[str, Any] | None = None,
    **store_kwargs: Any,
) -> Iterator[RunningWorker]:
    store = Store(directory, **store_kwargs)
    store.open()
    try:
        manager = ModelManager(store, backend_cmd, **(manager_kwargs or {}))
        manager.open()
        app = create_app(
            store,
            WorkerOptions(token=token, idle_timeout=idle_timeout, status_extra=manager.status),
            extra_routes=repository_routes(manager),
            lifespan_hooks=[manager.aclose],
        )
        with serve_app(app) as url:
            yield RunningWorker(url=url, store=store, dir=directory, token=token, manager=manager)
    finally:
        store.close()


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess with its own config, state and cache dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGING_CLI_")}
    env.update(
        STAGING_CLI_CONFIG_DIR=str(tmp / "config"),
        STAGING_CLI_STATE_DIR=str(tmp / "state"),
        STAGING_CLI_CACHE_DIR=str(tmp / "cache"),
        STAGING_CLI_DATA_DIR=str(tmp / "data"),
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def cli_server(args: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ``staging-cli`` server command as a real subprocess, once it prints ``listening on
    URL``; yields (process, url). Always killed, also when the test fails."""
    cmd = [sys.executable, "-m", "staging_cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{args[0]} did not start: {line!r} {err}")
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def worker_process(
    directory: Path, *args: str, port: int = 0, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    """``staging-cli worker`` as a real subprocess; yields (process, url)."""
    argv = ["worker", "--dir", str(directory), "--port", str(port), *args]
    return cli_server(argv, env or cli_env(directory.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of pseudo-random bytes (fast to generate, incompressible enough)."""
    import random

    rng = random.Random(seed)
    block = rng.randbytes(1 << 20)
    with path.open("wb") as fh:
        remaining = size
        i = 0
        while remaining > 0:
            n = min(remaining, len(block))
            # vary each MiB so chunks differ
            fh.write(i.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n])
            remaining -= n
            i += 1
    return path


def serve_process(
    models_dir: Path, *args: str, env: dict[str, str], port: int = 0
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    """``staging-cli serve`` as a real subprocess; yields (process, url)."""
    argv = [
        "serve",
        "--models-dir",
        str(models_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    return cli_server(argv, env)
