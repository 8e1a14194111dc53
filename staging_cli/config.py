"""Settings: where files live, every environment variable's name, the TOML config file, sizes.

Precedence is flag > environment variable > config file > default. The CLI gets the first two
from Typer (each option names its variable, and ``--help`` shows it); this module supplies the
config file as Click's ``default_map`` so the file slots in below both. Nothing here reads the
environment at import time: every function takes the environment it should look at.

The config file is ``config.toml`` in the platformdirs user config dir (``STAGING_CLI_CONFIG_DIR``
moves it). Top-level keys apply to every command that has an option of that name; a table
``[commands.NAME]`` overrides them for that command::

    worker = "http://gpu-1:8081"
    token = "s3cret"
    chunk_size = "64MiB"

    [commands.worker]
    dir = "/srv/staging"
    port = 8081
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from .errors import ConfigError, InvalidSize

APP_NAME = "staging-cli"
ENV_PREFIX = "STAGING_CLI_"

# Every environment variable the toolkit reads, in one place. Option variables are derived as
# ENV_PREFIX + NAME by the CLI; these are the ones that are not options.
ENV_CONFIG_DIR = "STAGING_CLI_CONFIG_DIR"
ENV_STATE_DIR = "STAGING_CLI_STATE_DIR"
ENV_CACHE_DIR = "STAGING_CLI_CACHE_DIR"
ENV_DATA_DIR = "STAGING_CLI_DATA_DIR"
ENV_DEBUG = "STAGING_CLI_DEBUG"

DEFAULT_CHUNK_SIZE = 32 * 1024 * 1024
DEFAULT_STALL_WINDOW = 300.0
DEFAULT_WORKER_PORT = 8081
DEFAULT_UPLOAD_EXPIRY = 24 * 3600.0
DEFAULT_IDLE_TIMEOUT = 60.0


def env_name(option: str) -> str:
    """The environment variable of an option: ``chunk_size`` -> ``STAGING_CLI_CHUNK_SIZE``."""
    return ENV_PREFIX + option.upper().replace("-", "_")


@dataclass(frozen=True)
class Paths:
    """The directories the toolkit keeps files in."""

    config_dir: Path
    state_dir: Path
    cache_dir: Path
    data_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ

        def pick(var: str, default: str) -> Path:
            value = env.get(var)
            return Path(value).expanduser() if value else Path(default)

        return cls(
            config_dir=pick(ENV_CONFIG_DIR, platformdirs.user_config_dir(APP_NAME)),
            state_dir=pick(ENV_STATE_DIR, platformdirs.user_state_dir(APP_NAME)),
            cache_dir=pick(ENV_CACHE_DIR, platformdirs.user_cache_dir(APP_NAME)),
            data_dir=pick(ENV_DATA_DIR, platformdirs.user_data_dir(APP_NAME)),
        )


def load_config_file(path: Path) -> dict[str, Any]:
    """Read the TOML config file; a missing file is an empty config."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}; fix or remove it") from exc


def default_map(config: Mapping[str, Any], commands: Mapping[str, set[str]]) -> dict[str, Any]:
    """Turn the config file into Click's ``default_map``.

    ``commands`` maps each command name to the option names it has. Top-level scalar keys go
    to every command that has that option; ``[commands.NAME]`` overrides them for NAME.
    Keys may use ``-`` or ``_``.
    """
    tables = config.get("commands", {})
    if not isinstance(tables, dict):
        raise ConfigError("config file: 'commands' must be a table of [commands.NAME] tables")
    for name in tables:
        if name not in commands:
            raise ConfigError(
                f"config file: there is no command {name!r}; known: {', '.join(sorted(commands))}"
            )

    def norm(key: str) -> str:
        return key.replace("-", "_")

    top = {
        norm(k): v
        for k, v in config.items()
        if not isinstance(v, dict) and k != "workers"  # [[workers]] is read by serve itself
    }
    result: dict[str, Any] = {}
    for command, options in commands.items():
        values = {k: v for k, v in top.items() if k in options}
        table = tables.get(command)
        if isinstance(table, dict):
            for key, value in table.items():
                if norm(key) not in options:
                    raise ConfigError(
                        f"config file: [commands.{command}] has no option {key!r}; "
                        f"known: {', '.join(sorted(options))}"
                    )
                values[norm(key)] = value
        if values:
            result[command] = {k: v if isinstance(v, list) else str(v) for k, v in values.items()}
    return result


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


def parse_size(text: str | int) -> int:
    """Parse ``8388608``, ``8MiB``, ``1.5GiB`` (IEC) or ``500MB`` (SI) into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidSize(
            f"{text!r} is not a size: use bytes or a suffix such as 8MiB, 1GiB (IEC) or 500MB (SI)"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(n: float) -> str:
    """Human-readable IEC size: ``15.7 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def workers_from_config(config: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """``[[workers]]`` tables (``url``, optional ``token``) for ``serve``."""
    tables = config.get("workers", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError('config file: workers must be [[workers]] tables with url = "..."')
    result = []
    for table in tables:
        url = table.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError("config file: every [[workers]] table needs a url")
        token = table.get("token")
        result.append((url, str(token) if token is not None else None))
    return result
