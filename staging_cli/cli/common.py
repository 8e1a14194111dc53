"""What every command shares: option types, size parsing, error -> exit code mapping."""

from __future__ import annotations

import asyncio
import os
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer

from ..config import ENV_DEBUG, env_name, parse_size
from ..errors import StagingError
from . import output

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def env(option: str) -> str:
    return env_name(option)


def size_option(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except StagingError as exc:
        raise typer.BadParameter(str(exc)) from exc


def fail(exc: BaseException, code: int) -> NoReturn:
    if os.environ.get(ENV_DEBUG):
        traceback.print_exception(exc)
    output.error(str(exc))
    raise typer.Exit(code)


def run(
    coro_factory: Callable[[], Coroutine[Any, Any, T]],
    on_interrupt: Callable[[], str] | None = None,
) -> T:
    """Run a core coroutine; map expected failures to a sentence and an exit code."""
    try:
        return asyncio.run(coro_factory())
    except KeyboardInterrupt:
        output.error(on_interrupt() if on_interrupt else "interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except StagingError as exc:
        fail(exc, exc.exit_code)
