"""``staging-cli load / unload / models / jobs / gc``: the model lifecycle on a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import env, run
from .output import StageRenderer, jobs_table, models_table, print_json

WorkerOpt = Annotated[
    str, typer.Option("--worker", "-w", help="Worker base URL.", envvar=env("worker"))
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        help="Bearer token for the worker (never printed).", envvar=env("token"), show_default=False
    ),
]
DsnOpt = Annotated[
    str | None,
    typer.Option(
        help="PostgreSQL DSN of the coordinator (default: SQLite in the state dir).",
        envvar=env("dsn"),
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def load(
    name: Annotated[str, typer.Argument(help="Model name.")],
    worker: WorkerOpt,
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="The model's files (hashed, not sent).", show_default=False),
    ] = None,
    sha256: Annotated[
        list[str] | None,
        typer.Option("--sha256", help="The model's blobs by digest.", show_default=False),
    ] = None,
    token: TokenOpt = None,
    dsn: DsnOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Load a model whose files are already on the worker (once across the cluster).

    Name the files (their digests come from the cache) or give --sha256 per blob.
    """
    if not files and not sha256:
        raise typer.BadParameter("name the model's FILES or give --sha256 for each blob")
    renderer = StageRenderer.for_terminal(json_mode=json_output, quiet=False)
    with renderer:
        if files:
            result = run(
                lambda: api.prestage_async(
                    files,
                    model=name,
                    worker=worker,
                    token=token,
                    sha256=sha256,
                    dsn=dsn,
                    on_event=renderer,
                )
            )
        else:
            result = run(
                lambda: api.load_async(
                    name,
                    worker=worker,
                    digests=sha256 or [],
                    token=token,
                    dsn=dsn,
                    on_event=renderer,
                )
            )
    renderer.summary(result)


def unload(
    name: Annotated[str, typer.Argument(help="Model name.")],
    worker: WorkerOpt,
    token: TokenOpt = None,
) -> None:
    """Unload a model (stops its backend); its blobs stay until gc."""
    if run(lambda: api.unload_async(name, worker=worker, token=token)):
        print(f"unloaded {name} on {worker}")
    else:
        print(f"{name} was not loaded on {worker}")


def models(worker: WorkerOpt, token: TokenOpt = None, json_output: JsonOpt = False) -> None:
    """List the worker's models and their states (READY, LOADING, UNAVAILABLE, UNLOADING)."""
    entries = [dict(m.raw) for m in run(lambda: api.models_async(worker=worker, token=token))]
    if json_output:
        print_json(entries)
    else:
        models_table(entries, worker)


def jobs(dsn: DsnOpt = None, json_output: JsonOpt = False) -> None:
    """Every cold-load job the coordinator knows: owner, phase and progress."""
    entries = run(lambda: api.jobs_async(dsn=dsn))
    if json_output:
        print_json(entries)
    else:
        jobs_table(entries)


def gc(
    worker: WorkerOpt,
    token: TokenOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run/--no-dry-run", help="Only list what would be removed.")
    ] = True,
    min_age: Annotated[
        float | None,
        typer.Option(
            help="Keep blobs younger than this many seconds (worker default 3600).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove blobs that no recorded model uses (never a blob in use or being uploaded)."""
    result = run(lambda: api.gc_async(worker=worker, token=token, dry_run=dry_run, min_age=min_age))
    if json_output:
        print_json(result)
        return
    verb = "would remove" if result.get("dry_run") else "removed"
    for blob in result.get("removed", []):
        print(f"{verb} sha256:{blob['sha256']} ({blob['size']} bytes)")
    hint = " (dry run: pass --no-dry-run to remove)" if result.get("dry_run") else ""
    print(
        f"{verb} {len(result.get('removed', []))} blobs, {result.get('bytes_freed', 0)} bytes{hint}"
    )
