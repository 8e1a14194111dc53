"""The command line: thin Typer commands that parse, call one core function, and render.

Exit codes: 0 ok, 1 a staging error, 2 usage, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer import _completion_shared
from typer._completion_classes import completion_init

from .. import __version__
from ..config import ENV_CONFIG_DIR, Paths, default_map, load_config_file
from ..errors import ConfigError
from . import output
from .models import gc, jobs, load, models, unload
from .serve import serve
from .stage import stage
from .status import status
from .worker import worker

app = typer.Typer(
    name="staging-cli",
    help=(
        "Stage multi-gigabyte model files onto inference workers: resumable, checksummed, "
        "chunked uploads (tus 1.0), loaded once per model.\n\n"
        "Every option can also come from an environment variable (shown in each command's "
        f"--help) or from config.toml in the config dir ({ENV_CONFIG_DIR} moves it). "
        "Precedence: flag > environment > config file > default."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for command in (serve, stage, load, unload, models, jobs, status, gc, worker):
    app.command()(command)

SHELLS = ("bash", "zsh", "fish")
completion_init()  # registers typer's completion classes, which add_completion=False skips


@app.command()
def completions(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.")],
) -> None:
    """Print the shell completion script (also checked in under completions/)."""
    if shell not in SHELLS:
        raise typer.BadParameter(f"{shell!r}: choose one of {', '.join(SHELLS)}")
    print(completion_script(shell), end="")


def completion_script(shell: str) -> str:
    return _completion_shared.get_completion_script(
        prog_name="staging-cli", complete_var="_STAGING_CLI_COMPLETE", shell=shell
    )


def _version(value: bool) -> None:
    if value:
        print(f"staging-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    pass


def _command_options() -> dict[str, set[str]]:
    command = typer.main.get_command(app)
    assert hasattr(command, "commands")
    return {name: {p.name for p in sub.params if p.name} for name, sub in command.commands.items()}


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    paths = Paths.from_env()
    try:
        config = load_config_file(paths.config_file)
        defaults = default_map(config, _command_options())
    except ConfigError as exc:
        output.error(str(exc))
        sys.exit(2)
    app(args=argv, prog_name="staging-cli", default_map=defaults, obj={"config": config})
