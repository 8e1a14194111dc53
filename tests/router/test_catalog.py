"""The models dir as the router sees it: real files in tmp_path, injected clocks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from staging_cli.router.catalog import Catalog, CatalogEntry, model_name_for_file
from staging_cli.stager.digest import FileVersion

START = 1_000_000.0  # epoch seconds the fake wall clock starts at (files are stamped near it)


class Clocks:
    """A monotonic and a wall clock that advance together."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = START

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def make_catalog(path: Path, clocks: Clocks, **kwargs: float) -> Catalog:
    return Catalog(path, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall, **kwargs)


def write(path: Path, data: bytes = b"x", *, mtime: float | None = START - 3600) -> Path:
    """A file; by default stamped an hour ago, so it counts as finished at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def names(catalog: Catalog) -> list[str]:
    return [e.name for e in catalog.entries()]


@pytest.mark.parametrize(
    ("file_name", "model"),
    [
        ("llama-3-8b.Q4_K_M.gguf", "llama-3-8b.Q4_K_M"),
        ("cold.bin", "cold"),
        ("noext", "noext"),
        ("model.tar.gz", "model.tar"),
        ("qwen2.5:7b.gguf", "qwen2.5:7b"),
    ],
)
def test_file_naming_rule(tmp_path: Path, clocks: Clocks, file_name: str, model: str) -> None:
    assert model_name_for_file(file_name) == model
    path = write(tmp_path / file_name, b"abc")
    entry = make_catalog(tmp_path, clocks).get(model)
    assert entry is not None
    assert entry.name == model
    assert entry.files == (path,)
    assert entry.sizes == (3,)
    assert entry.total_size == 3
    assert entry.parameters == {}
    assert entry.version == (FileVersion.of(path),)


def test_folder_with_manifest(tmp_path: Path, clocks: Clocks) -> None:
    folder = tmp_path / "qwen"
    write(folder / "b.gguf", b"bb")
    write(folder / "a.gguf", b"a")
    write(folder / "notes.txt", b"not part of the model")
    write(
        folder / "model.toml",
        b'name = "org/qwen:q4"\nfiles = ["b.gguf", "a.gguf"]\n\n'
        b"[parameters]\nctx_size = 4096\nflash = true\n",
    )
    catalog = make_catalog(tmp_path, clocks)
    assert names(catalog) == ["org/qwen:q4"]
    entry = catalog.get("org/qwen:q4")
    assert entry is not None
    assert entry.files == (folder / "b.gguf", folder / "a.gguf")  # manifest order kept
    assert entry.sizes == (2, 1)
    assert entry.total_size == 3
    assert dict(entry.parameters) == {"ctx_size": 4096, "flash": True}
    assert entry.source == folder
    assert catalog.problems() == []


def test_folder_defaults_name_and_files(tmp_path: Path, clocks: Clocks) -> None:
    folder = tmp_path / "split"
    for name in ("m-00002-of-00002.gguf", "m-00001-of-00002.gguf", ".hidden", "x.part"):
        write(folder / name)
    write(folder / "model.toml", b"[backend]\nthreads = 4\n")
    entry = make_catalog(tmp_path, clocks).get("split")
    assert entry is not None
    assert [p.name for p in entry.files] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    assert dict(entry.parameters) == {"threads": 4}


def test_folder_without_manifest_is_not_a_model(tmp_path: Path, clocks: Clocks) -> None:
    write(tmp_path / "stuff" / "a.gguf")
    catalog = make_catalog(tmp_path, clocks)
    assert catalog.entries() == []
    assert catalog.problems() == []


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (b'files = ["../outside.gguf"]', "leaves the folder"),
        (b'files = ["sub/../../x.gguf"]', "leaves the folder"),
        (b'files = ["/etc/passwd"]', "absolute"),
        (b'files = ["a.gguf", "a.gguf"]', "twice"),
        (b"files = []", "non-empty list"),
        (b'files = ["missing.gguf"]', "does not exist"),
        (b'file = ["a.gguf"]', "unknown key(s) file"),
        (b"name = 3", "not a string"),
        (b'name = "../evil"', "segment"),
        (b"[parameters]\nctx = [1, 2]", "not a string, number or bool"),
        (b"[parameters]\n'bad key' = 1", "not an identifier"),
        (b"[parameters]\na = 1\n[backend]\nb = 2", "both"),
        (b"name = ", "not valid TOML"),
    ],
)
def test_bad_manifest_refused_and_reported(
    tmp_path: Path, clocks: Clocks, caplog: pytest.LogCaptureFixture, manifest: bytes, expected: str
) -> None:
    write(tmp_path / "bad" / "a.gguf")
    write(tmp_path / "bad" / "model.toml", manifest)
    write(tmp_path / "good.gguf")
    catalog = make_catalog(tmp_path, clocks)
    with caplog.at_level(logging.WARNING, logger="staging_cli.router.catalog"):
        assert names(catalog) == ["good"]
    problems = catalog.problems()
    assert len(problems) == 1
    assert problems[0].path == tmp_path / "bad"
    assert expected in problems[0].message
    assert expected in caplog.text


def test_problem_logged_once_while_it_lasts(
    tmp_path: Path, clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "bad" / "model.toml", b'files = ["../x"]')
    catalog = make_catalog(tmp_path, clocks)
    with caplog.at_level(logging.WARNING, logger="staging_cli.router.catalog"):
        for _ in range(3):
            catalog.entries()
            clocks.advance(5)
    assert caplog.text.count("leaves the folder") == 1


@pytest.mark.parametrize(
    "file_name",
    [
        ".hidden.gguf",
        "a.gguf.tmp",
        "a.gguf.part",
        "a.partial",
        "a.gguf.download",
        "a.gguf~",
        "a.gguf.crdownload",
    ],
)
def test_hidden_and_temporary_names_ignored(tmp_path: Path, clocks: Clocks, file_name: str) -> None:
    write(tmp_path / file_name)
    write(tmp_path / ".hidden-dir" / "model.toml", b"")
    write(tmp_path / ".hidden-dir" / "a.gguf")
    catalog = make_catalog(tmp_path, clocks)
    assert catalog.entries() == []
    assert catalog.problems() == []


def test_file_being_written_is_listed_once_stable(tmp_path: Path, clocks: Clocks) -> None:
    # Stamped "now" on the fake wall clock: only repeated observations can prove it finished.
    path = write(tmp_path / "big.gguf", b"a" * 10, mtime=START)
    catalog = make_catalog(tmp_path, clocks, stable_seconds=2.0, rescan_interval=1.0)
    assert catalog.get("big") is None

    clocks.advance(1.5)
    with path.open("ab") as f:  # still growing
        f.write(b"b" * 10)
    os.utime(path, (START + 1.5, START + 1.5))
    assert catalog.get("big") is None

    clocks.advance(1.5)  # unchanged for 1.5 s: not yet
    assert catalog.get("big") is None

    clocks.advance(1.0)  # unchanged for 2.5 s across two scans
    entry = catalog.get("big")
    assert entry is not None
    assert entry.sizes == (20,)


def test_old_mtime_is_listed_at_first_sight(tmp_path: Path, clocks: Clocks) -> None:
    write(tmp_path / "moved-in.gguf", mtime=START - 2.5)
    assert names(make_catalog(tmp_path, clocks, stable_seconds=2.0)) == ["moved-in"]


def test_folder_waits_for_every_file(tmp_path: Path, clocks: Clocks) -> None:
    folder = tmp_path / "m"
    write(folder / "model.toml", b'files = ["a.gguf", "b.gguf"]')
    write(folder / "a.gguf")
    catalog = make_catalog(tmp_path, clocks)
    assert catalog.entries() == []
    assert "does not exist" in catalog.problems()[0].message

    clocks.advance(1)
    write(folder / "b.gguf", b"bb", mtime=clocks.wall)  # just copied in
    assert catalog.entries() == []
    assert catalog.problems() == []
    clocks.advance(2)
    assert names(catalog) == ["m"]


def test_added_later_appears_without_a_new_catalog(tmp_path: Path, clocks: Clocks) -> None:
    write(tmp_path / "first.gguf")
    catalog = make_catalog(tmp_path, clocks, rescan_interval=1.0)
    assert names(catalog) == ["first"]

    write(tmp_path / "second.gguf")
    assert names(catalog) == ["first"]  # within the rescan interval: the cached scan
    clocks.advance(1.0)
    assert names(catalog) == ["first", "second"]


def test_get_of_unknown_name_rescans_at_once(tmp_path: Path, clocks: Clocks) -> None:
    catalog = make_catalog(tmp_path, clocks, rescan_interval=60.0)
    assert catalog.entries() == []
    write(tmp_path / "late.gguf")
    clocks.advance(0.2)
    entry = catalog.get("late")
    assert entry is not None
    assert entry.name == "late"


def test_removed_file_disappears(tmp_path: Path, clocks: Clocks) -> None:
    path = write(tmp_path / "gone.gguf")
    write(tmp_path / "stays.gguf")
    catalog = make_catalog(tmp_path, clocks)
    assert names(catalog) == ["gone", "stays"]
    path.unlink()
    clocks.advance(1.0)
    assert names(catalog) == ["stays"]
    assert catalog.get("gone") is None


def test_changed_file_gets_a_new_version(tmp_path: Path, clocks: Clocks) -> None:
    path = write(tmp_path / "m.gguf", b"one")
    catalog = make_catalog(tmp_path, clocks)
    before = catalog.get("m")
    write(path, b"two!", mtime=START - 60)
    clocks.advance(1.0)
    after = catalog.get("m")
    assert before is not None
    assert after is not None
    assert after.version != before.version
    assert after.sizes == (4,)


def test_invalid_model_name_skipped(tmp_path: Path, clocks: Clocks) -> None:
    write(tmp_path / "bad\\name.gguf")
    write(tmp_path / "ok.gguf")
    catalog = make_catalog(tmp_path, clocks)
    assert names(catalog) == ["ok"]
    [problem] = catalog.problems()
    assert "bad\\name.gguf" in problem.message


def test_folder_wins_over_file(
    tmp_path: Path, clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "m.gguf")
    write(tmp_path / "m" / "weights.gguf")
    write(tmp_path / "m" / "model.toml", b"")
    catalog = make_catalog(tmp_path, clocks)
    with caplog.at_level(logging.WARNING, logger="staging_cli.router.catalog"):
        entry = catalog.get("m")
    assert entry is not None
    assert entry.files == (tmp_path / "m" / "weights.gguf",)
    assert "folder wins" in caplog.text
    assert "folder wins" in catalog.problems()[0].message


def test_two_files_with_one_name_are_refused(tmp_path: Path, clocks: Clocks) -> None:
    write(tmp_path / "m.gguf")
    write(tmp_path / "m.bin")
    catalog = make_catalog(tmp_path, clocks)
    assert catalog.get("m") is None
    assert "several files" in catalog.problems()[0].message


def test_missing_models_dir_is_a_problem(tmp_path: Path, clocks: Clocks) -> None:
    catalog = make_catalog(tmp_path / "nope", clocks)
    assert catalog.entries() == []
    assert "cannot read the models dir" in catalog.problems()[0].message


def test_symlinked_file_is_listed(tmp_path: Path, clocks: Clocks) -> None:
    target = write(tmp_path / "store" / "blob", b"12345")
    models = tmp_path / "models"
    models.mkdir()
    (models / "linked.gguf").symlink_to(target)
    (models / "dangling.gguf").symlink_to(tmp_path / "nowhere")
    entry = make_catalog(models, clocks).get("linked")
    assert entry is not None
    assert entry.sizes == (5,)


def test_entry_is_a_frozen_value(tmp_path: Path, clocks: Clocks) -> None:
    write(tmp_path / "m.gguf")
    entry = make_catalog(tmp_path, clocks).get("m")
    assert isinstance(entry, CatalogEntry)
    with pytest.raises(AttributeError):
        entry.name = "other"  # type: ignore[misc]


def test_observations_alone_prove_a_file_finished(tmp_path: Path, clocks: Clocks) -> None:
    # An mtime ahead of the router's clock (skew on a network filesystem) never looks old:
    # the file is listed once two scans stable_seconds apart saw it unchanged.
    write(tmp_path / "skewed.gguf", mtime=START + 3600)
    catalog = make_catalog(tmp_path, clocks, stable_seconds=2.0, rescan_interval=1.0)
    assert catalog.entries() == []
    clocks.advance(1.0)
    assert catalog.entries() == []
    clocks.advance(1.0)
    assert names(catalog) == ["skewed"]
