"""``staging-cli status``: a worker's disk, uploads in progress and blobs."""

from __future__ import annotations

from typing import Annotated

import typer

from ..stager.status import worker_status
from .common import env, run
from .output import print_json, status_table


def status(
    worker: Annotated[
        str, typer.Option("--worker", "-w", help="Worker base URL.", envvar=env("worker"))
    ],
    token: Annotated[
        str | None,
        typer.Option(help="Bearer token for the worker.", envvar=env("token"), show_default=False),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the status document as JSON.")
    ] = False,
) -> None:
    """Show a worker's free disk, uploads in progress (with offsets) and blobs."""
    body = run(lambda: worker_status(worker, token=token))
    if json_output:
        print_json(body)
    else:
        status_table(body, worker)
