"""Running ``staging-cli serve``: the router, and an embedded worker when none is given.

With no ``--worker`` the router starts a worker in the same process (its own thread and event
loop, on a random loopback port, with a random token, its store in the user data dir and the
demo backend), so ``staging-cli serve`` alone is a working single-machine system.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ..config import Paths
from ..errors import UsageError
from ..stager import StageOptions
from ..worker.server import (
    WorkerConfig,
    bind,
    is_loopback,
    url_of,
    uvicorn_config,
    worker_in_thread,
)
from .app import RouterOptions, create_router_app
from .catalog import Catalog
from .workers import WorkerPool, WorkerRef

log = logging.getLogger("staging_cli.router")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``staging-cli serve`` needs."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: tuple[WorkerRef, ...] = ()
    models_dir: Path | None = None
    dsn: str | None = None
    load_wait: float = 30.0
    token: str | None = None
    insecure: bool = False
    stage_options: StageOptions = field(default_factory=StageOptions)
    failure_grace: float = 30.0
    idle_ttl: float | None = None  # embedded worker only
    max_loaded: int | None = None  # embedded worker only
    log_level: str = "info"


@contextlib.contextmanager
def embedded_worker(config: ServeConfig, paths: Paths) -> Iterator[WorkerRef]:
    """A worker in this process (thread + own loop) for a one-machine setup."""
    token = secrets.token_urlsafe(24)
    worker = WorkerConfig(
        dir=paths.data_dir / "worker",
        port=0,
        token=token,
        demo_backend=True,
        idle_ttl=config.idle_ttl,
        max_loaded=config.max_loaded,
        log_level="warning",
    )
    with worker_in_thread(worker) as url:
        log.info("embedded worker on %s (store %s, demo backend)", url, worker.dir)
        yield WorkerRef(url, token)


def run_serve(
    config: ServeConfig,
    paths: Paths | None = None,
    on_listening: Callable[[str, list[WorkerRef], Path], None] | None = None,
) -> None:
    """Serve the router until interrupted (SIGINT/SIGTERM drain in-flight requests)."""
    where = paths or Paths.from_env()
    if not config.token and not is_loopback(config.host) and not config.insecure:
        raise UsageError(
            f"refusing to listen on {config.host} without a token: pass --token "
            "(or STAGING_CLI_SERVE_TOKEN) for clients, or --insecure"
        )
    if config.load_wait < 0 or math.isnan(config.load_wait):
        raise UsageError("--load-wait must be 0 or more seconds, or inf")
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    models_dir = config.models_dir or where.data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        workers = list(config.workers) or [stack.enter_context(embedded_worker(config, where))]
        pool = WorkerPool(workers, paths=where, stage_options=config.stage_options)
        app = create_router_app(
            Catalog(models_dir),
            workers,
            dsn=config.dsn,
            paths=where,
            pool=pool,
            options=RouterOptions(
                token=config.token, load_wait=config.load_wait, failure_grace=config.failure_grace
            ),
            on_shutdown=stack.close,  # the embedded worker and its backends stop with the router
        )
        sock = bind(config.host, config.port)
        server = uvicorn.Server(uvicorn_config(app, "warning"))
        if on_listening is not None:
            on_listening(url_of(sock), workers, models_dir)
        server.run(sockets=[sock])
