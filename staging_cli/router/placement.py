"""Which worker gets a cold model: pure logic over what each worker's ``GET /status`` says.

The rules, in order:

1. a reachable worker where the model, with the same files, is already ``READY`` (or
   ``LOADING``: join that load rather than start another), the least busy one if several;
2. else the worker that already holds the most of the model's bytes: finished blobs, plus the
   offset of uploads in progress (which the stager resumes);
3. but only a worker whose disk can take what it lacks: ``free - reserved - min_free`` must
   cover every file it neither holds nor is already receiving (an upload in progress reserved
   its remaining bytes when it was created);
4. among equals, the least busy: one with a free model slot before one at its ``max_loaded``
   (which would unload its least recently used idle model to make room), then fewest loaded
   models, then fewest requests the router has in flight to it, then the most usable free
   space, then the URL (so the choice is stable).

Unreachable workers are never chosen. :func:`place` returns a :class:`Placement` whose
``reason`` is a sentence for logs and progress bodies, or raises
:class:`~staging_cli.errors.InsufficientStorage` (nothing fits; the message lists every worker's
free space and what it would need) or :class:`~staging_cli.errors.WorkerUnreachable` (no worker
answered).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..config import format_size
from ..errors import InsufficientStorage, WorkerUnreachable

__all__ = ["OCCUPYING_STATES", "Placement", "WorkerView", "place"]

READY = "READY"
LOADING = "LOADING"
# States in which a model holds a worker's memory: what loaded_count and max_loaded count.
OCCUPYING_STATES = frozenset({READY, LOADING})


def _hex(digest: str) -> str:
    return digest.lower().removeprefix("sha256:")


@dataclass(frozen=True)
class WorkerView:
    """What placement knows of one worker (built from its ``GET /status`` by the router)."""

    url: str
    reachable: bool = True
    free: int = 0  # bytes free on the store's disk
    reserved: int = 0  # bytes uploads in progress still need
    min_free: int = 0  # bytes the worker always keeps free
    blobs: frozenset[str] = frozenset()  # sha256 hex of finished blobs
    uploads: Mapping[str, int] = field(default_factory=dict, hash=False)  # sha256 -> offset
    models: Mapping[str, str] = field(default_factory=dict, hash=False)  # name -> state
    model_files: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False)
    loaded_count: int = 0
    in_flight: int = 0  # requests the router has in flight to this worker
    max_loaded: int | None = None  # the worker's --max-loaded (None: no limit)
    error: str = ""  # why it is unreachable

    @property
    def at_capacity(self) -> bool:
        """A new model would make the worker unload another one first."""
        return self.max_loaded is not None and self.loaded_count >= self.max_loaded

    @property
    def available(self) -> int:
        """Bytes a new upload may still claim."""
        return self.free - self.reserved - self.min_free

    @classmethod
    def unreachable(cls, url: str, error: str = "") -> WorkerView:
        return cls(url, reachable=False, error=error)

    @classmethod
    def from_status(
        cls,
        url: str,
        status: Mapping[str, Any],
        index: Sequence[Mapping[str, Any]] | None = None,
        *,
        in_flight: int = 0,
        max_loaded: int | None = None,
    ) -> WorkerView:
        """From a staging-cli worker's ``GET /status`` body; its ``models`` list (present when
        the worker loads models) is used unless ``index`` (``POST /v2/repository/index``)
        is given, and its ``max_loaded`` unless ``max_loaded`` is. Missing or malformed parts
        read as empty, never as an error."""
        disk = status.get("disk")
        disk = disk if isinstance(disk, Mapping) else {}
        blobs = frozenset(
            _hex(b["digest"])
            for b in _list(status.get("blobs"))
            if isinstance(b, Mapping) and isinstance(b.get("digest"), str)
        )
        uploads: dict[str, int] = {}
        for u in _list(status.get("uploads")):
            if isinstance(u, Mapping) and isinstance(u.get("sha256"), str):
                digest = _hex(u["sha256"])
                uploads[digest] = max(uploads.get(digest, 0), _int(u.get("offset")))
        models: dict[str, str] = {}
        model_files: dict[str, frozenset[str]] = {}
        entries = index if index is not None else _list(status.get("models"))
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                continue
            models[entry["name"]] = str(entry.get("state", ""))
            files = entry.get("files")
            if isinstance(files, list):
                model_files[entry["name"]] = frozenset(_hex(f) for f in files if isinstance(f, str))
        worker_max = _int(status.get("max_loaded")) or None
        return cls(
            url,
            reachable=True,
            free=_int(disk.get("free")),
            reserved=_int(disk.get("reserved")),
            min_free=_int(disk.get("min_free")),
            blobs=blobs,
            uploads=uploads,
            models=models,
            model_files=model_files,
            loaded_count=sum(1 for s in models.values() if s in OCCUPYING_STATES),
            in_flight=in_flight,
            max_loaded=max_loaded if max_loaded is not None else worker_max,
        )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class Placement:
    """The chosen worker and a sentence saying why."""

    worker: str
    reason: str


@dataclass(frozen=True)
class _Fit:
    """One worker measured against one model."""

    view: WorkerView
    held: int  # bytes of the model the worker has (blobs + upload offsets)
    whole: int  # files held as finished blobs
    lacking: int  # bytes still to send
    to_reserve: int  # bytes of files with no upload in progress yet

    @property
    def fits(self) -> bool:
        return self.to_reserve == 0 or self.to_reserve <= self.view.available

    def busy_key(self) -> tuple[bool, int, int, int, str]:
        v = self.view
        return (v.at_capacity, v.loaded_count, v.in_flight, -v.available, v.url)


def _measure(view: WorkerView, files: Mapping[str, int]) -> _Fit:
    held = whole = lacking = to_reserve = 0
    for digest, size in files.items():
        if digest in view.blobs:
            held += size
            whole += 1
        elif digest in view.uploads:
            offset = min(view.uploads[digest], size)
            held += offset
            lacking += size - offset
        else:
            lacking += size
            to_reserve += size
    return _Fit(view, held, whole, lacking, to_reserve)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tiebreak(best: _Fit, others: Sequence[_Fit]) -> str:
    """What set ``best`` apart from the runner-up among equally placed workers."""
    if not others:
        return ""
    b, r = best.view, others[0].view
    if r.at_capacity and not b.at_capacity:
        return f", and a free model slot ({r.url} is at its max_loaded of {r.max_loaded})"
    if b.loaded_count < r.loaded_count:
        return f", and the fewest loaded models ({b.loaded_count})"
    if b.in_flight < r.in_flight:
        return (
            f", and as few loaded models ({b.loaded_count}) as any but the fewest requests "
            f"in flight ({b.in_flight})"
        )
    if b.available > r.available:
        return ", and the most free space among equally busy workers"
    return f", tied with {r.url} (first by URL)"


def place(model: str, files: Mapping[str, int], workers: Iterable[WorkerView]) -> Placement:
    """Choose the worker for ``model``, made of ``files`` (sha256 -> size in bytes)."""
    wanted = {_hex(d): size for d, size in files.items()}
    total = sum(wanted.values())
    views = list(workers)
    reachable = [v for v in views if v.reachable]
    if not reachable:
        if not views:
            raise WorkerUnreachable(f"no worker is configured to load {model} on: add a worker")
        listed = "; ".join(f"{v.url} ({v.error})" if v.error else v.url for v in views)
        raise WorkerUnreachable(
            f"no worker is reachable to load {model}: {listed}; check that the workers are "
            "running and reachable from the router"
        )

    # 1. already loaded (or loading) with the same files: join it.
    present = [
        v
        for v in reachable
        if v.models.get(model) in OCCUPYING_STATES
        and v.model_files.get(model, frozenset(wanted)) == frozenset(wanted)
    ]
    if present:
        present.sort(key=lambda v: (v.models[model] != READY, v.in_flight, v.loaded_count, v.url))
        chosen = present[0]
        if chosen.models[model] == READY:
            return Placement(chosen.url, f"{chosen.url} already has {model} loaded (READY)")
        return Placement(chosen.url, f"{chosen.url} is already loading {model}: joining that load")

    fits = [_measure(v, wanted) for v in reachable]
    candidates = [f for f in fits if f.fits]
    if not candidates:
        _refuse(model, total, fits, [v for v in views if not v.reachable])

    # 2-4. most bytes held, then least busy.
    candidates.sort(key=lambda f: (-f.held, *f.busy_key()))
    best = candidates[0]
    peers = [f for f in candidates[1:] if f.held == best.held]
    v = best.view
    n = len(wanted)
    if best.lacking == 0:
        reason = f"{v.url} already holds all {_plural(n, 'file')} ({format_size(total)})"
    elif best.held > 0:
        parts = []
        if best.whole:
            parts.append(f"{best.whole} of {n} files whole")
        if best.held > sum(wanted[d] for d in wanted if d in v.blobs):
            parts.append("uploads in progress")
        if best.to_reserve == 0:
            rest = "its uploads in progress already reserved the rest"
        elif best.to_reserve == best.lacking:
            rest = (
                f"has {format_size(v.available)} free for the remaining {format_size(best.lacking)}"
            )
        else:
            rest = (
                f"has {format_size(v.available)} free for the {format_size(best.to_reserve)} "
                "its uploads in progress have not reserved"
            )
        reason = (
            f"{v.url} already holds {format_size(best.held)} of {format_size(total)} "
            f"({' and '.join(parts)}), and {rest}"
        )
    else:
        reason = f"{v.url} has {format_size(v.available)} free for {format_size(total)}"
    reason += _tiebreak(best, peers)
    if v.at_capacity:
        reason += (
            f" (at its max_loaded of {v.max_loaded}, it unloads its least recently used idle "
            "model to make room)"
        )
    return Placement(v.url, reason)


def _refuse(
    model: str, total: int, fits: Sequence[_Fit], unreachable: Sequence[WorkerView]
) -> NoReturn:
    details = []
    for f in sorted(fits, key=lambda f: f.view.url):
        v = f.view
        held = f" (holds {format_size(f.held)})" if f.held else ""
        details.append(
            f"{v.url} has {format_size(max(v.available, 0))} free and needs "
            f"{format_size(f.to_reserve)}{held}"
        )
    details += [
        f"{v.url} is unreachable" + (f" ({v.error})" if v.error else "") for v in unreachable
    ]
    raise InsufficientStorage(
        f"no worker has room for {model} ({format_size(total)}): {'; '.join(details)}; free "
        "space on a worker (staging-cli gc) or add one",
        status=507,
    )
