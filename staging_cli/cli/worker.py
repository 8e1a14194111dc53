"""``staging-cli worker``: run the reference worker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..budget import (
    DEFAULT_LOAD_TIMEOUT_BASE,
    DEFAULT_LOAD_TIMEOUT_CAP,
    DEFAULT_LOAD_TIMEOUT_PER_GIB,
)
from ..config import DEFAULT_IDLE_TIMEOUT, DEFAULT_UPLOAD_EXPIRY, DEFAULT_WORKER_PORT
from ..errors import StagingError
from ..worker.server import WorkerConfig, run_worker
from .common import env, fail, size_option


def worker(
    dir: Annotated[
        Path,
        typer.Option(
            "--dir", "-d", help="Store directory (uploads and blobs).", envvar=env("worker_dir")
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on.", envvar=env("worker_host"))
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on (0: any free port).", envvar=env("worker_port"))
    ] = DEFAULT_WORKER_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token clients must send (never printed).",
            envvar=env("worker_token"),
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback address without a token.")
    ] = False,
    max_size: Annotated[
        str | None,
        typer.Option(
            help="Largest upload accepted, e.g. 100GiB (default: no limit).",
            envvar=env("worker_max_size"),
            show_default=False,
        ),
    ] = None,
    min_free: Annotated[
        str, typer.Option(help="Disk space to always keep free.", envvar=env("worker_min_free"))
    ] = "0",
    expiry: Annotated[
        float, typer.Option(help="Seconds an idle upload is kept.", envvar=env("worker_expiry"))
    ] = DEFAULT_UPLOAD_EXPIRY,
    idle_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a request body may stall before the upload is released.",
            envvar=env("worker_idle_timeout"),
        ),
    ] = DEFAULT_IDLE_TIMEOUT,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error.", envvar=env("worker_log_level"))
    ] = "warning",
    backend_cmd: Annotated[
        str | None,
        typer.Option(
            help="Command that serves one model, with {model_path} {port} {model} {model_dir}, "
            'e.g. "llama-server -m {model_path} --port {port}".',
            envvar=env("worker_backend_cmd"),
            show_default=False,
        ),
    ] = None,
    demo_backend: Annotated[
        bool,
        typer.Option(
            "--demo-backend",
            help="Serve every model with the built-in demo backend (a demo, not inference).",
            envvar=env("worker_demo_backend"),
        ),
    ] = False,
    load_timeout_base: Annotated[
        float,
        typer.Option(
            help="Load timeout: seconds for any model...", envvar=env("worker_load_timeout_base")
        ),
    ] = DEFAULT_LOAD_TIMEOUT_BASE,
    load_timeout_per_gib: Annotated[
        float,
        typer.Option(
            help="...plus seconds per GiB of model files...",
            envvar=env("worker_load_timeout_per_gib"),
        ),
    ] = DEFAULT_LOAD_TIMEOUT_PER_GIB,
    load_timeout_cap: Annotated[
        float,
        typer.Option(
            help="...never more than this many seconds.", envvar=env("worker_load_timeout_cap")
        ),
    ] = DEFAULT_LOAD_TIMEOUT_CAP,
    idle_ttl: Annotated[
        float | None,
        typer.Option(
            help="Unload a model's backend after this many seconds without requests "
            "(its files and record stay; a load brings it back). Default: never.",
            envvar=env("worker_idle_ttl"),
            show_default=False,
            min=0.001,
        ),
    ] = None,
    max_loaded: Annotated[
        int | None,
        typer.Option(
            help="Run at most N model backends at once: a load beyond that first unloads the "
            "least recently used idle one (503 if all are busy). Default: no limit.",
            envvar=env("worker_max_loaded"),
            show_default=False,
            min=1,
        ),
    ] = None,
) -> None:
    """Run the reference worker: tus uploads into a store under --dir, and model loading.

    Loading follows the KServe v2 repository API and starts --backend-cmd per model.

    Prints "listening on URL" once it accepts connections.
    """
    config = WorkerConfig(
        dir=dir,
        host=host,
        port=port,
        token=token,
        insecure=insecure,
        max_size=size_option(max_size),
        min_free=size_option(min_free) or 0,
        expiry=expiry,
        idle_timeout=idle_timeout,
        log_level=log_level,
        backend_cmd=backend_cmd,
        demo_backend=demo_backend,
        load_timeout_base=load_timeout_base,
        load_timeout_per_gib=load_timeout_per_gib,
        load_timeout_cap=load_timeout_cap,
        idle_ttl=idle_ttl,
        max_loaded=max_loaded,
    )

    def announce(url: str) -> None:
        print(f"listening on {url}", flush=True)

    try:
        run_worker(config, on_listening=announce)
    except StagingError as exc:
        fail(exc, exc.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
