"""``staging-cli serve``: the OpenAI-compatible router that cold-loads models on demand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import DEFAULT_STALL_WINDOW, workers_from_config
from ..errors import StagingError
from ..router.server import ServeConfig, run_serve
from ..router.workers import WorkerRef
from ..stager import StageOptions
from .common import env, fail, size_option
from .output import info


def _load_wait(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give seconds (30, 0) or inf") from None
    if value < 0 or math.isnan(value):
        raise typer.BadParameter("--load-wait must be 0 or more seconds, or inf")
    return value


def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on.", envvar=env("serve_host"))
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on (0: any free port).", envvar=env("serve_port"))
    ] = 8080,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            "-w",
            help="A worker the router may place models on (repeat for several). None: an "
            "embedded worker in this process with the demo backend.",
            envvar=env("serve_workers"),
            show_default=False,
        ),
    ] = None,
    worker_token: Annotated[
        list[str] | None,
        typer.Option(
            help="Token of each --worker, in order (one value applies to all). Or use "
            "workers tables (url, token) in the config file (see the README).",
            envvar=env("serve_worker_tokens"),
            show_default=False,
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            help="Models the router may cold-load: model files, or folders with a model.toml "
            "(default: models/ in the data dir).",
            envvar=env("models_dir"),
            show_default=False,
        ),
    ] = None,
    dsn: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL DSN shared by router replicas (default: SQLite, one machine).",
            envvar=env("dsn"),
            show_default=False,
        ),
    ] = None,
    load_wait: Annotated[
        str,
        typer.Option(
            help="Seconds a request waits for a cold load before a 503 with Retry-After "
            "(0: answer at once; inf: wait without limit).",
            envvar=env("load_wait"),
        ),
    ] = "30",
    chunk_size: Annotated[
        str, typer.Option(help="Bytes per upload request.", envvar=env("chunk_size"))
    ] = "32MiB",
    stall_window: Annotated[
        float,
        typer.Option(
            help="A cold load's upload gives up after this many seconds without progress.",
            envvar=env("stall_window"),
        ),
    ] = DEFAULT_STALL_WINDOW,
    limit_rate: Annotated[
        str | None,
        typer.Option(
            help="Bandwidth cap per cold-load upload, e.g. 100MiB.",
            envvar=env("limit_rate"),
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token clients must send to the router (never printed).",
            envvar=env("serve_token"),
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback address without a token.")
    ] = False,
    idle_ttl: Annotated[
        float | None,
        typer.Option(
            help="Embedded worker: unload a model idle this many seconds.",
            envvar=env("serve_idle_ttl"),
            show_default=False,
        ),
    ] = None,
    max_loaded: Annotated[
        int | None,
        typer.Option(
            help="Embedded worker: at most this many loaded models (LRU idle evicted).",
            envvar=env("serve_max_loaded"),
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error.", envvar=env("serve_log_level"))
    ] = "info",
) -> None:
    """Run the router: OpenAI-compatible /v1 endpoints that cold-load a model on its first
    request, detached from that request, once across every replica sharing --dsn.

    Prints "listening on URL" once it accepts connections.
    """
    refs = _workers(worker or [], worker_token or [], ctx.obj or {})
    config = ServeConfig(
        host=host,
        port=port,
        workers=tuple(refs),
        models_dir=models_dir,
        dsn=dsn,
        load_wait=_load_wait(load_wait),
        token=token,
        insecure=insecure,
        stage_options=StageOptions(
            chunk_size=size_option(chunk_size) or 0,
            stall_window=stall_window,
            limit_rate=size_option(limit_rate),
        ),
        idle_ttl=idle_ttl,
        max_loaded=max_loaded,
        log_level=log_level,
    )

    def announce(url: str, workers: list[WorkerRef], models: Path) -> None:
        print(f"listening on {url}", flush=True)
        info(f"models dir: {models}")
        for w in workers:
            info(f"worker: {w.url}")

    try:
        run_serve(config, on_listening=announce)
    except StagingError as exc:
        fail(exc, exc.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _workers(urls: list[str], tokens: list[str], obj: dict[str, Any]) -> list[WorkerRef]:
    if urls:
        if len(tokens) > 1 and len(tokens) != len(urls):
            raise typer.BadParameter(
                f"{len(tokens)} --worker-token values for {len(urls)} --worker: give one, or one each"
            )
        paired = tokens if len(tokens) == len(urls) else [tokens[0] if tokens else None] * len(urls)
        return [WorkerRef(u, t) for u, t in zip(urls, paired, strict=True)]
    return [WorkerRef(url, token) for url, token in workers_from_config(obj.get("config", {}))]
