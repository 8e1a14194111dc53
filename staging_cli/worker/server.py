"""Running the worker: bind the socket, refuse unsafe setups, serve with uvicorn.

The socket is bound here (not by uvicorn) so the real address is known before serving: with
``--port 0`` the CLI can print the port it got, which tests and scripts rely on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from ..budget import (
    DEFAULT_LOAD_TIMEOUT_BASE,
    DEFAULT_LOAD_TIMEOUT_CAP,
    DEFAULT_LOAD_TIMEOUT_PER_GIB,
)
from ..errors import UsageError
from .app import WorkerOptions, create_app
from .demo_backend import demo_backend_cmd
from .models import ModelManager
from .repository import repository_routes
from .store import Store, StoreError


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``staging-cli worker`` needs."""

    dir: Path
    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = None
    insecure: bool = False
    max_size: int | None = None
    min_free: int = 0
    expiry: float = 24 * 3600.0
    idle_timeout: float = 60.0
    log_level: str = "warning"
    backend_cmd: str | None = None  # template with {model_path} {port} {model} {model_dir}
    demo_backend: bool = False
    load_timeout_base: float = DEFAULT_LOAD_TIMEOUT_BASE
    load_timeout_per_gib: float = DEFAULT_LOAD_TIMEOUT_PER_GIB
    load_timeout_cap: float = DEFAULT_LOAD_TIMEOUT_CAP
    idle_ttl: float | None = None  # unload a model's backend after this many idle seconds
    max_loaded: int | None = None  # at most this many backend processes at once

    @property
    def backend(self) -> str | None:
        if self.demo_backend and self.backend_cmd:
            raise UsageError("give either --backend-cmd or --demo-backend, not both")
        return demo_backend_cmd() if self.demo_backend else self.backend_cmd


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # accepted sockets inherit it. With proto 0, Nagle + delayed ACKs added ~40 ms per answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(app: object, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn settings every server of the toolkit uses (the benchmark sink too)."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        http="httptools",
        loop="asyncio",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=5,
    )


def open_worker(config: WorkerConfig) -> tuple[ASGIApp, Store]:
    """Open the store and the model manager and assemble the worker's ASGI app.
    The caller closes the store when done (the app's lifespan stops the backends)."""
    if not config.token and not is_loopback(config.host) and not config.insecure:
        raise UsageError(
            f"refusing to listen on {config.host} without a token: anyone on the network could "
            "write to this worker. Pass --token (or STAGING_CLI_WORKER_TOKEN), or --insecure"
        )
    store = Store(
        config.dir, max_size=config.max_size, expiry=config.expiry, min_free=config.min_free
    )
    try:
        store.open()
    except StoreError as exc:
        raise UsageError(exc.message) from exc
    except OSError as exc:
        raise UsageError(f"cannot use {config.dir} as the worker's store: {exc}") from exc
    try:
        manager = ModelManager(
            store,
            config.backend,
            timeout_base=config.load_timeout_base,
            timeout_per_gib=config.load_timeout_per_gib,
            timeout_cap=config.load_timeout_cap,
            idle_ttl=config.idle_ttl,
            max_loaded=config.max_loaded,
        )
        manager.open()
        app = create_app(
            store,
            WorkerOptions(
                token=config.token,
                idle_timeout=config.idle_timeout,
                status_extra=manager.status,
            ),
            extra_routes=repository_routes(manager),
            lifespan_hooks=[manager.aclose],
        )
    except BaseException:
        store.close()
        raise
    return app, store


def run_worker(config: WorkerConfig, on_listening: Callable[[str], None] | None = None) -> None:
    """Serve the worker until interrupted."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    app, store = open_worker(config)
    try:
        sock = bind(config.host, config.port)
        server = uvicorn.Server(uvicorn_config(app, config.log_level))
        if on_listening is not None:
            on_listening(url_of(sock))
        server.run(sockets=[sock])
    finally:
        store.close()


@contextlib.contextmanager
def serve_in_thread(app: object, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread (its own event loop); yields the base URL.
    Used for the router's embedded worker and by the tests. Always stopped on exit."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise UsageError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def worker_in_thread(config: WorkerConfig) -> Iterator[str]:
    """A whole worker (store, models, backends) served from a thread; yields its URL."""
    app, store = open_worker(config)
    try:
        with serve_in_thread(app, config.host, config.port) as url:
            yield url
    finally:
        store.close()
