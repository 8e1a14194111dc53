"""Backend processes (real ones), command templates, the demo backend and the load timeout."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import sys
import time
from pathlib import Path

import httpx
import pytest

from staging_cli.budget import GIB, load_timeout
from staging_cli.errors import LoadError, LoadTimeout, UsageError
from staging_cli.worker.backend import (
    Backend,
    free_loopback_port,
    placeholders,
    process_group_alive,
    render_command,
)
from staging_cli.worker.demo_backend import (
    create_demo_app,
    demo_backend_cmd,
    demo_gguf_bytes,
    inspect_model,
)
from tests.support import serve_app

PY = sys.executable


def test_load_timeout_grows_with_size_under_a_cap() -> None:
    assert load_timeout(0) == 60
    assert load_timeout(GIB) == 70
    assert load_timeout(15_700_000_000) == pytest.approx(60 + 10 * 15_700_000_000 / GIB)
    assert load_timeout(1000 * GIB) == 1800
    assert load_timeout(10 * GIB, base=1, per_gib=0.5, cap=100) == 6
    assert load_timeout(10 * GIB, base=50, cap=20) == 20
    with pytest.raises(ValueError):
        load_timeout(-1)


def test_render_command_fills_placeholders_per_argument_without_a_shell() -> None:
    template = "llama-server -m {model_path} --port {port} --alias {model} --json '{\"a\": 1}'"
    argv = render_command(
        template, {"model_path": "/store/my model; rm -rf /", "port": "9", "model": "org/m:tag"}
    )
    assert argv == [
        "llama-server",
        "-m",
        "/store/my model; rm -rf /",
        "--port",
        "9",
        "--alias",
        "org/m:tag",
        "--json",
        '{"a": 1}',
    ]
    assert placeholders(template) == {"model_path", "port", "model"}
    with pytest.raises(LoadError, match=r"\{ctx\}, which is not a placeholder"):
        render_command("x --ctx {ctx}", {"port": "1"})
    with pytest.raises(UsageError):
        render_command("x 'unterminated", {})
    with pytest.raises(UsageError):
        render_command("   ", {})


def test_backend_start_stop_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "from http.server import BaseHTTPRequestHandler, HTTPServer\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        "open(sys.argv[2], 'w').write(str(child.pid))\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "print('serving', flush=True)\n"
        "HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )

    async def scenario() -> None:
        port = free_loopback_port()
        backend = Backend([PY, "-c", script, str(port), str(pidfile)], port, model="m", grace=2)
        await backend.start(10)
        assert backend.pid is not None
        pgid = backend.pid
        assert process_group_alive(pgid)
        helper = int(pidfile.read_text())
        assert os.getpgid(helper) == pgid
        await backend.stop()
        assert backend.returncode is not None
        for _ in range(100):
            if not process_group_alive(pgid):
                break
            await asyncio.sleep(0.05)
        assert not process_group_alive(pgid)

    asyncio.run(scenario())


def test_backend_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

    async def scenario() -> None:
        port = free_loopback_port()
        backend = Backend([PY, "-c", script], port, model="stubborn", grace=0.5)
        started = time.monotonic()
        with pytest.raises(LoadTimeout, match="within 1 s"):
            await backend.start(1)
        assert time.monotonic() - started < 5
        assert backend.returncode == -9
        assert backend.pid is not None and not process_group_alive(backend.pid)

    asyncio.run(scenario())


def test_backend_cancelled_while_starting_leaves_no_process() -> None:
    async def scenario() -> None:
        port = free_loopback_port()
        backend = Backend([PY, "-c", "import time; time.sleep(600)"], port, model="m", grace=1)
        task = asyncio.create_task(backend.start(60))
        await asyncio.sleep(0.5)  # started, polling /health
        assert backend.pid is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not process_group_alive(backend.pid)

    asyncio.run(scenario())


def test_missing_executable_is_a_clear_load_error() -> None:
    async def scenario() -> None:
        backend = Backend(["/nonexistent/llama-server", "--port", "1"], 1, model="m")
        with pytest.raises(LoadError, match="cannot start the backend for model m"):
            await backend.start(5)

    asyncio.run(scenario())


# -- the demo backend --------------------------------------------------------------------------


def test_inspect_model_reads_gguf_header_and_hash(tmp_path: Path) -> None:
    data = demo_gguf_bytes("tiny", "qwen2", padding=b"\1" * 1000)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(data)
    facts = inspect_model(str(path))
    assert facts.size == len(data)
    assert facts.sha256 == hashlib.sha256(data).hexdigest()
    assert facts.gguf == {
        "version": 3,
        "tensor_count": 0,
        "kv_count": 3,
        "general.architecture": "qwen2",
        "general.name": "tiny",
    }
    text = facts.describe()
    assert "GGUF v3" in text and "general.name=tiny" in text and "demo backend" in text

    other = tmp_path / "weights.bin"
    other.write_bytes(b"not gguf at all")
    assert "not a GGUF file" in inspect_model(str(other)).describe()

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[:40])  # header, then the first key cut short
    assert inspect_model(str(truncated)).gguf == {"version": 3, "tensor_count": 0, "kv_count": 3}


def test_demo_app_streams_sse(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(demo_gguf_bytes())
    with (
        serve_app(create_demo_app(inspect_model(str(path)), "demo")) as url,
        httpx.Client(base_url=url) as c,
    ):
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").json()["data"][0]["id"] == "demo"
        with c.stream("POST", "/v1/chat/completions", json={"stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 3


def test_demo_backend_cmd_runs_as_a_process(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"abc" * 100)
    port = free_loopback_port()
    argv = render_command(
        demo_backend_cmd(), {"model_path": str(path), "port": str(port), "model": "org/x"}
    )
    assert argv[:3] == [PY, "-m", "staging_cli.worker.demo_backend"]

    async def scenario() -> None:
        backend = Backend(argv, port, model="org/x")
        await backend.start(30)
        try:
            async with httpx.AsyncClient(base_url=backend.url) as client:
                answer = (await client.post("/v1/chat/completions", json={})).json()
            content = answer["choices"][0]["message"]["content"]
            assert "model file model.bin, 300 bytes" in content
            assert answer["model"] == "org/x"
        finally:
            await backend.stop()
        assert "demo backend: model file model.bin" in backend.tail()

    asyncio.run(scenario())
    assert shlex.split(demo_backend_cmd())[0] == PY
