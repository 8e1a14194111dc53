"""Third-party tus peers for the interoperability tests, started on loopback and always stopped.

A missing peer (tuspy not installed, ``node_modules`` not populated) skips the test with the
command that fixes it, except under CI (``CI=true``), where it fails: an interop suite that
silently skips in CI proves nothing. ``.ci/install-interop.sh`` installs the Node.js peers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
INSTALL_HINT = "run .ci/install-interop.sh (npm ci in tests/interop/node)"
START_TIMEOUT = 20.0


def missing_peer(reason: str) -> NoReturn:
    """Skip locally, fail under CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"interop peer missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_node_peer() -> str:
    """The node executable, once @tus/server and @tus/file-store are installed."""
    node = shutil.which("node")
    if node is None:
        missing_peer("node is not on PATH: install Node.js >= 20.19 to run the @tus/server tests")
    for package in ("server", "file-store"):
        if not (NODE_DIR / "node_modules" / "@tus" / package / "package.json").is_file():
            missing_peer(f"@tus/{package} is not installed in {NODE_DIR}: {INSTALL_HINT}")
    return node


@dataclass
class NodeTusServer:
    """A running ``node server.mjs``: base URL, its FileStore directory and its request log."""

    url: str  # base URL; the tus endpoint is url + "/uploads"
    directory: Path
    log_path: Path
    proc: subprocess.Popen[str]

    def log(self) -> list[str]:
        """``METHOD URL -> STATUS`` lines, one per request the server answered."""
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if " -> " in line
        ]


@contextlib.contextmanager
def node_tus_server(
    directory: Path, log_path: Path, *, max_size: int | None = None
) -> Iterator[NodeTusServer]:
    node = require_node_peer()
    env = {k: v for k, v in os.environ.items() if k != "TUS_MAX_SIZE"}
    env["TUS_EXIT_ON_STDIN_EOF"] = "1"  # dies with us even if this cleanup never runs
    if max_size is not None:
        env["TUS_MAX_SIZE"] = str(max_size)
    directory.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [node, str(NODE_DIR / "server.mjs"), str(directory), "0"],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    try:
        assert proc.stdout is not None
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        line = first[0] if first else ""
        if not line.startswith("listening on http://127.0.0.1:"):
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(
                f"node server.mjs did not start within {START_TIMEOUT:.0f}s (exit code "
                f"{proc.returncode}): stdout {line!r}, stderr {log_path.read_text()[-2000:]!r}"
            )
        yield NodeTusServer(line.split()[-1].rstrip("/"), directory, log_path, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def tus_node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeTusServer]:
    """A stock @tus/server + @tus/file-store on a free loopback port; killed at teardown."""
    with node_tus_server(tmp_path / "tus-node-store", tmp_path / "tus-node.log") as server:
        yield server
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- @tus/server request log ({server.log_path}) ---")
            print("\n".join(server.log()[-60:]))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
