"""``staging-cli stage``: upload a model's files to a worker (and, later, load them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..coldload import prestage
from ..config import DEFAULT_STALL_WINDOW
from ..stager import StageOptions
from ..tus import CHECKSUM_ALGORITHMS
from .common import env, run, size_option
from .output import StageRenderer


def stage(
    files: Annotated[list[Path], typer.Argument(help="Model files to stage.", show_default=False)],
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Model name, e.g. org/model:tag.", envvar=env("model")),
    ],
    worker: Annotated[
        str,
        typer.Option(
            "--worker", "-w", help="Worker base URL, e.g. http://gpu-1:8081.", envvar=env("worker")
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token for the worker (never printed).",
            envvar=env("token"),
            show_default=False,
        ),
    ] = None,
    chunk_size: Annotated[
        str,
        typer.Option(
            help="Bytes per PATCH request: 8388608, 32MiB, 1GiB.", envvar=env("chunk_size")
        ),
    ] = "32MiB",
    sha256: Annotated[
        list[str] | None,
        typer.Option(
            "--sha256",
            help="Known sha256 of each file, in order (skips hashing; the worker still verifies).",
            show_default=False,
        ),
    ] = None,
    checksum: Annotated[
        str,
        typer.Option(
            help=f"Per-chunk checksum: {', '.join(CHECKSUM_ALGORITHMS)} or none.",
            envvar=env("checksum"),
        ),
    ] = "sha256",
    stall_window: Annotated[
        float,
        typer.Option(
            help="Give up after this many seconds without acknowledged progress.",
            envvar=env("stall_window"),
        ),
    ] = DEFAULT_STALL_WINDOW,
    deadline: Annotated[
        float | None,
        typer.Option(
            help="Absolute time limit in seconds (default: none).",
            envvar=env("deadline"),
            show_default=False,
        ),
    ] = None,
    limit_rate: Annotated[
        str | None,
        typer.Option(
            help="Bandwidth limit per second, e.g. 100MiB.",
            envvar=env("limit_rate"),
            show_default=False,
        ),
    ] = None,
    no_load: Annotated[
        bool, typer.Option("--no-load", help="Only stage; do not ask the worker to load the model.")
    ] = False,
    dsn: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL DSN of the coordinator shared by every stager and router "
            "(default: an SQLite file in the state dir, for one machine).",
            envvar=env("dsn"),
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print NDJSON events and a final summary.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Upload FILES to a worker (resumable, checksummed, chunked: tus 1.0), then load the model.

    Exactly one process per model and worker does the work, across every process sharing the
    coordinator (--dsn); the others wait and report its result. Staging the same file again
    sends nothing; an interrupted run resumes from the worker's offset when run again (from any
    machine).

    Exit codes: 0 done, 1 staging or load error, 2 usage, 130 interrupted (resumable).
    """
    options = StageOptions(
        chunk_size=size_option(chunk_size) or 0,
        checksum=None if checksum.lower() == "none" else checksum.lower(),
        stall_window=stall_window,
        deadline=deadline,
        limit_rate=size_option(limit_rate),
    )
    renderer = StageRenderer.for_terminal(json_mode=json_output, quiet=quiet)
    with renderer:
        result = run(
            lambda: prestage(
                files,
                model=model,
                worker=worker,
                token=token,
                sha256=sha256,
                load=not no_load,
                dsn=dsn,
                options=options,
                on_event=renderer,
            ),
            on_interrupt=renderer.interrupted_note,
        )
    renderer.summary(result)
