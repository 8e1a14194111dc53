"""Which worker gets a cold model: a table of scenarios, and WorkerView from a real /status."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import httpx
import pytest

from staging_cli import tus
from staging_cli.errors import InsufficientStorage, WorkerUnreachable
from staging_cli.router.placement import Placement, WorkerView, place

from ..support import RunningWorker

GiB = 1024**3
A, B, C = "a" * 64, "b" * 64, "c" * 64
MODEL = {A: 10 * GiB, B: 6 * GiB}  # 16 GiB in two files


@dataclass
class Case:
    workers: list[WorkerView]
    chosen: str
    reason: str  # a fragment the reason must contain
    files: dict[str, int] = field(default_factory=lambda: dict(MODEL))


def w(url: str, free: float = 100, **kwargs: object) -> WorkerView:
    """A reachable worker with ``free`` GiB free."""
    return WorkerView(url, free=int(free * GiB), **kwargs)  # type: ignore[arg-type]


CASES = {
    "ready wins over everything": Case(
        [w("gpu-1", blobs=frozenset({A, B})), w("gpu-2", 1, models={"m": "READY"}, loaded_count=5)],
        "gpu-2",
        "gpu-2 already has m loaded (READY)",
    ),
    "loading is joined": Case(
        [w("gpu-1"), w("gpu-2", models={"m": "LOADING"}, loaded_count=1)],
        "gpu-2",
        "gpu-2 is already loading m: joining that load",
    ),
    "ready beats loading": Case(
        [w("gpu-1", models={"m": "LOADING"}), w("gpu-2", models={"m": "READY"}, in_flight=9)],
        "gpu-2",
        "READY",
    ),
    "ready with other files is not joined": Case(
        [
            w("gpu-1", models={"m": "READY"}, model_files={"m": frozenset({C})}, loaded_count=1),
            w("gpu-2"),
        ],
        "gpu-2",
        "fewest loaded models (0)",
    ),
    "failed model is not joined": Case(
        [w("gpu-1", models={"m": "UNAVAILABLE"}, loaded_count=0), w("gpu-2", 200)],
        "gpu-2",
        "gpu-2 has 200.0 GiB free for 16.0 GiB, and the most free space",
    ),
    "holder of every blob wins over a less busy worker": Case(
        [w("gpu-1", 500), w("gpu-2", 1, blobs=frozenset({A, B}), loaded_count=3)],
        "gpu-2",
        "gpu-2 already holds all 2 files (16.0 GiB)",
    ),
    "holder of every blob fits even with an overcommitted disk": Case(
        [w("gpu-2", 0, reserved=5 * GiB, blobs=frozenset({A, B}))],
        "gpu-2",
        "already holds all 2 files",
    ),
    "most bytes held wins": Case(
        [w("gpu-1", blobs=frozenset({B})), w("gpu-2", blobs=frozenset({A}), loaded_count=2)],
        "gpu-2",
        "gpu-2 already holds 10.0 GiB of 16.0 GiB (1 of 2 files whole), and has 100.0 GiB "
        "free for the remaining 6.0 GiB",
    ),
    "an upload in progress counts its offset": Case(
        [
            w("gpu-1", blobs=frozenset({B})),
            w("gpu-2", uploads={A: 7 * GiB}, reserved=3 * GiB, loaded_count=2),
        ],
        "gpu-2",
        "gpu-2 already holds 7.0 GiB of 16.0 GiB (uploads in progress), and has 97.0 GiB "
        "free for the 6.0 GiB its uploads in progress have not reserved",
    ),
    "an upload in progress needs no new reservation": Case(
        # 1 GiB usable: enough for nothing new, but A's remaining bytes are reserved already.
        [w("gpu-1", 4, reserved=3 * GiB, uploads={A: 7 * GiB}, blobs=frozenset({B}))],
        "gpu-1",
        "(1 of 2 files whole and uploads in progress), and its uploads in progress already "
        "reserved the rest",
    ),
    "least loaded among empty workers": Case(
        [
            w("gpu-1", 300, loaded_count=2),
            w("gpu-2", 80, loaded_count=1),
            w("gpu-3", 90, loaded_count=3),
        ],
        "gpu-2",
        "gpu-2 has 80.0 GiB free for 16.0 GiB, and the fewest loaded models (1)",
    ),
    "then fewest requests in flight": Case(
        [w("gpu-1", 300, loaded_count=1, in_flight=4), w("gpu-2", 80, loaded_count=1, in_flight=1)],
        "gpu-2",
        "the fewest requests in flight (1)",
    ),
    "then most free space": Case(
        [w("gpu-1", 50), w("gpu-2", 80)],
        "gpu-2",
        "the most free space among equally busy workers",
    ),
    "exact tie goes to the first URL": Case(
        [w("gpu-2"), w("gpu-1")],
        "gpu-1",
        "tied with gpu-2 (first by URL)",
    ),
    "only candidate says nothing about ties": Case(
        [w("gpu-1")],
        "gpu-1",
        "gpu-1 has 100.0 GiB free for 16.0 GiB",
    ),
    "reserved and min_free are not free": Case(
        [
            w("gpu-1", 30, reserved=10 * GiB, min_free=5 * GiB),  # 15 GiB usable < 16
            w("gpu-2", 20, loaded_count=4),
        ],
        "gpu-2",
        "gpu-2 has 20.0 GiB free for 16.0 GiB",
    ),
    "a worker that cannot fit is never picked, whatever it holds": Case(
        [w("gpu-1", 5, blobs=frozenset({B})), w("gpu-2", 17, loaded_count=9)],
        "gpu-2",
        "gpu-2 has 17.0 GiB free",
    ),
    "unreachable workers are never picked": Case(
        [
            WorkerView.unreachable("gpu-1", "connection refused"),
            WorkerView("gpu-0", reachable=False, models={"m": "READY"}, blobs=frozenset({A, B})),
            w("gpu-2", 20, loaded_count=3),
        ],
        "gpu-2",
        "gpu-2 has",
    ),
    "a worker at max_loaded ranks after one with a free slot": Case(
        [w("gpu-1", 200, loaded_count=2, max_loaded=2), w("gpu-2", 100, loaded_count=3)],
        "gpu-2",
        "gpu-2 has 100.0 GiB free for 16.0 GiB, and a free model slot (gpu-1 is at its "
        "max_loaded of 2)",
    ),
    "a worker at max_loaded holding the blobs still wins": Case(
        [w("gpu-1", blobs=frozenset({A, B}), loaded_count=2, max_loaded=2), w("gpu-2")],
        "gpu-1",
        "gpu-1 already holds all 2 files (16.0 GiB) (at its max_loaded of 2, it unloads its "
        "least recently used idle model to make room)",
    ),
    "max_loaded does not stop joining a loaded model": Case(
        [w("gpu-1", models={"m": "READY"}, loaded_count=2, max_loaded=2), w("gpu-2")],
        "gpu-1",
        "READY",
    ),
    "digests may carry the sha256: prefix": Case(
        [w("gpu-1"), w("gpu-2", blobs=frozenset({A}))],
        "gpu-2",
        "already holds all 1 file",
        {f"sha256:{A.upper()}": GiB},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_placement(case: Case) -> None:
    placement = place("m", case.files, case.workers)
    assert placement.worker == case.chosen, placement.reason
    assert case.reason in placement.reason


def test_placement_ignores_worker_order() -> None:
    workers = [w("gpu-1", 50), w("gpu-2", 80, loaded_count=1), w("gpu-3", 80)]
    assert place("m", MODEL, workers) == place("m", MODEL, list(reversed(workers)))
    assert place("m", MODEL, workers) == Placement(
        "gpu-3",
        "gpu-3 has 80.0 GiB free for 16.0 GiB, and the most free space among equally busy workers",
    )


def test_nothing_fits_names_every_worker() -> None:
    workers = [
        w("http://gpu-1:8081", 3.1),
        w("http://gpu-2:8081", 8, reserved=2 * GiB, blobs=frozenset({B})),
        WorkerView.unreachable("http://gpu-3:8081", "timed out"),
    ]
    with pytest.raises(InsufficientStorage) as caught:
        place("org/m", MODEL, workers)
    assert caught.value.status == 507
    assert str(caught.value) == (
        "no worker has room for org/m (16.0 GiB): http://gpu-1:8081 has 3.1 GiB free and needs "
        "16.0 GiB; http://gpu-2:8081 has 6.0 GiB free and needs 10.0 GiB (holds 6.0 GiB); "
        "http://gpu-3:8081 is unreachable (timed out); free space on a worker (staging-cli gc) "
        "or add one"
    )


def test_no_worker_reachable() -> None:
    workers = [
        WorkerView.unreachable("gpu-1", "connection refused"),
        WorkerView.unreachable("gpu-2"),
    ]
    with pytest.raises(WorkerUnreachable) as caught:
        place("m", MODEL, workers)
    assert "gpu-1 (connection refused); gpu-2" in str(caught.value)


def test_no_workers_at_all() -> None:
    with pytest.raises(WorkerUnreachable, match="no worker is configured"):
        place("m", MODEL, [])


def test_from_status_of_a_real_worker(worker: RunningWorker) -> None:
    whole, partial = b"w" * 1000, b"p" * 500
    whole_sha = hashlib.sha256(whole).hexdigest()
    partial_sha = hashlib.sha256(partial).hexdigest()
    with httpx.Client(base_url=worker.url) as c:
        for data, sha, sent in ((whole, whole_sha, whole), (partial, partial_sha, partial[:200])):
            created = c.post(
                "/uploads",
                content=sent,
                headers={
                    "Tus-Resumable": "1.0.0",
                    "Upload-Length": str(len(data)),
                    "Upload-Metadata": tus.encode_metadata({"sha256": sha}),
                    "Content-Type": "application/offset+octet-stream",
                },
            )
            assert created.status_code == 201, created.text
        loaded = c.post(
            "/v2/repository/models/org%2Fm/load", json={"parameters": {"files": [whole_sha]}}
        )
        assert loaded.status_code == 200, loaded.text
        status = c.get("/status").json()

    assert WorkerView.from_status(worker.url, status).max_loaded is None  # none configured
    view = WorkerView.from_status(worker.url, status, in_flight=3, max_loaded=4)
    assert view.reachable
    assert view.blobs == frozenset({whole_sha})
    assert dict(view.uploads) == {partial_sha: 200}
    assert view.reserved == 300
    assert view.free == status["disk"]["free"] > 0
    assert dict(view.models) == {"org/m": "READY"}
    assert view.model_files["org/m"] == frozenset({whole_sha})
    assert (view.loaded_count, view.in_flight, view.max_loaded) == (1, 3, 4)

    assert place("org/m", {whole_sha: 1000}, [view]).reason.endswith("(READY)")
    placement = place("other", {whole_sha: 1000, partial_sha: 500}, [w("empty"), view])
    assert placement.worker == worker.url
    assert "holds 1.2 KiB of 1.5 KiB" in placement.reason


def test_from_status_tolerates_a_sparse_body() -> None:
    view = WorkerView.from_status("w", {"disk": "?", "blobs": [{"digest": 3}], "uploads": None})
    assert (view.free, view.blobs, dict(view.uploads), view.loaded_count) == (0, frozenset(), {}, 0)
    index = [{"name": "a", "state": "READY"}, {"name": "b", "state": "UNLOADING"}, "junk"]
    view = WorkerView.from_status("w", {"models": [], "max_loaded": 2}, index)
    assert dict(view.models) == {"a": "READY", "b": "UNLOADING"}
    assert (view.loaded_count, view.max_loaded, view.at_capacity) == (1, 2, False)
