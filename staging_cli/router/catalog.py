"""The models the router may cold-load: what ``--models-dir`` holds, rescanned lazily.

A model is either a single file directly in the models dir, named by its file name without the
last extension (``llama-3-8b.Q4_K_M.gguf`` -> ``llama-3-8b.Q4_K_M``, ``cold.bin`` -> ``cold``,
``noext`` -> ``noext``), or a sub-folder holding a ``model.toml`` manifest::

    # models/qwen/model.toml -- every key is optional
    name = "qwen/qwen2.5-7b:q4"      # default: the folder name ("qwen")
    files = [                        # relative to the folder; no "..", not absolute
        "qwen2.5-7b-q4-00001-of-00002.gguf",  # the first file is the backend's {model_path}
        "qwen2.5-7b-q4-00002-of-00002.gguf",
    ]                                # default: every regular file directly in the folder,
                                     # sorted by name, but model.toml, hidden and temporary ones

    [parameters]                     # backend parameters sent with the worker's load
    ctx_size = 4096                  # (the load body's "parameters.backend"): identifiers
    n_gpu_layers = 99                # mapped to strings, numbers or booleans

``[backend]`` is accepted as another spelling of ``[parameters]`` (it is the load body's name
for them); giving both, or any other top-level key, refuses the manifest, so a typo never
silently drops a setting. A folder without ``model.toml`` is not a model. Manifest files may
be symlinks (a Hugging Face snapshot, say): ``..`` is refused in the names written down, where
a symlink points is the operator's choice.

Ignored: hidden names (``.x``), temporary names (``*.tmp``, ``*.part``, ``*.partial``,
``*.download``, ``*.crdownload``, ``*~``) and files still being written. A file is listed once
its (size, mtime) stayed the same across two scans at least ``stable_seconds`` apart, or once
its mtime is at least ``stable_seconds`` old. The heuristic cannot tell a stalled writer from a
finished one: for certainty, write under a temporary name and rename (curl, wget and rsync do).

A scan is one ``os.scandir`` of the dir (plus one per model folder) and a ``stat`` per file,
never a read of model bytes; it happens on access, at most every ``rescan_interval``, so models
added, changed or removed later are noticed without a restart. Manifests are parsed again only
when they change. Names are checked with :func:`staging_cli.tus.validate_model_name`; a model
that cannot be listed (bad name, bad manifest, two files claiming one name) is skipped with a
logged warning and reported by :meth:`Catalog.problems`.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from ..errors import InvalidModelName
from ..stager.digest import FileVersion
from ..tus import validate_model_name

__all__ = ["MANIFEST", "Catalog", "CatalogEntry", "CatalogProblem"]

log = logging.getLogger("staging_cli.router.catalog")

MANIFEST = "model.toml"
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".download", ".crdownload", "~")
# get() of an unknown name rescans at once, but not more often than this: a flood of requests
# for a model that does not exist must not turn into a flood of directory scans.
MISS_RESCAN_INTERVAL = 0.1

_MANIFEST_KEYS = ("name", "files", "parameters", "backend")


@dataclass(frozen=True)
class CatalogEntry:
    """One model the router may cold-load."""

    name: str
    files: tuple[Path, ...]  # in load order: the first is the backend's {model_path}
    sizes: tuple[int, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # One FileVersion per file, as scanned: a changed file gives a different version, and it is
    # the key of the stager's DigestCache, so the router can look up each file's sha256 directly.
    version: tuple[FileVersion, ...] = ()
    source: Path | None = None  # the file itself, or the folder holding model.toml

    @property
    def total_size(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class CatalogProblem:
    """Something in the models dir that could not be listed, and why (a sentence)."""

    path: Path
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Manifest:
    name: str
    files: tuple[str, ...] | None  # None: every eligible file of the folder
    parameters: Mapping[str, Any]


class _ManifestError(ValueError):
    pass


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary names, which are never models nor a model's default files."""
    return name.startswith(".") or name.endswith(TEMPORARY_SUFFIXES)


def model_name_for_file(file_name: str) -> str:
    """``llama-3-8b.Q4_K_M.gguf`` -> ``llama-3-8b.Q4_K_M``; ``noext`` -> ``noext``."""
    return PurePosixPath(file_name).stem


def _version(st: os.stat_result) -> FileVersion:
    return FileVersion(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse_manifest(text: str, folder_name: str) -> _Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _ManifestError(f"is not valid TOML ({exc})") from exc
    unknown = sorted(set(raw) - set(_MANIFEST_KEYS))
    if unknown:
        raise _ManifestError(
            f"has unknown key(s) {', '.join(unknown)}: expected name, files and [parameters]"
        )
    name = raw.get("name", folder_name)
    if not isinstance(name, str):
        raise _ManifestError('has a "name" that is not a string')
    files: tuple[str, ...] | None = None
    if "files" in raw:
        listed = raw["files"]
        if not isinstance(listed, list) or not listed:
            raise _ManifestError('has a "files" that is not a non-empty list of file names')
        checked = []
        for item in listed:
            if not isinstance(item, str) or not item:
                raise _ManifestError('lists a file in "files" that is not a non-empty string')
            path = PurePosixPath(item)
            if "\\" in item or path.is_absolute() or (item[1:2] == ":" and item[:1].isalpha()):
                raise _ManifestError(
                    f"lists {item!r}, which is absolute: name files relative to the folder"
                )
            if ".." in path.parts:
                raise _ManifestError(f"lists {item!r}, which leaves the folder with '..'")
            normalized = path.as_posix()
            if normalized == MANIFEST:
                raise _ManifestError(f"lists {MANIFEST} itself as a model file")
            if normalized in checked:
                raise _ManifestError(f"lists {item!r} twice")
            checked.append(normalized)
        files = tuple(checked)
    if "parameters" in raw and "backend" in raw:
        raise _ManifestError("has both [parameters] and [backend]: keep one (they are the same)")
    params = raw.get("parameters", raw.get("backend", {}))
    if not isinstance(params, dict):
        raise _ManifestError("has a [parameters] that is not a table")
    for key, value in params.items():
        if not key.isidentifier():
            raise _ManifestError(f"has parameter {key!r}, which is not an identifier")
        if not isinstance(value, str | int | float | bool):
            raise _ManifestError(f"has parameter {key!r}, which is not a string, number or bool")
    return _Manifest(name, files, MappingProxyType(dict(params)))


class Catalog:
    """The models in ``models_dir``; rescanned on access at most every ``rescan_interval``.

    ``clock`` (monotonic seconds) times rescans and stability observations; ``wall_clock``
    (epoch seconds, like mtimes) decides whether a file's mtime is old enough. Both are
    injectable for tests. Thread-safe; a scan is synchronous and cheap (no file is read but
    manifests).
    """

    def __init__(
        self,
        models_dir: Path,
        *,
        stable_seconds: float = 2.0,
        rescan_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.stable_seconds = stable_seconds
        self.rescan_interval = rescan_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._last_scan = -float("inf")
        self._entries: dict[str, CatalogEntry] = {}
        self._problems: list[CatalogProblem] = []
        self._pending: set[str] = set()
        self._reported: set[tuple[Path, str]] = set()
        # path -> (version, monotonic time it was first seen with that version)
        self._seen: dict[Path, tuple[FileVersion, float]] = {}
        self._manifests: dict[Path, tuple[FileVersion, _Manifest | str]] = {}

    # -- public ----------------------------------------------------------------------------

    def entries(self) -> list[CatalogEntry]:
        """Every listed model, sorted by name."""
        self._refresh()
        return [self._entries[name] for name in sorted(self._entries)]

    def get(self, name: str) -> CatalogEntry | None:
        """The model called ``name``; an unknown name triggers a rescan unless one just ran."""
        with self._lock:
            self._refresh_locked(self.rescan_interval)
            entry = self._entries.get(name)
            if entry is None:
                self._refresh_locked(MISS_RESCAN_INTERVAL)
                entry = self._entries.get(name)
            return entry

    def pending(self, name: str) -> bool:
        """True when a file that would be model ``name`` exists but is still being written
        (not yet stable): a caller may wait a moment instead of calling the model unknown."""
        with self._lock:
            return name in self._pending

    def problems(self) -> list[CatalogProblem]:
        """What could not be listed at the last scan, and why."""
        self._refresh()
        return list(self._problems)

    def rescan(self) -> None:
        """Scan now, whatever the interval."""
        with self._lock:
            self._scan()

    # -- scanning --------------------------------------------------------------------------

    def _refresh(self) -> None:
        with self._lock:
            self._refresh_locked(self.rescan_interval)

    def _refresh_locked(self, interval: float) -> None:
        if self._clock() - self._last_scan >= interval:
            self._scan()

    def _scan(self) -> None:
        scan = _Scan(self)
        scan.run()
        self._last_scan = scan.now
        self._entries = scan.entries
        self._problems = scan.problems
        self._pending = scan.pending
        self._seen = {p: v for p, v in self._seen.items() if p in scan.observed}
        self._manifests = {p: m for p, m in self._manifests.items() if p in scan.observed}
        current = {(p.path, p.message) for p in scan.problems}
        for problem in scan.problems:
            if (problem.path, problem.message) not in self._reported:
                log.warning("%s", problem.message)
        self._reported = current

    def _is_stable(self, path: Path, version: FileVersion, now: float, wall: float) -> bool:
        previous = self._seen.get(path)
        if previous is None or previous[0] != version:
            self._seen[path] = (version, now)
            first_seen = now
        else:
            first_seen = previous[1]
        if now - first_seen >= self.stable_seconds:
            return True
        return wall - version.mtime_ns / 1e9 >= self.stable_seconds


class _Scan:
    """One pass over the models dir."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.now = catalog._clock()
        self.wall = catalog._wall_clock()
        self.observed: set[Path] = set()
        self.problems: list[CatalogProblem] = []
        self.entries: dict[str, CatalogEntry] = {}
        self.pending: set[str] = set()
        self._files: dict[str, list[CatalogEntry]] = {}
        self._folders: dict[str, list[CatalogEntry]] = {}

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(CatalogProblem(path, message))

    def stable(self, path: Path, st: os.stat_result) -> bool:
        self.observed.add(path)
        return self.catalog._is_stable(path, _version(st), self.now, self.wall)

    def run(self) -> None:
        root = self.catalog.models_dir
        try:
            with os.scandir(root) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.problem(root, f"cannot read the models dir {root}: {exc.strerror or exc}")
            return
        for item in found:
            if is_ignored_name(item.name):
                continue
            path = root / item.name
            try:
                st = item.stat()  # follows symlinks
            except OSError:
                continue  # vanished, or a dangling symlink
            if stat.S_ISDIR(st.st_mode):
                self._folder(path)
            elif stat.S_ISREG(st.st_mode):
                self._file(path, st)
        self._resolve()

    def _file(self, path: Path, st: os.stat_result) -> None:
        if not self.stable(path, st):
            self.pending.add(model_name_for_file(path.name))
            return
        name = model_name_for_file(path.name)
        try:
            validate_model_name(name)
        except InvalidModelName as exc:
            self.problem(path, f"{path.name} is not listed: {exc}; rename the file")
            return
        entry = CatalogEntry(
            name, (path,), (st.st_size,), MappingProxyType({}), (_version(st),), path
        )
        self._files.setdefault(name, []).append(entry)

    def _folder(self, folder: Path) -> None:
        manifest_path = folder / MANIFEST
        try:
            st = os.stat(manifest_path)
        except OSError:
            return  # a folder without a manifest is not a model
        if not stat.S_ISREG(st.st_mode) or not self.stable(manifest_path, st):
            return
        manifest = self._manifest(manifest_path, st, folder.name)
        if isinstance(manifest, str):
            self.problem(folder, f"{manifest_path} {manifest}; the model is not listed")
            return
        try:
            validate_model_name(manifest.name)
        except InvalidModelName as exc:
            self.problem(folder, f"{manifest_path} is not listed: {exc}")
            return
        names = manifest.files if manifest.files is not None else self._default_files(folder)
        if not names:
            self.problem(folder, f"{folder} has a {MANIFEST} but no model files")
            return
        paths: list[Path] = []
        stats: list[os.stat_result] = []
        for rel in names:
            path = folder / rel
            try:
                fst = os.stat(path)
            except OSError:
                self.problem(
                    folder, f"{manifest_path} lists {rel}, which does not exist (yet); not listed"
                )
                return
            if not stat.S_ISREG(fst.st_mode):
                self.problem(folder, f"{manifest_path} lists {rel}, which is not a regular file")
                return
            paths.append(path)
            stats.append(fst)
        # Every file is observed, so that all of them progress toward stable at once.
        if not all([self.stable(p, s) for p, s in zip(paths, stats, strict=True)]):
            return
        entry = CatalogEntry(
            manifest.name,
            tuple(paths),
            tuple(s.st_size for s in stats),
            manifest.parameters,
            tuple(_version(s) for s in stats),
            folder,
        )
        self._folders.setdefault(manifest.name, []).append(entry)

    def _manifest(self, path: Path, st: os.stat_result, folder_name: str) -> _Manifest | str:
        version = _version(st)
        cached = self.catalog._manifests.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        result: _Manifest | str
        try:
            result = _parse_manifest(path.read_text(encoding="utf-8"), folder_name)
        except (OSError, UnicodeDecodeError) as exc:
            result = f"cannot be read ({exc})"
        except _ManifestError as exc:
            result = str(exc)
        self.catalog._manifests[path] = (version, result)
        return result

    @staticmethod
    def _default_files(folder: Path) -> list[str]:
        names = []
        try:
            with os.scandir(folder) as it:
                for item in it:
                    if item.name == MANIFEST or is_ignored_name(item.name):
                        continue
                    try:
                        if item.is_file():
                            names.append(item.name)
                    except OSError:
                        continue
        except OSError:
            return []
        return sorted(names)

    def _resolve(self) -> None:
        """Settle names claimed more than once: a folder beats a file; two of a kind refuse the
        name (picking one would silently swap the model that requests get)."""
        for name in sorted(set(self._files) | set(self._folders)):
            folders = self._folders.get(name, [])
            files = self._files.get(name, [])
            if len(folders) > 1:
                where = ", ".join(str(e.source) for e in folders)
                self.problem(
                    folders[0].source or self.catalog.models_dir,
                    f"model {name} is claimed by several folders ({where}); none is listed: "
                    "rename one in its model.toml",
                )
                continue
            if folders:
                for shadowed in files:
                    self.problem(
                        shadowed.source or self.catalog.models_dir,
                        f"{shadowed.source} is not listed: the folder {folders[0].source} also "
                        f"names model {name}, and the folder wins",
                    )
                self.entries[name] = folders[0]
                continue
            if len(files) > 1:
                where = ", ".join(str(e.source) for e in files)
                self.problem(
                    files[0].source or self.catalog.models_dir,
                    f"model {name} is claimed by several files ({where}); none is listed: "
                    "rename one",
                )
                continue
            self.entries[name] = files[0]
