"""The worker's model registry: which models are recorded, their load state and their backends.

A model is a name plus the blobs (by sha256) it is made of, plus optional backend parameters.
Loading one (:meth:`ModelManager.load`) verifies every blob is in the store, records the model
durably in ``DIR/models.json`` (written atomically: temp file, fsync, rename, fsync dir) and, when
the worker has a backend command, starts a backend process for it and waits until it is healthy.

States, as the KServe v2 / Triton repository index shows them::

    (absent) --load--> LOADING --healthy / no backend--> READY --unload--> UNLOADING --> (absent)
                          |                                 |
                          +--fails / times out / abandoned--+--backend exits--> UNAVAILABLE

Rules:

* Loading a READY model with the same files and backend parameters is a no-op; different ones
  replace it (the old backend is stopped first). Concurrent loads of the same model join the one
  in flight; a load with a different spec while one is in flight is refused (409).
* A load whose every caller has gone away is abandoned: its backend process is stopped. The
  load's owner (the loader, run detached from end-user requests with its own size-scaled timeout)
  is the one that decides how long a load may take; a backend nobody waits for must not keep
  loading for half an hour.
* The record is written once the blobs are verified, before the backend starts. A model whose
  backend failed stays recorded (UNAVAILABLE, with the reason): its files stay protected from
  garbage collection and a retry needs no new upload. Unloading removes the record; the blobs
  stay until ``gc``.
* After a worker restart the recorded models are listed as UNAVAILABLE ("recorded before the
  worker restarted"): backends are not restarted automatically (a restart may well be the
  consequence of a backend misbehaving), a load request brings them back.
* Without a backend command a load verifies and records the model and it is READY for staging
  purposes; inference requests for it are answered 501 by the proxy.

Keeping models loaded (both off by default: a loaded model stays loaded until unloaded)::

    READY --idle for idle_ttl s / evicted for max_loaded--> UNLOADING --> UNAVAILABLE (recorded)

* The ``/v1`` proxy counts the requests in flight per model (:meth:`ModelManager.begin_request`,
  released when the streamed answer has finished, failed or the client went away) and keeps the
  model's ``last_used`` time (monotonic: the start and end of every request, the completion of
  its load, and every repeated load request, which says someone still wants it). The index
  shows ``in_flight`` and ``idle_seconds`` (seconds since ``last_used``, 0 while a request is
  in flight; null unless READY).
* ``idle_ttl``: a READY model with a backend process, no request in flight and no use for
  ``idle_ttl`` seconds is unloaded by a background task of the manager (checking every
  ``min(idle_ttl / 4, 5)`` s).
* ``max_loaded``: the number of models with a backend process (READY or LOADING) this worker
  runs at once. A load that would exceed it first unloads the least recently used READY model
  with no request in flight (the new backend starts once the old one has stopped); when every
  loaded model is serving requests the load is refused with 503 (and ``Retry-After``). Models
  without a backend process (a worker without ``backend_cmd``) hold no memory: neither limit
  applies to them.
* A model unloaded for either reason keeps its record (UNAVAILABLE, with the reason): its files
  stay staged and protected from gc, and a load request brings it back. A model with requests
  in flight is never unloaded by these rules (an explicit unload still stops it at once). A load
  of a model whose backend is being stopped by these rules waits for the stop, then loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .. import tus
from ..budget import (
    DEFAULT_LOAD_TIMEOUT_BASE,
    DEFAULT_LOAD_TIMEOUT_CAP,
    DEFAULT_LOAD_TIMEOUT_PER_GIB,
    load_timeout,
)
from ..errors import InvalidModelName, LoadError
from . import backend as backends
from .store import Store, write_atomic

log = logging.getLogger("staging_cli.worker.models")

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
UNLOADING = "UNLOADING"

RECORD_FILE = "models.json"
MODEL_DIRS = "model-dirs"
DEFAULT_GC_MIN_AGE = 3600.0


class ModelError(Exception):
    """A refusal with the HTTP status the repository API answers with and a sentence."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds; the route sends it as Retry-After

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class FileRef:
    """One file of a model: its blob's sha256 and, optionally, the name a backend expects."""

    sha256: str
    filename: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"sha256": self.sha256}
        if self.filename is not None:
            out["filename"] = self.filename
        return out


@dataclass(frozen=True)
class ModelSpec:
    """What a load request asks for; equal specs make a repeated load a no-op."""

    files: tuple[FileRef, ...]
    backend: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, parameters: Any) -> ModelSpec:
        """From a load request's ``parameters`` object (see repository.py for the body)."""
        if not isinstance(parameters, Mapping):
            raise ModelError(400, 'the load body needs {"parameters": {"files": [<sha256>, ...]}}')
        raw_files = parameters.get("files")
        if isinstance(raw_files, str):  # KServe parameters may be scalars only: "hex,hex"
            raw_files = [part.strip() for part in raw_files.split(",") if part.strip()]
        if not isinstance(raw_files, list) or not raw_files:
            raise ModelError(
                400, '"parameters.files" must list the model\'s files by sha256 (at least one)'
            )
        files: list[FileRef] = []
        for item in raw_files:
            if isinstance(item, str):
                digest, filename = item, None
            elif isinstance(item, Mapping) and isinstance(item.get("sha256"), str):
                digest, filename = item["sha256"], item.get("filename")
            else:
                raise ModelError(
                    400, 'each file is a sha256 hex string or {"sha256": ..., "filename": ...}'
                )
            digest = digest.lower().removeprefix("sha256:")
            try:
                tus.validate_sha256(digest)
                if filename is not None:
                    tus.validate_filename(str(filename))
            except tus.HeaderError as exc:
                raise ModelError(400, str(exc)) from exc
            files.append(FileRef(digest, None if filename is None else str(filename)))
        if len({f.sha256 for f in files}) != len(files):
            raise ModelError(400, "a file is listed twice in parameters.files")
        raw_backend = parameters.get("backend") or {}
        if not isinstance(raw_backend, Mapping):
            raise ModelError(400, '"parameters.backend" must be an object of placeholder values')
        params: list[tuple[str, str]] = []
        for key, value in raw_backend.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ModelError(400, f"backend parameter {key!r} is not an identifier")
            if key in backends.BUILTIN_PLACEHOLDERS:
                raise ModelError(400, f"backend parameter {key!r} is set by the worker itself")
            if isinstance(value, bool):
                value = "true" if value else "false"
            if not isinstance(value, str | int | float):
                raise ModelError(400, f"backend parameter {key!r} must be a string or a number")
            params.append((key, str(value)))
        return cls(tuple(files), tuple(sorted(params)))

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "backend": dict(self.backend)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelSpec:
        return cls.parse(raw)


@dataclass
class Model:
    """A recorded model as the running worker knows it."""

    name: str
    spec: ModelSpec
    state: str = UNAVAILABLE
    reason: str = ""
    backend: backends.Backend | None = None
    backend_died: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    waiters: int = 0
    recorded: float = 0.0
    in_flight: int = 0  # /v1 requests being proxied to the backend right now
    last_used: float = 0.0  # time.monotonic() of the last request start/end or load completion
    eviction: asyncio.Task[None] | None = field(default=None, repr=False)

    def idle_seconds(self, now: float | None = None) -> float | None:
        """Seconds since the model was last used; 0 while serving; None unless READY."""
        if self.state != READY:
            return None
        if self.in_flight > 0:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self.last_used)

    def public(self) -> dict[str, Any]:
        idle = self.idle_seconds()
        out: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "files": [f.sha256 for f in self.spec.files],
            "in_flight": self.in_flight,
            "idle_seconds": None if idle is None else round(idle, 3),
        }
        if self.backend is not None and self.state == READY:
            out["backend_url"] = self.backend.url
            out["pid"] = self.backend.pid
        return out


def _check_name(name: str) -> str:
    try:
        return tus.validate_model_name(name)
    except InvalidModelName as exc:
        raise ModelError(400, str(exc)) from exc


class RequestLease:
    """One /v1 request in flight on a model; :meth:`release` it exactly once (more is a no-op)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._released = False
        model.in_flight += 1
        model.last_used = time.monotonic()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.model.in_flight -= 1
        self.model.last_used = time.monotonic()


class ModelManager:
    """Recorded models, their states and backend processes, over one opened store.

    ``backend_cmd`` is the command template (see :mod:`.backend`); None means no backend.
    ``idle_ttl`` (seconds) unloads backends nobody used for that long; ``max_loaded`` caps the
    number of backend processes, unloading the least recently used idle one to make room (see
    the module docstring). Call :meth:`open` once (it reads ``models.json``) and :meth:`aclose`
    at shutdown (it stops every backend). All methods run on the worker's event loop.
    """

    def __init__(
        self,
        store: Store,
        backend_cmd: str | None = None,
        *,
        timeout_base: float = DEFAULT_LOAD_TIMEOUT_BASE,
        timeout_per_gib: float = DEFAULT_LOAD_TIMEOUT_PER_GIB,
        timeout_cap: float = DEFAULT_LOAD_TIMEOUT_CAP,
        stop_grace: float = 5.0,
        idle_ttl: float | None = None,
        max_loaded: int | None = None,
    ) -> None:
        if idle_ttl is not None and not idle_ttl > 0:
            raise ValueError(f"idle_ttl must be a positive number of seconds, not {idle_ttl!r}")
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be 1 or more, not {max_loaded!r}")
        self.store = store
        self.backend_cmd = backend_cmd
        if backend_cmd is not None:
            backends.parse_template(backend_cmd)  # refuse an unparsable template at startup
        self.timeout_base = timeout_base
        self.timeout_per_gib = timeout_per_gib
        self.timeout_cap = timeout_cap
        self.stop_grace = stop_grace
        self.idle_ttl = idle_ttl
        self.max_loaded = max_loaded
        self._reaper: asyncio.Task[None] | None = None
        self._evictions: set[asyncio.Task[None]] = set()
        self._models: dict[str, Model] = {}
        self._closed = False
        self._opened = False
        self._http: aiohttp.ClientSession | None = None
        self.loads_started = 0  # loads that did work (not no-ops or joins): /status shows it
        self.evictions = 0  # backends stopped by idle_ttl or max_loaded: /status shows it

    def http_session(self) -> aiohttp.ClientSession:
        """The session the /v1 proxy talks to backends with, made on first use (inside the
        running loop) and closed by :meth:`aclose`: 10 s to connect, no read timeout
        (generation is slow), no connection limit, no cookies, no automatic decompression (the
        backend's bytes are relayed unchanged) and none of aiohttp's automatic request headers
        (the client's are relayed)."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=None, sock_connect=10.0, sock_read=None
                ),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._http

    # -- persistence -------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.store.root / RECORD_FILE

    def open(self) -> None:
        """Read the recorded models; they start UNAVAILABLE until loaded again."""
        self._opened = True
        try:
            raw = json.loads(self.record_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error(
                "cannot read %s (%s); starting with no recorded models", self.record_path, exc
            )
            return
        for name, entry in (raw.get("models") or {}).items():
            try:
                spec = ModelSpec.from_json(entry)
                _check_name(name)
            except ModelError as exc:
                log.error("dropping unreadable model record %r: %s", name, exc)
                continue
            missing = [f.sha256 for f in spec.files if self.store.blob_path(f.sha256) is None]
            reason = (
                "recorded before the worker restarted; backends are not restarted "
                "automatically: load it again"
            )
            if missing:
                reason = (
                    f"recorded, but blob sha256:{missing[0]} is no longer in the store: "
                    "stage it again, then load"
                )
            model = Model(
                name, spec, UNAVAILABLE, reason, recorded=float(entry.get("recorded", 0.0))
            )
            self._models[name] = model
            left = entry.get("backend_process")
            if isinstance(left, dict) and isinstance(left.get("pid"), int):
                start_time = left.get("start_time")
                if backends.reap_orphan(
                    left["pid"],
                    start_time if isinstance(start_time, int) else None,
                    self.stop_grace,
                ):
                    model.reason += (
                        f" (its backend, pid {left['pid']}, left running by the previous "
                        "worker process, was stopped)"
                    )
        self._save()

    def _save(self) -> None:
        models: dict[str, Any] = {}
        for m in sorted(self._models.values(), key=lambda m: m.name):
            entry: dict[str, Any] = {**m.spec.to_json(), "recorded": m.recorded}
            b = m.backend
            if b is not None and b.pid is not None and b.returncode is None:
                # So that the next worker can stop it if this one dies without cleaning up.
                entry["backend_process"] = {"pid": b.pid, "start_time": b.start_time}
            models[m.name] = entry
        body = {"version": 1, "models": models}
        write_atomic(self.record_path, json.dumps(body, indent=1).encode())

    # -- queries -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the worker's ``GET /status`` adds about models."""
        return {
            "models": self.index(),
            "loads_started": self.loads_started,
            "evictions": self.evictions,
            "idle_ttl": self.idle_ttl,
            "max_loaded": self.max_loaded,
        }

    def index(self) -> list[dict[str, Any]]:
        """The repository index: every recorded model, sorted by name."""
        if not self._opened:
            self.open()
        return [m.public() for _, m in sorted(self._models.items())]

    def get(self, name: str) -> Model | None:
        return self._models.get(name)

    def referenced_blobs(self) -> set[str]:
        return {f.sha256 for m in self._models.values() for f in m.spec.files}

    def begin_request(self, model: Model) -> RequestLease:
        """Count a request in flight on ``model`` (the /v1 proxy); release the lease when done.

        Call it in the same step as the READY check (no await in between): a model with a
        request in flight is never unloaded for idleness or to make room.
        """
        return RequestLease(model)

    # -- load --------------------------------------------------------------------------------

    def _verify(self, name: str, spec: ModelSpec) -> int:
        """Every blob present; returns the model's total size."""
        total = 0
        for ref in spec.files:
            size = self.store.blob_size(ref.sha256)
            if size is None:
                busy = self.store.find(ref.sha256)
                detail = (
                    f"its upload is in progress ({busy[0].record.offset} of "
                    f"{busy[0].record.length} bytes): finish staging it, then load"
                    if busy
                    else "stage it first (staging-cli stage), then load"
                )
                raise ModelError(
                    409 if busy else 404,
                    f"model {name} names blob sha256:{ref.sha256}, which this worker does not "
                    f"have: {detail}",
                )
            total += size
        return total

    async def load(self, name: str, spec: ModelSpec) -> Model:
        """Load (or join the load of) ``name``; returns the model once READY.

        Raises ModelError for requests that cannot work (bad name, missing blob, conflicting
        load) and LoadError/LoadTimeout when the backend fails.
        """
        if self._closed:
            raise ModelError(503, "the worker is shutting down")
        if not self._opened:
            self.open()
        _check_name(name)
        size = self._verify(name, spec)
        model = self._models.get(name)
        while model is not None and model.eviction is not None and not model.eviction.done():
            # Its backend is being stopped for idleness or to make room: load it afterwards.
            await asyncio.shield(model.eviction)
            if self._closed:
                raise ModelError(503, "the worker is shutting down")
            model = self._models.get(name)
        if model is not None and model.task is not None and not model.task.done():
            if model.spec != spec:
                raise ModelError(
                    409,
                    f"model {name} is being loaded with other files right now: wait for that "
                    "load to finish (or unload it), then load again",
                )
            return await self._join(model, model.task)
        if model is not None and model.state == UNLOADING:
            raise ModelError(409, f"model {name} is being unloaded: load it again afterwards")
        if model is not None and model.state == READY and model.spec == spec:
            model.last_used = time.monotonic()  # someone still wants it
            return model  # same files, same parameters: nothing to do
        # From here to create_task there is no await: the record, the state and the task
        # appear together, so a concurrent load joins and gc sees the blobs as referenced.
        making_room = self._make_room(name)
        if model is None:
            model = Model(name, spec)
            self._models[name] = model
        model.spec = spec
        model.state = LOADING
        model.reason = ""
        model.backend_died = False
        model.recorded = time.time()
        self._save()  # with the old backend's pid still in it, until that one is stopped
        old_backend, model.backend = model.backend, None
        self._stop_watching(model)
        self.loads_started += 1
        self._ensure_reaper()
        model.task = asyncio.create_task(
            self._run_load(model, spec, size, old_backend, making_room)
        )
        return await self._join(model, model.task)

    async def _join(self, model: Model, task: asyncio.Task[None]) -> Model:
        model.waiters += 1
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise LoadError(
                    f"the load of model {model.name} was cancelled: "
                    f"{model.reason or 'it was unloaded'}"
                ) from None
            raise
        finally:
            model.waiters -= 1
            if model.waiters == 0 and not task.done():
                log.warning("load of %s abandoned by every caller; stopping it", model.name)
                model.reason = "the load was abandoned: every caller went away"
                task.cancel()
        return model

    async def _run_load(
        self,
        model: Model,
        spec: ModelSpec,
        size: int,
        old: backends.Backend | None,
        making_room: list[asyncio.Task[None]] | None = None,
    ) -> None:
        backend: backends.Backend | None = None
        try:
            if old is not None:
                await old.stop()
            if making_room:
                # The backends evicted for this load stop first: never more than max_loaded.
                await asyncio.gather(*(asyncio.shield(t) for t in making_room))
            if self.backend_cmd is None:
                model.state = READY
                model.last_used = time.monotonic()
                return
            port = backends.free_loopback_port()
            values = {
                **dict(spec.backend),
                "model": model.name,
                "port": str(port),
                "model_path": str(self.store.blob_path(spec.files[0].sha256)),
            }
            if "model_dir" in backends.placeholders(self.backend_cmd):
                values["model_dir"] = str(self._model_dir(model.name, spec))
            argv = backends.render_command(self.backend_cmd, values)
            backend = backends.Backend(
                argv,
                port,
                model=model.name,
                grace=self.stop_grace,
                on_spawn=lambda _: self._save(),
            )
            model.backend = backend
            timeout = load_timeout(size, self.timeout_base, self.timeout_per_gib, self.timeout_cap)
            await backend.start(timeout)  # stops the process itself on any failure
            model.state = READY
            model.last_used = time.monotonic()
            model.watcher = asyncio.create_task(self._watch(model, backend))
        except LoadError as exc:
            model.state = UNAVAILABLE
            model.reason = str(exc)
            model.backend = None
            self._save()
            raise
        except asyncio.CancelledError:
            if backend is not None:
                backend.kill_now()  # start() already stopped it; this is belt and braces
            model.state = UNAVAILABLE
            model.reason = model.reason or "the load was cancelled"
            model.backend = None
            with contextlib.suppress(OSError):
                self._save()
            raise
        except Exception as exc:
            if backend is not None:
                await backend.stop()
            model.state = UNAVAILABLE
            model.reason = f"the load failed unexpectedly: {exc!r}"
            model.backend = None
            with contextlib.suppress(OSError):
                self._save()
            raise LoadError(model.reason) from exc

    def _model_dir(self, name: str, spec: ModelSpec) -> Path:
        """A directory of symlinks named like the model's files (never named after the model)."""
        directory = self.store.root / MODEL_DIRS / hashlib.sha256(name.encode()).hexdigest()[:32]
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        for ref in spec.files:
            target = self.store.blob_path(ref.sha256)
            assert target is not None
            (directory / (ref.filename or ref.sha256)).symlink_to(target)
        return directory

    async def _watch(self, model: Model, backend: backends.Backend) -> None:
        code = await backend.wait()
        if backend.stopping or model.backend is not backend:
            return
        model.state = UNAVAILABLE
        model.backend_died = True
        tail = backend.tail()
        model.reason = f"the backend exited with code {code}: load the model again" + (
            f"; its last output lines:\n{tail}" if tail else ""
        )
        log.error("backend for %s exited with code %s", model.name, code)
        backend.kill_now()  # its helpers, if any

    def _stop_watching(self, model: Model) -> None:
        if model.watcher is not None:
            model.watcher.cancel()
            model.watcher = None

    # -- idle ttl and max_loaded ---------------------------------------------------------------

    def _occupies_a_slot(self, model: Model) -> bool:
        """Whether ``model`` counts against max_loaded: a backend process, READY or LOADING."""
        return self.backend_cmd is not None and model.state in (READY, LOADING)

    def _evictable(self, model: Model) -> bool:
        return (
            model.state == READY
            and model.backend is not None
            and model.in_flight == 0
            and (model.task is None or model.task.done())
            and (model.eviction is None or model.eviction.done())
        )

    def _make_room(self, name: str) -> list[asyncio.Task[None]]:
        """Before a load of ``name`` starts a backend: evict LRU idle models beyond max_loaded.

        Synchronous (no await): the victims are UNLOADING, and so no longer counted or
        served, before the caller marks its own model LOADING. Returns the eviction tasks the
        load waits for before it starts its backend. Raises ModelError(503) when the slots are
        all held by models serving requests (or loading).
        """
        if self.max_loaded is None or self.backend_cmd is None:
            return []
        others = [m for m in self._models.values() if m.name != name]
        occupied = [m for m in others if self._occupies_a_slot(m)]
        excess = len(occupied) + 1 - self.max_loaded
        if excess <= 0:
            return []
        candidates = sorted((m for m in occupied if self._evictable(m)), key=lambda m: m.last_used)
        if len(candidates) < excess:
            busy = len(occupied) - len(candidates)
            detail = (
                f"all {len(occupied)} loaded models are serving requests"
                if all(m.state == READY for m in occupied)
                else f"{busy} of the {len(occupied)} loaded models are serving requests or loading"
            )
            raise ModelError(
                503,
                f"cannot load model {name}: this worker runs at most {self.max_loaded} "
                f"model{'s' if self.max_loaded != 1 else ''} at once (--max-loaded) and "
                f"{detail}; retry shortly or raise --max-loaded",
                retry_after=5,
            )
        reason = (
            f"unloaded to make room for model {name} (--max-loaded {self.max_loaded}: it was "
            "the least recently used); its files stay staged: load it again"
        )
        return [self._begin_eviction(m, reason) for m in candidates[:excess]]

    def _begin_eviction(self, model: Model, reason: str) -> asyncio.Task[None]:
        """Mark ``model`` UNLOADING now and stop its backend in a task; the record is kept."""
        log.info("unloading model %s: %s", model.name, reason)
        model.state = UNLOADING
        model.reason = reason
        self._stop_watching(model)
        self.evictions += 1
        task = asyncio.create_task(self._finish_eviction(model, model.backend, reason))
        model.eviction = task
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)
        return task

    async def _finish_eviction(
        self, model: Model, backend: backends.Backend | None, reason: str
    ) -> None:
        try:
            if backend is not None:
                await backend.stop()
        finally:
            if backend is not None:
                backend.kill_now()  # also if the stop was interrupted
            if model.backend is backend:
                model.backend = None
            if model.state == UNLOADING and model.eviction is asyncio.current_task():
                model.state = UNAVAILABLE
                model.reason = reason
            if self._models.get(model.name) is model:
                with contextlib.suppress(OSError):
                    self._save()

    def _ensure_reaper(self) -> None:
        """Start the idle-ttl task (once, on the first load that does work)."""
        if self.idle_ttl is None or self._closed:
            return
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_idle(self.idle_ttl))

    def check_idle(self, now: float | None = None) -> list[str]:
        """Unload every model idle for longer than idle_ttl; the names of those unloaded."""
        ttl = self.idle_ttl
        if ttl is None or self._closed:
            return []
        now = time.monotonic() if now is None else now
        unloaded = []
        for model in list(self._models.values()):
            idle = model.idle_seconds(now)
            if idle is not None and idle >= ttl and self._evictable(model):
                self._begin_eviction(
                    model,
                    f"unloaded after {idle:.0f} s without requests (--idle-ttl {ttl:g}); its "
                    "files stay staged: load it again",
                )
                unloaded.append(model.name)
        return unloaded

    async def _reap_idle(self, ttl: float) -> None:
        interval = max(0.05, min(ttl / 4, 5.0))
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                self.check_idle()
            except Exception:  # never let one bad pass end idle unloading for good
                log.exception("idle check failed")

    # -- unload ------------------------------------------------------------------------------

    async def unload(self, name: str) -> None:
        """Stop the model's backend (or its load in flight) and remove its record."""
        _check_name(name)
        if not self._opened:
            self.open()
        model = self._models.get(name)
        while model is not None and model.eviction is not None and not model.eviction.done():
            await asyncio.shield(model.eviction)  # already stopping: then forget its record
            model = self._models.get(name)
        if model is None or model.state == UNLOADING:
            raise ModelError(404, f"model {name} is not loaded on this worker")
        model.state = UNLOADING
        model.reason = "unloading by request"
        self._stop_watching(model)
        if model.task is not None and not model.task.done():
            model.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LoadError):
                await model.task
        if model.backend is not None:
            backend, model.backend = model.backend, None
            await backend.stop()
        if self._models.get(name) is model:
            del self._models[name]
            self._save()
        shutil.rmtree(
            self.store.root / MODEL_DIRS / hashlib.sha256(name.encode()).hexdigest()[:32],
            ignore_errors=True,
        )

    # -- gc ----------------------------------------------------------------------------------

    def gc(self, *, dry_run: bool, min_age: float = DEFAULT_GC_MIN_AGE) -> dict[str, Any]:
        """Remove blobs no recorded model references (synchronous: no load can interleave).

        Kept: blobs of recorded models (in any state), blobs whose content an upload in
        progress is producing, and blobs younger than ``min_age`` seconds (a file staged a
        moment ago whose load request is still on its way).
        """
        if not self._opened:
            self.open()
        referenced = self.referenced_blobs()
        uploading = {u.record.sha256 for u in self.store.uploads() if u.record.sha256}
        now = time.time()
        removed: list[dict[str, Any]] = []
        kept_young: list[str] = []
        for digest, size in sorted(self.store.blobs().items()):
            if digest in referenced or digest in uploading:
                continue
            path = self.store.blob_path(digest)
            try:
                age = now - path.stat().st_mtime if path is not None else float("inf")
            except OSError:
                age = float("inf")
            if age < min_age:
                kept_young.append(digest)
                continue
            if not dry_run:
                self.store.remove_blob(digest)
            removed.append({"sha256": digest, "size": size})
        return {
            "dry_run": dry_run,
            "removed": removed,
            "bytes_freed": sum(r["size"] for r in removed),
            "kept_referenced": len(referenced & set(self.store.blobs())),
            "kept_too_young": kept_young,
            "min_age": min_age,
        }

    # -- shutdown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop every load in flight and every backend (the worker's lifespan hook)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        tasks = [m.task for m in self._models.values() if m.task is not None and not m.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, LoadError):
                await task
        # Backends being evicted are stopping already (bounded by stop_grace): let them finish.
        await asyncio.gather(*list(self._evictions), return_exceptions=True)
        running = []
        for model in self._models.values():
            self._stop_watching(model)
            if model.backend is not None:
                running.append(model.backend)
                model.backend = None
                model.state = UNAVAILABLE
                model.reason = "the worker shut down"
        try:
            await asyncio.gather(*(b.stop() for b in running))
        finally:
            for b in running:
                b.kill_now()
            with contextlib.suppress(OSError):
                self._save()
            if self._http is not None:
                await self._http.close()
                self._http = None
