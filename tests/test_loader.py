"""The loader against our real worker, and against Triton's answer shapes scripted with respx."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import respx

from staging_cli.errors import (
    AuthenticationError,
    InvalidModelName,
    LoadError,
    LoadTimeout,
    WorkerUnreachable,
)
from staging_cli.loader import Loader
from staging_cli.worker.app import WorkerOptions, create_app
from staging_cli.worker.demo_backend import demo_backend_cmd
from staging_cli.worker.models import ModelManager
from staging_cli.worker.repository import repository_routes
from staging_cli.worker.store import Store
from tests.support import free_port, serve_app

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.contextmanager
def worker(
    directory: Path,
    backend_cmd: str | None = None,
    token: str | None = None,
    **manager_kwargs: float,
) -> Iterator[str]:
    store = Store(directory)
    store.open()
    manager = ModelManager(store, backend_cmd, **manager_kwargs)
    manager.open()
    try:
        app = create_app(
            store,
            WorkerOptions(token=token),
            extra_routes=repository_routes(manager),
            lifespan_hooks=[manager.aclose],
        )
        with serve_app(app) as url:
            yield url
    finally:
        store.close()


def upload(url: str, data: bytes, token: str | None = None) -> str:
    headers = {
        "Tus-Resumable": "1.0.0",
        "Upload-Length": str(len(data)),
        "Content-Type": "application/offset+octet-stream",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = httpx.post(url + "/uploads", content=data, headers=headers)
    assert response.status_code == 201, response.text
    return hashlib.sha256(data).hexdigest()


# -- against our worker ------------------------------------------------------------------------


def test_loader_against_our_worker_with_demo_backend(tmp_path: Path) -> None:
    with worker(tmp_path / "w", demo_backend_cmd(), token="s3cret") as url:
        digest = upload(url, b"model bytes" * 100, token="s3cret")

        async def scenario() -> None:
            async with httpx.AsyncClient() as client:
                loader = Loader(client, url, token="s3cret")
                assert await loader.index() == []
                state = await loader.load("org/llama-3-8b.Q4_K_M", [digest])
                assert state.ready and state.files == (digest,)
                again = await loader.load("org/llama-3-8b.Q4_K_M", [f"sha256:{digest}"])
                assert again.raw["pid"] == state.raw["pid"]
                (entry,) = await loader.index()
                assert entry.name == "org/llama-3-8b.Q4_K_M" and entry.ready
                assert await loader.unload("org/llama-3-8b.Q4_K_M") is True
                assert await loader.unload("org/llama-3-8b.Q4_K_M") is False
                assert await loader.state("org/llama-3-8b.Q4_K_M") is None

                with pytest.raises(LoadError, match=f"sha256:{'cd' * 32}.*stage it first"):
                    await loader.load("m", ["cd" * 32])
                with pytest.raises(InvalidModelName):
                    await loader.load("../etc", [digest])

                bad = Loader(client, url, token="wrong")
                with pytest.raises(AuthenticationError) as info:
                    await bad.index()
                assert info.value.status == 403

        run(scenario())


def test_loader_reports_backend_failures(tmp_path: Path) -> None:
    exits = f"{sys.executable} -c \"import sys; print('bad magic'); sys.exit(2)\" {{port}}"
    with worker(tmp_path / "w", exits) as url:
        digest = upload(url, b"x" * 10)

        async def scenario() -> None:
            async with httpx.AsyncClient() as client:
                with pytest.raises(LoadError, match=r"exited with code 2(.|\n)*bad magic") as info:
                    await Loader(client, url).load("m", [digest])
                assert not isinstance(info.value, LoadTimeout)

        run(scenario())

    hangs = f'{sys.executable} -c "import time; time.sleep(60)" {{port}}'
    with worker(tmp_path / "w2", hangs, timeout_base=0.5, timeout_per_gib=0, stop_grace=1) as url:
        digest = upload(url, b"x" * 10)

        async def timed_out() -> None:
            async with httpx.AsyncClient() as client:
                with pytest.raises(LoadTimeout, match="did not become healthy"):
                    await Loader(client, url).load("m", [digest])

        run(timed_out())


def test_loader_unreachable_worker() -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            with pytest.raises(WorkerUnreachable, match="cannot reach worker"):
                await Loader(client, f"http://127.0.0.1:{free_port()}").index()

    run(scenario())


# -- against Triton's shapes (a server we did not write) --------------------------------------

TRITON = "http://triton.test:8000"


@respx.mock(assert_all_called=False)
def test_loader_speaks_triton(respx_mock: respx.MockRouter) -> None:
    respx_mock.post(f"{TRITON}/v2/repository/index").respond(
        200,
        json=[
            {"name": "densenet_onnx", "version": "1", "state": "READY"},
            {"name": "simple", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
        ],
    )
    loaded = respx_mock.post(f"{TRITON}/v2/repository/models/densenet_onnx/load").respond(200)
    respx_mock.post(f"{TRITON}/v2/repository/models/missing/load").respond(
        400, json={"error": "failed to load 'missing', failed to poll from model repository"}
    )
    respx_mock.post(f"{TRITON}/v2/repository/models/densenet_onnx/unload").respond(200)
    respx_mock.post(f"{TRITON}/v2/repository/models/slow/load").mock(
        side_effect=httpx.ReadTimeout("timed out")
    )

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            loader = Loader(client, TRITON)
            entries = await loader.index()
            assert [(e.name, e.version, e.state) for e in entries] == [
                ("densenet_onnx", "1", "READY"),
                ("simple", "1", "UNAVAILABLE"),
            ]
            assert entries[1].reason == "unloaded"

            state = await loader.load("densenet_onnx")
            assert state.ready
            assert loaded.calls.last.request.content == b"{}"

            with pytest.raises(LoadError, match="failed to poll from model repository") as info:
                await loader.load("missing")
            assert "(400)" in str(info.value)

            assert await loader.unload("densenet_onnx") is True

            with pytest.raises(LoadTimeout, match="gave no answer to loading model slow"):
                await loader.load("slow", wait=1)

    run(scenario())


@respx.mock
def test_loader_explains_a_server_without_the_repository_api(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.post(f"{TRITON}/v2/repository/index").respond(404, text="Not Found")

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            with pytest.raises(LoadError, match="does not offer the KServe v2 repository API"):
                await Loader(client, TRITON).index()

    run(scenario())
