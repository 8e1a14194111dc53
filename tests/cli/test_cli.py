"""The command line as a user runs it: config precedence, output modes, exit codes, completions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from staging_cli.cli import SHELLS, completion_script

from ..support import REPO, RunningWorker, cli_env, make_file

MiB = 1024 * 1024


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "staging_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_checked_in_completions_match_the_cli(shell: str) -> None:
    checked_in = (REPO / "completions" / f"staging-cli.{shell}").read_text()
    assert checked_in == completion_script(shell), (
        f"completions/staging-cli.{shell} is stale: run staging-cli completions {shell} > it"
    )
    assert "_STAGING_CLI_COMPLETE" in checked_in


def test_stage_json_output_and_summary(worker: RunningWorker, tmp_path: Path) -> None:
    source = make_file(tmp_path / "a.bin", 3 * MiB)
    env = cli_env(tmp_path)
    done = cli(
        "stage",
        str(source),
        "--model",
        "org/m",
        "--worker",
        worker.url,
        "--chunk-size",
        "1MiB",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert {"hashing", "file_started", "progress", "file_staged"} <= {e["event"] for e in lines}
    summary = lines[-1]
    assert summary["event"] == "staged" and summary["model"] == "org/m"
    assert summary["worker"] == worker.url
    (f,) = summary["files"]
    assert set(f) >= {"path", "sha256", "size", "skipped", "resumed_from", "bytes_sent"}
    assert f["bytes_sent"] == 3 * MiB and not f["skipped"]
    again = cli("stage", str(source), "-m", "org/m", "-w", worker.url, "--json", env=env)
    assert json.loads(again.stdout.splitlines()[-1])["files"][0]["skipped"] is True


def test_plain_output_when_not_a_terminal(worker: RunningWorker, tmp_path: Path) -> None:
    source = make_file(tmp_path / "a.bin", MiB)
    done = cli("stage", str(source), "-m", "m", "-w", worker.url, env=cli_env(tmp_path))
    assert done.returncode == 0
    assert "staging " in done.stderr and "\x1b[" not in done.stderr
    assert "is staged and loaded on" in done.stdout
    quiet = cli("stage", str(source), "-m", "m", "-w", worker.url, "-q", env=cli_env(tmp_path))
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_config_file_env_and_flag_precedence(worker: RunningWorker, tmp_path: Path) -> None:
    source = make_file(tmp_path / "a.bin", MiB)
    env = cli_env(tmp_path)
    config = tmp_path / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    # the config file alone supplies the worker and the model
    config.write_text(
        f'worker = "{worker.url}"\nmodel = "from/file"\n[commands.stage]\nchunk_size = "512KiB"\n'
    )
    done = cli("stage", str(source), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["model"] == "from/file"
    # the environment beats the file, the flag beats both
    env["STAGING_CLI_MODEL"] = "from/env"
    done = cli("stage", str(source), "--json", env=env)
    assert json.loads(done.stdout.splitlines()[-1])["model"] == "from/env"
    done = cli("stage", str(source), "--json", "--model", "from/flag", env=env)
    assert json.loads(done.stdout.splitlines()[-1])["model"] == "from/flag"
    # a broken config file is a usage error with a sentence
    config.write_text("[commands.nope]\nx = 1\n")
    bad = cli("stage", str(source), env=env)
    assert bad.returncode == 2 and "no command 'nope'" in bad.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "../etc"], 2, "'..' segment"),
        (["--model", "m", "--chunk-size", "lots"], 2, "is not a size"),
        (["--model", "m", "--sha256", "xyz"], 2, "not a sha256"),
        (
            ["--model", "m", "--worker", "http://127.0.0.1:9", "--stall-window", "1"],
            1,
            "no progress",
        ),
    ],
)
def test_exit_codes_and_sentences(
    worker: RunningWorker, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    source = make_file(tmp_path / "a.bin", 1024)
    done = cli("stage", str(source), "--worker", worker.url, *args, env=cli_env(tmp_path))
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_file_is_a_usage_error(worker: RunningWorker, tmp_path: Path) -> None:
    done = cli(
        "stage", str(tmp_path / "nope.gguf"), "-m", "m", "-w", worker.url, env=cli_env(tmp_path)
    )
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_status_lists_uploads_and_blobs(worker: RunningWorker, tmp_path: Path) -> None:
    source = make_file(tmp_path / "a.bin", MiB)
    env = cli_env(tmp_path)
    assert cli("stage", str(source), "-m", "m", "-w", worker.url, "-q", env=env).returncode == 0
    done = cli("status", "--worker", worker.url, "--json", env=env)
    body = json.loads(done.stdout)
    assert [b["size"] for b in body["blobs"]] == [MiB]
    table = cli("status", "--worker", worker.url, env=env)
    assert "blobs" in table.stdout and "sha256:" in table.stdout


def test_worker_refuses_public_address_without_token(tmp_path: Path) -> None:
    done = cli(
        "worker",
        "--dir",
        str(tmp_path / "w"),
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        env=cli_env(tmp_path),
    )
    assert done.returncode == 2 and "without a token" in done.stderr


def test_help_names_every_variable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "staging_cli", "stage", "--help"],
        capture_output=True,
        text=True,
        env={**cli_env(Path("/nonexistent")), "COLUMNS": "200"},
    )
    for var in (
        "STAGING_CLI_WORKER",
        "STAGING_CLI_TOKEN",
        "STAGING_CLI_CHUNK_SIZE",
        "STAGING_CLI_MODEL",
    ):
        assert var in done.stdout


def test_completion_script_completes_commands_and_options() -> None:
    env = {**cli_env(Path("/nonexistent")), "_STAGING_CLI_COMPLETE": "complete_bash"}
    words = subprocess.run(
        [sys.executable, "-m", "staging_cli"],
        capture_output=True,
        text=True,
        env={**env, "COMP_WORDS": "staging-cli st", "COMP_CWORD": "1"},
    )
    assert words.stdout.split() == ["stage", "status"]
    options = subprocess.run(
        [sys.executable, "-m", "staging_cli"],
        capture_output=True,
        text=True,
        env={**env, "COMP_WORDS": "staging-cli stage --ch", "COMP_CWORD": "2"},
    )
    assert options.stdout.split() == ["--chunk-size", "--checksum"]
