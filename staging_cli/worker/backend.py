"""Backend processes: one inference server per loaded model, started from a command template.

Like llama-swap's ``cmd``, the worker is given a command template such as
``llama-server -m {model_path} --port {port}``. The template is split with :func:`shlex.split`
first and the placeholders are filled in per argument afterwards, so a value (a path, a model
name) can never become a second argument or reach a shell: no shell is involved at all.

Placeholders: ``{model_path}`` (the blob path of the model's first file), ``{model_dir}`` (a
directory of symlinks named after the model's files, for backends that find companion files by
name, e.g. split GGUF), ``{port}`` (a free loopback port), ``{model}`` (the model's name), plus
any key of the load request's ``backend`` parameters. Braces that do not hold an identifier
(JSON in an argument, say) are left alone.

A backend is started in its own session (so it leads a new process group) and is healthy once
``GET http://127.0.0.1:{port}/health`` answers 200. Stopping it signals the whole group: SIGTERM,
then SIGKILL after a grace period, so helper processes the backend spawned go too. Every path
out of :meth:`Backend.start` other than success (failure, timeout, cancellation) stops the
process before it returns: a failed or abandoned load never leaves a process running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from ..errors import LoadError, LoadTimeout, UsageError

log = logging.getLogger("staging_cli.worker.backend")

BUILTIN_PLACEHOLDERS = ("model_path", "model_dir", "port", "model")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
TAIL_LINES = 20


def parse_template(template: str) -> list[str]:
    """Split a command template into arguments; refuses empty or unparsable templates."""
    try:
        argv = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"the backend command {template!r} does not parse: {exc}") from exc
    if not argv:
        raise UsageError(
            "the backend command is empty: give a command such as "
            "'llama-server -m {model_path} --port {port}'"
        )
    return argv


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return {m.group(1) for arg in parse_template(template) for m in _PLACEHOLDER_RE.finditer(arg)}


def render_command(template: str, values: Mapping[str, str]) -> list[str]:
    """The argument vector for ``template`` with its placeholders filled in."""
    argv = parse_template(template)

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            known = ", ".join("{" + k + "}" for k in sorted(values))
            raise LoadError(
                f"the backend command uses {{{key}}}, which is not a placeholder here; "
                f"known placeholders are {known} (extra ones come from the load request's "
                "backend parameters)"
            )
        return values[key]

    return [_PLACEHOLDER_RE.sub(fill, arg) for arg in argv]


def free_loopback_port() -> int:
    """A port that was free a moment ago (the backend binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_group_alive(pgid: int) -> bool:
    """Whether any process of this process group still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def reap_orphan(pid: int, start_time: int | None, grace: float = 5.0) -> bool:
    """Stop the process group of a backend a previous worker process left behind.

    A worker killed with SIGKILL cannot stop its backends (they run in their own sessions), so
    their pids are recorded and the next worker calls this for each. The group is signalled only
    if its leader is the very process recorded (same start time), or if the leader is gone but
    the group lives on: Linux never hands out a pid that is still in use as a process group id,
    so such a group can only be the recorded one. Returns whether anything was signalled.
    """
    current = process_start_time(pid)
    if current is not None and current != start_time:
        return False  # the pid was reused by an unrelated process
    if not process_group_alive(pid):
        return False
    log.warning("stopping backend process group %d left behind by a previous worker", pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process_group_alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True


class Backend:
    """One backend process for one model: start, health wait, stop (the whole process group)."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        *,
        model: str,
        health_path: str = "/health",
        grace: float = 5.0,
        poll_interval: float = 0.1,
        on_spawn: Callable[[Backend], None] | None = None,
    ) -> None:
        self.argv = argv
        self.port = port
        self.model = model
        self.health_path = health_path
        self.grace = grace
        self.poll_interval = poll_interval
        self.on_spawn = on_spawn
        self.start_time: int | None = None
        self.url = f"http://127.0.0.1:{port}"
        self.process: asyncio.subprocess.Process | None = None
        self.stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def tail(self) -> str:
        """The backend's last output lines (stdout and stderr, merged)."""
        return "\n".join(self._tail)

    def _describe_tail(self) -> str:
        tail = self.tail()
        return f"; its last output lines:\n{tail}" if tail else "; it printed nothing"

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 (a health deadline)
        """Start the process and wait until it is healthy, or stop it and raise LoadError."""
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise LoadError(
                f"cannot start the backend for model {self.model} ({shlex.join(self.argv)}): "
                f"{exc.strerror or exc}; check --backend-cmd"
            ) from exc
        log.info("backend for %s started: pid %d, port %d", self.model, self.process.pid, self.port)
        self.start_time = process_start_time(self.process.pid)
        self._drain = asyncio.create_task(self._read_output())
        try:
            if self.on_spawn is not None:
                self.on_spawn(self)
            await self._wait_healthy(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        stream = self.process.stdout
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an overlong line: skip it, keep draining so the backend never blocks
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self._tail.append(text)
            log.debug("backend %s: %s", self.model, text)

    async def _wait_healthy(self, timeout: float) -> None:  # noqa: ASYNC109
        assert self.process is not None
        started = time.monotonic()
        deadline = started + timeout
        exited = asyncio.ensure_future(self.process.wait())
        last_status = "no answer yet"
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
                while True:
                    try:
                        response = await client.get(self.url + self.health_path)
                        if response.status_code == 200:
                            log.info(
                                "backend for %s healthy after %.1f s",
                                self.model,
                                time.monotonic() - started,
                            )
                            return
                        last_status = f"last answer {response.status_code}"
                    except httpx.HTTPError as exc:
                        last_status = f"last attempt: {type(exc).__name__}"
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LoadTimeout(
                            f"the backend for model {self.model} did not become healthy "
                            f"(GET {self.health_path} -> 200) within {timeout:.0f} s "
                            f"({last_status}); it was stopped. Raise --load-timeout-base / "
                            f"--load-timeout-per-gib if the model needs longer"
                            + self._describe_tail()
                        )
                    await asyncio.wait({exited}, timeout=min(self.poll_interval, remaining))
                    if exited.done():
                        await self._drained()
                        raise LoadError(
                            f"the backend for model {self.model} exited with code "
                            f"{self.process.returncode} before it became healthy "
                            f"({shlex.join(self.argv)})" + self._describe_tail()
                        )
        finally:
            if not exited.done():
                exited.cancel()

    async def _drained(self) -> None:
        """Give the output reader a moment to collect the last lines of an exited process."""
        if self._drain is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._drain), 1.0)

    def _signal(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def kill_now(self) -> None:
        """SIGKILL the process group without waiting (last resort; safe to call any time)."""
        self.stopping = True
        self._signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; wait for the leader."""
        if self.process is None:
            return
        self.stopping = True
        try:
            if self.process.returncode is None:
                self._signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), self.grace)
        finally:
            # Also when the leader exited on SIGTERM: helpers it left in its group must go.
            self._signal(signal.SIGKILL)
        if self.process.returncode is None:
            await self.process.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        log.info(
            "backend for %s stopped (pid %d, code %s)",
            self.model,
            self.process.pid,
            self.process.returncode,
        )

    async def wait(self) -> int:
        """Wait until the process exits; its exit code."""
        assert self.process is not None
        return await self.process.wait()
