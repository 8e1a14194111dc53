"""All terminal output of the CLI: rich progress on a terminal, plain lines otherwise, NDJSON
with ``--json``. The only module that imports rich; core code only emits events."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ..coldload import ColdLoadResult, JobWaiting, Loaded, Loading
from ..config import format_size
from ..stager.events import (
    Event,
    FileSkipped,
    FileStaged,
    FileStarted,
    Hashing,
    Notice,
    Retrying,
    StageResult,
    UploadProgress,
)

err_console = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


def info(message: str) -> None:
    err_console.print(message, markup=False, soft_wrap=True)


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    out.flush()


class StageRenderer:
    """Turns stager events into output; remembers where each file stood for the Ctrl-C note."""

    def __init__(self, mode: str, plain_interval: float = 5.0) -> None:
        # mode: "rich", "plain", "json" or "quiet"
        self.mode = mode
        self.plain_interval = plain_interval
        self.offsets: dict[str, tuple[int, int]] = {}
        self._last_line: dict[str, float] = {}
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    @classmethod
    def for_terminal(cls, *, json_mode: bool, quiet: bool) -> StageRenderer:
        if json_mode:
            return cls("json")
        if quiet:
            return cls("quiet")
        return cls("rich" if err_console.is_terminal else "plain")

    def __enter__(self) -> StageRenderer:
        if self.mode == "rich":
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _throttled(self, key: str, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self._last_line.get(key, 0.0) >= self.plain_interval:
            self._last_line[key] = now
            return False
        return True

    def _task(self, path: str, label: str, total: int) -> TaskID:
        assert self._progress is not None
        task = self._tasks.get(path + label)
        if task is None:
            name = path.rsplit("/", 1)[-1]
            task = self._progress.add_task(f"{label} {name}", total=total)
            self._tasks[path + label] = task
        return task

    def __call__(self, event: Event) -> None:
        if isinstance(event, UploadProgress | FileStarted):
            done = event.bytes_done if isinstance(event, UploadProgress) else event.resumed_from
            self.offsets[event.path] = (
                done,
                event.bytes_total if isinstance(event, UploadProgress) else event.size,
            )
        if self.mode == "quiet":
            return
        if self.mode == "json":
            if isinstance(event, Hashing | UploadProgress) and self._throttled(
                event.event + event.path, event.bytes_done >= event.bytes_total
            ):
                return
            print_json(event.to_dict())
            return
        if self.mode == "rich":
            self._rich(event)
        else:
            self._plain(event)

    def _rich(self, event: Event) -> None:
        assert self._progress is not None
        p = self._progress
        if isinstance(event, Hashing):
            p.update(
                self._task(event.path, "hashing", event.bytes_total), completed=event.bytes_done
            )
        elif isinstance(event, FileStarted):
            task = self._task(event.path, "staging", event.size)
            p.update(task, completed=event.resumed_from)
            if event.resumed_from:
                p.console.print(f"resuming {event.path} at {format_size(event.resumed_from)}")
        elif isinstance(event, UploadProgress):
            p.update(
                self._task(event.path, "staging", event.bytes_total), completed=event.bytes_done
            )
        elif isinstance(event, FileSkipped):
            p.console.print(
                f"{event.path}: {event.reason} (sha256 {event.sha256[:12]}), nothing to send"
            )
        elif isinstance(event, Retrying):
            p.console.print(
                f"[yellow]retrying[/] {event.path} in {event.delay:.1f}s: {event.reason}"
            )
        elif isinstance(event, Notice):
            p.console.print(f"{event.path}: {event.message}")
        else:
            self._lifecycle(event, lambda text: p.console.print(text, markup=False))

    def _plain(self, event: Event) -> None:
        if isinstance(event, Hashing):
            if not self._throttled("h" + event.path, event.bytes_done >= event.bytes_total):
                info(
                    f"hashing {event.path}: {format_size(event.bytes_done)} / {format_size(event.bytes_total)}"
                )
        elif isinstance(event, FileStarted):
            start = f", resuming at {format_size(event.resumed_from)}" if event.resumed_from else ""
            info(
                f"staging {event.path} ({format_size(event.size)}, sha256 {event.sha256[:12]}){start}"
            )
        elif isinstance(event, UploadProgress):
            if not self._throttled("u" + event.path, event.bytes_done >= event.bytes_total):
                pct = 100.0 * event.bytes_done / event.bytes_total if event.bytes_total else 100.0
                eta = f", ETA {event.eta_seconds:.0f}s" if event.eta_seconds is not None else ""
                info(
                    f"{event.path}: {format_size(event.bytes_done)} / {format_size(event.bytes_total)} "
                    f"({pct:.0f}%), {format_size(event.rate)}/s{eta}"
                )
        elif isinstance(event, FileSkipped):
            info(f"{event.path}: {event.reason} (sha256 {event.sha256[:12]}), nothing to send")
        elif isinstance(event, Retrying):
            info(f"retrying {event.path} in {event.delay:.1f}s: {event.reason}")
        elif isinstance(event, Notice):
            info(f"{event.path}: {event.message}")
        elif isinstance(event, FileStaged):
            pass
        else:
            self._lifecycle(event, info)

    def _lifecycle(self, event: Event, say: Callable[[str], None]) -> None:
        if isinstance(event, JobWaiting):
            if not self._throttled("w" + event.model, False):
                total = format_size(event.bytes_total) if event.bytes_total else "?"
                say(
                    f"waiting for {event.owner} ({event.phase}, {format_size(event.bytes_done)} / {total})"
                )
        elif isinstance(event, Loading):
            say(f"loading {event.model} on {event.worker} (timeout {event.timeout:.0f}s)")
        elif isinstance(event, Loaded):
            say(f"{event.model} is {event.state} on {event.worker}")

    def summary(self, result: StageResult | ColdLoadResult) -> None:
        if self.mode == "json":
            print_json(result.to_dict())
            return
        if self.mode == "quiet":
            return
        if isinstance(result, ColdLoadResult) and result.role == "waiter":
            print(f"another process ({result.job.get('owner')}) did the work for {result.model}")
        for f in result.files:
            what = (
                "already on the worker"
                if f.skipped
                else (
                    f"sent {format_size(f.bytes_sent)}"
                    + (f", resumed from {format_size(f.resumed_from)}" if f.resumed_from else "")
                )
            )
            print(f"staged {f.path} ({format_size(f.size)}, sha256 {f.sha256}): {what}")
        done = "staged and loaded" if getattr(result, "loaded", False) else "staged"
        print(f"model {result.model or '-'} is {done} on {result.worker}")

    def interrupted_note(self) -> str:
        parts = [
            f"{path} at {format_size(done)} of {format_size(total)}"
            for path, (done, total) in self.offsets.items()
            if done < total
        ]
        where = "; the worker keeps " + ", ".join(parts) if parts else ""
        return f"interrupted{where}: run the same command again to resume"


def status_table(status: dict[str, Any], worker: str) -> None:
    console = Console(highlight=False)
    disk = status.get("disk", {})
    console.print(
        f"worker {worker}: {format_size(disk.get('free', 0))} free, "
        f"{format_size(disk.get('reserved', 0))} reserved by uploads in progress"
    )
    uploads = status.get("uploads", [])
    if uploads:
        table = Table(
            "upload", "model", "file", "offset", "length", "progress", title="uploads in progress"
        )
        for u in uploads:
            pct = 100.0 * u["offset"] / u["length"] if u["length"] else 100.0
            table.add_row(
                u["id"][:12],
                u.get("model") or "-",
                u.get("filename") or "-",
                str(u["offset"]),
                str(u["length"]),
                f"{pct:.1f}%",
            )
        console.print(table)
    else:
        console.print("no uploads in progress")
    blobs = status.get("blobs", [])
    if blobs:
        table = Table("blob", "size", title="blobs")
        for b in blobs:
            table.add_row(b["digest"], format_size(b["size"]))
        console.print(table)
    else:
        console.print("no blobs")


def models_table(entries: list[dict[str, Any]], worker: str) -> None:
    console = Console(highlight=False)
    if not entries:
        console.print(f"worker {worker} has no models")
        return
    table = Table("model", "state", "files", "reason", title=f"models on {worker}")
    for e in entries:
        files = ", ".join(str(f)[:12] for f in e.get("files", []))
        table.add_row(str(e.get("name")), str(e.get("state")), files, str(e.get("reason") or ""))
    console.print(table)


def jobs_table(entries: list[dict[str, Any]]) -> None:
    console = Console(highlight=False)
    if not entries:
        console.print("no jobs")
        return
    table = Table("model", "worker", "status", "owner", "attempt", "phase", "progress", "error")
    for e in entries:
        total = e.get("bytes_total") or 0
        progress = f"{100.0 * e.get('bytes_done', 0) / total:.0f}%" if total else "-"
        table.add_row(
            str(e["model"]),
            str(e["worker"]),
            str(e["status"]),
            str(e.get("owner") or "-"),
            str(e.get("attempt")),
            str(e.get("phase") or ""),
            progress,
            str(e.get("error") or ""),
        )
    console.print(table)
