"""Pure parts of the coordinator: job keys, advisory keys, tuning, the factory's dispatch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from staging_cli.coordinator import (
    JobSpec,
    PostgresCoordinator,
    SQLiteCoordinator,
    Tuning,
    advisory_key,
    is_postgres_dsn,
    open_coordinator,
)
from staging_cli.coordinator.postgres import describe_dsn

D1 = hashlib.sha256(b"1").hexdigest()
D2 = hashlib.sha256(b"2").hexdigest()


def test_key_is_stable_and_order_independent() -> None:
    a = JobSpec("m", "http://w:1", (D1, D2))
    b = JobSpec.of("m", "http://w:1", [D2.upper(), D1])
    assert a == b and a.key == b.key
    assert a.digests == tuple(sorted((D1, D2)))
    assert len(a.key) == 64
    assert JobSpec("m", "http://w:2", (D1, D2)).key != a.key
    # Pinned: the key is part of the database format.
    assert (
        JobSpec("m", "w").key
        == hashlib.sha256(b'{"digests":[],"model":"m","v":1,"worker":"w"}').hexdigest()
    )


def test_spec_validates() -> None:
    with pytest.raises(ValueError, match="sha256"):
        JobSpec("m", "w", ("abc",))
    with pytest.raises(ValueError):
        JobSpec("", "w")


def test_advisory_key_is_signed_64_bit_and_namespaced() -> None:
    key = JobSpec("m", "w").key
    k = advisory_key(key)
    assert -(2**63) <= k < 2**63
    assert k == advisory_key(key)
    assert k != advisory_key(key, namespace="other:")


def test_tuning_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Tuning(lease_ttl=0)
    with pytest.raises(TypeError, match="unknown coordinator tuning"):
        Tuning.from_kwargs(lease_tll=3)


def test_factory_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coord = open_coordinator(None, state_dir=tmp_path, lease_ttl=4)
    assert isinstance(coord, SQLiteCoordinator)
    assert coord.path == tmp_path / "coordinator.sqlite3"
    assert coord.tuning.lease_ttl == 4
    monkeypatch.setenv("STAGING_CLI_STATE_DIR", str(tmp_path / "state"))
    coord = open_coordinator(None)
    assert isinstance(coord, SQLiteCoordinator)
    assert coord.path == tmp_path / "state" / "coordinator.sqlite3"
    for dsn in ("postgresql://u@h/db", "postgres://h/db", "host=h dbname=db"):
        assert is_postgres_dsn(dsn)
        assert isinstance(open_coordinator(dsn), PostgresCoordinator)
    with pytest.raises(ValueError, match="postgresql://"):
        open_coordinator("mysql://h/db")


def test_describe_dsn_never_shows_password() -> None:
    assert describe_dsn("postgresql://u:secret@db.example:6432/x") == "db.example:6432"
    assert describe_dsn("host=/run/pg port=5433 password=secret") == "socket /run/pg (port 5433)"
