"""Staging throughput, side by side with this machine's ceiling and with tuspy.

One run measures, on the same file with its page cache warm:

  stager  ``staging-cli stage FILE --quiet --json`` (a subprocess, digest already cached) into
          our worker (``staging-cli worker``, a subprocess), per-chunk sha256 on;
  sink    ``curl -T FILE`` into bench/sink.py: a minimal Starlette endpoint under the worker's
          uvicorn setup that writes the body to disk and fdatasyncs every 32 MiB (the ceiling
          for a Python server on this disk: no hashing, no bookkeeping);
  tuspy   tuspy's ``Uploader`` (a subprocess) into our worker with ``upload_checksum=True`` and
          the same chunk size;

then the ratios, and the peak RSS (VmHWM, polled from /proc) of every client and server process.
A second phase stages files of other sizes (``--rss-sizes``) with a cold digest cache (hash +
upload) to show that the stager's memory does not grow with the file.

Every server gets a fresh process (so its VmHWM is its own) and a fresh directory; all
children are killed and all files removed at the end, also on error or Ctrl-C.

    .venv/bin/python bench/stage_throughput.py                  # 2 GiB, 32 MiB chunks
    .venv/bin/python bench/stage_throughput.py --size 1GiB --runs 1 --rss-sizes ''
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from staging_cli.config import format_size, parse_size

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
STAGING_CLI = str(BIN / "staging-cli")
MIB = 1024 * 1024


# -- processes -----------------------------------------------------------------------------


class RssPoller:
    """Polls VmHWM (peak RSS) of one process from /proc until it exits."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                        return
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        """Stops polling; returns the peak in MiB."""
        self._read()
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


class Children:
    """Every process the bench starts, so that all of them are stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, argv: Sequence[str], env: dict[str, str], **kw: object
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            list(argv),
            env=env,
            text=True,
            start_new_session=True,
            **kw,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    dir: Path
    rss: RssPoller


def start_server(
    children: Children, argv: list[str], directory: Path, env: dict[str, str]
) -> Server:
    """Start a server that prints ``listening on URL`` and return it once it does."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = children.start(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        err = proc.stderr.read() if proc.stderr else ""
        children.stop(proc)
        raise RuntimeError(f"{argv[0]} did not start: {line!r} {err[-2000:]}")
    return Server(proc, line.split()[-1], directory, RssPoller(proc.pid))


def start_worker(children: Children, directory: Path, env: dict[str, str]) -> Server:
    return start_server(
        children, [STAGING_CLI, "worker", "--dir", str(directory), "--port", "0"], directory, env
    )


def start_sink(children: Children, directory: Path, env: dict[str, str], sync_every: int) -> Server:
    argv = [sys.executable, str(HERE / "sink.py"), "--dir", str(directory), "--port", "0",
            "--sync-every", str(sync_every)]  # fmt: skip
    return start_server(children, argv, directory, env)


def finish_server(children: Children, server: Server) -> float:
    """Stop the server, remove its files; returns its peak RSS in MiB."""
    peak = server.rss.stop()
    children.stop(server.proc)
    shutil.rmtree(server.dir, ignore_errors=True)
    return peak


@dataclass
class Measure:
    name: str
    size: int
    seconds: float  # wall time of the client process, start-up included
    transfer: float  # the transfer alone, as the client reports it (no start-up)
    client_rss: float  # MiB
    server_rss: float  # MiB
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6

    @property
    def transfer_mbps(self) -> float:
        return self.size / self.transfer / 1e6


def run_client(
    children: Children, argv: list[str], env: dict[str, str], timeout: float
) -> tuple[float, float, str]:
    """Run a client to completion; returns (seconds, peak RSS MiB, stdout)."""
    started = time.perf_counter()
    proc = children.start(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss = RssPoller(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children.stop(proc)
        rss.stop()
        raise RuntimeError(f"{argv[0]} took more than {timeout:.0f} s") from None
    seconds = time.perf_counter() - started
    peak = rss.stop()
    children.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}... exited {proc.returncode}: {err[-2000:]}")
    return seconds, peak, out


# -- the file ------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    """Incompressible, distinct per MiB (a counter over a random block), written and fsynced."""
    block = bytearray(os.urandom(16 * MIB))
    with open(path, "wb", buffering=0) as fh:
        written = 0
        n = 0
        while written < size:
            for i in range(0, len(block), MIB):
                block[i : i + 8] = n.to_bytes(8, "little")
                n += 1
            piece = memoryview(block)[: min(len(block), size - written)]
            fh.write(piece)
            written += len(piece)
        os.fsync(fh.fileno())


def warm(path: Path) -> None:
    """Read the file once so that it is in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 * MIB):
            pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(16 * MIB):
            h.update(block)
    return h.hexdigest()


# -- the three measurements ----------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children = Children()
        self.env = {
            **os.environ,
            "STAGING_CLI_CACHE_DIR": str(tmp / "cache"),
            "STAGING_CLI_STATE_DIR": str(tmp / "state"),
            "STAGING_CLI_CONFIG_DIR": str(tmp / "config"),
            "STAGING_CLI_DATA_DIR": str(tmp / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        self._n = 0
        self.timeout = 3600.0

    def _dir(self, what: str) -> Path:
        self._n += 1
        return self.tmp / f"{what}-{self._n}"

    def stage_argv(self, path: Path, url: str) -> list[str]:
        return [STAGING_CLI, "stage", str(path), "--model", "bench/m", "--worker", url,
                "--chunk-size", str(self.args.chunk_size), "--quiet", "--json"]  # fmt: skip

    def stager(self, path: Path, size: int, env: dict[str, str] | None = None) -> Measure:
        worker = start_worker(self.children, self._dir("worker"), env or self.env)
        try:
            warm(path)
            seconds, rss, out = run_client(
                self.children, self.stage_argv(path, worker.url), env or self.env, self.timeout
            )
        finally:
            server_rss = finish_server(self.children, worker)
        files = _last_json(out).get("files") or [{}]
        result: dict[str, object] = files[0]  # type: ignore[index]
        if result.get("skipped") or not result.get("seconds"):
            raise RuntimeError(f"the stager did not stage the file: {out[-2000:]}")
        transfer = float(result["seconds"])  # type: ignore[arg-type]
        return Measure("stager", size, seconds, transfer, rss, server_rss, extra=result)

    def sink(self, path: Path, size: int) -> Measure:
        sink = start_sink(self.children, self._dir("sink"), self.env, self.args.chunk_size)
        try:
            warm(path)
            argv = ["curl", "-sS", "--fail", "-T", str(path), "-H", "Expect:",
                    "-o", "/dev/null", "-w", "%{time_total}", f"{sink.url}/sink/file"]  # fmt: skip
            seconds, rss, out = run_client(self.children, argv, self.env, self.timeout)
            got = (sink.dir / "file").stat().st_size
        finally:
            server_rss = finish_server(self.children, sink)
        if got != size:
            raise RuntimeError(f"the sink received {got} bytes of {size}")
        return Measure("sink (curl)", size, seconds, float(out), rss, server_rss)

    def tuspy(self, path: Path, size: int) -> Measure:
        worker = start_worker(self.children, self._dir("worker"), self.env)
        try:
            warm(path)
            argv = [sys.executable, __file__, "--tuspy-child", worker.url, str(path),
                    str(self.args.chunk_size), self.args.tuspy_checksum]  # fmt: skip
            seconds, rss, out = run_client(self.children, argv, self.env, self.timeout)
            blobs = [p.stat().st_size for p in (worker.dir / "blobs").rglob("*") if p.is_file()]
        finally:
            server_rss = finish_server(self.children, worker)
        if blobs != [size]:
            raise RuntimeError(f"tuspy's upload did not complete on the worker: {blobs}")
        return Measure(
            f"tuspy ({self.args.tuspy_checksum})", size, seconds, float(out), rss, server_rss
        )


def _last_json(out: str) -> dict[str, object]:
    for line in reversed(out.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def tuspy_child(url: str, path: str, chunk_size: int, algorithm: str) -> None:
    """Runs in its own process: tuspy's synchronous uploader, checksum on."""
    from tusclient import client
    from tusclient.uploader import Uploader

    class _Uploader(Uploader):
        CHECKSUM_ALGORITHM_PAIR = (algorithm, getattr(hashlib, algorithm))

    tus = client.TusClient(url + "/uploads")
    uploader = _Uploader(
        file_path=path,
        client=tus,
        chunk_size=chunk_size,
        upload_checksum=True,
        metadata={"filename": os.path.basename(path)},
    )
    started = time.perf_counter()
    uploader.upload()
    print(f"{time.perf_counter() - started:.6f}")


# -- output --------------------------------------------------------------------------------


def row(cells: Sequence[object], widths: Sequence[int]) -> str:
    out = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        text = str(cell)
        out.append(text.ljust(width) if i == 0 else text.rjust(width))
    return "  ".join(out)


def median(runs: list[Measure], transfer: bool = False) -> float:
    return statistics.median(m.transfer_mbps if transfer else m.mbps for m in runs)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Staging throughput: the stager vs a disk sink (curl) vs tuspy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default="2GiB", help="file size")
    p.add_argument("--chunk-size", type=parse_size, default="32MiB",
                   help="PATCH size for the stager and tuspy; the sink's fdatasync cadence")  # fmt: skip
    p.add_argument("--runs", type=int, default=3, help="runs of each measurement (median shown)")
    p.add_argument("--rss-sizes", default="1GiB,4GiB",
                   help="file sizes for the stager memory phase ('' to skip)")  # fmt: skip
    p.add_argument("--tmp", type=Path, default=ROOT.parent / ".bench-tmp",
                   help="scratch directory (on the disk under test); removed at the end")  # fmt: skip
    p.add_argument("--tuspy-checksum", default="sha256", choices=("sha1", "sha256"),
                   help="tuspy's Upload-Checksum algorithm (tuspy's own default is sha1)")  # fmt: skip
    p.add_argument("--only", default="sink,stager,tuspy", help="measurements to run")
    p.add_argument("--keep-going", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tuspy-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if isinstance(args.size, str):
        args.size = parse_size(args.size)
    if isinstance(args.chunk_size, str):
        args.chunk_size = parse_size(args.chunk_size)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tuspy_child:
        url, path, chunk, algo = args.tuspy_child
        tuspy_child(url, path, int(chunk), algo)
        return 0
    rss_sizes = [parse_size(s) for s in args.rss_sizes.split(",") if s.strip()]
    only = {s.strip() for s in args.only.split(",")}
    args.tmp.mkdir(parents=True, exist_ok=True)
    need = 2 * max([args.size, *rss_sizes]) + args.size + 1024 * MIB
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(f"{args.tmp} has {format_size(free)} free; the bench needs {format_size(need)}",
              file=sys.stderr)  # fmt: skip
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="stage-", dir=args.tmp))
    bench = Bench(args, tmp)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"staging-cli throughput bench: file {format_size(args.size)}, chunk "
              f"{format_size(args.chunk_size)}, {os.cpu_count()} CPUs, scratch {tmp} "
              f"({format_size(free)} free)", flush=True)  # fmt: skip
        src = tmp / "model.bin"
        t0 = time.perf_counter()
        make_file(src, args.size)
        print(f"generated the file in {time.perf_counter() - t0:.1f} s", flush=True)
        warm(src)

        # Prime the digest cache (and warm every code path) with a first stage to a
        # throwaway worker; the measured stager runs then start from the cached digest.
        t0 = time.perf_counter()
        prime = bench.stager(src, args.size)
        print(f"primed the digest cache (hash + a throwaway stage) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        if prime.extra.get("sha256") and prime.extra["sha256"] != sha256_of(src):
            raise RuntimeError("the stager reported a wrong sha256")

        results: dict[str, list[Measure]] = {k: [] for k in ("sink", "stager", "tuspy")}
        for i in range(args.runs):
            for what in ("sink", "stager", "tuspy"):
                if what not in only:
                    continue
                m = getattr(bench, what)(src, args.size)
                results[what].append(m)
                print(f"  run {i + 1}: {m.name:<15} wall {m.seconds:6.2f} s {m.mbps:5.0f} MB/s, "
                      f"transfer {m.transfer:6.2f} s {m.transfer_mbps:5.0f} MB/s, "
                      f"client {m.client_rss:6.1f} MiB, server {m.server_rss:6.1f} MiB",
                      flush=True)  # fmt: skip
        results = {k: v for k, v in results.items() if v}

        rss_rows: list[Measure] = []
        for size in rss_sizes:
            path = tmp / f"rss-{size}.bin"
            make_file(path, size)
            warm(path)
            cold = {**bench.env, "STAGING_CLI_CACHE_DIR": str(tmp / f"cache-{size}")}
            for label in ("hash + stage", "cached digest"):
                m = bench.stager(path, size, env=cold)
                m.note = label
                rss_rows.append(m)
                print(f"  memory: stager {format_size(size)} ({label}) {m.seconds:.2f} s, "
                      f"peak RSS {m.client_rss:.1f} MiB, worker {m.server_rss:.1f} MiB",
                      flush=True)  # fmt: skip
            path.unlink()

        print()
        print("== summary " + "=" * 78)
        print(f"file {format_size(args.size)}, chunk {format_size(args.chunk_size)}, median of "
              f"{args.runs} run(s); MB/s = 10^6 bytes/s. 'wall': the client process from exec to "
              "exit; 'transfer': the upload alone as the client times it (no interpreter start-up)")  # fmt: skip
        widths = (15, 10, 8, 14, 8, 16, 16)
        print(row(("", "wall MB/s", "x sink", "transfer MB/s", "x sink", "client peak RSS",
                   "server peak RSS"), widths))  # fmt: skip
        base = results.get("sink")
        for runs in results.values():
            wall, xfer = median(runs), median(runs, True)
            print(row((runs[0].name, f"{wall:.0f}",
                       f"{wall / median(base):.2f}" if base else "-", f"{xfer:.0f}",
                       f"{xfer / median(base, True):.2f}" if base else "-",
                       f"{max(m.client_rss for m in runs):.1f} MiB",
                       f"{max(m.server_rss for m in runs):.1f} MiB"), widths))  # fmt: skip
        if "stager" in results:
            st = results["stager"]
            print()
            for other, target in (("sink", 0.6), ("tuspy", 1.0)):
                if other in results:
                    o = results[other]
                    print(f"stager / {other:<5} = {median(st) / median(o):.2f} wall, "
                          f"{median(st, True) / median(o, True):.2f} transfer   "
                          f"(target >= {target:.2f})")  # fmt: skip
        if rss_rows or "stager" in results:
            print()
            print("stager peak RSS by file size (target < 150 MiB, flat):")
            rows = []
            if "stager" in results:
                st = results["stager"]
                rows.append((f"{format_size(args.size)} (cached digest)",
                             max(m.client_rss for m in st), max(m.server_rss for m in st)))  # fmt: skip
            rows += [(f"{format_size(m.size)} ({m.note})", m.client_rss, m.server_rss)
                     for m in rss_rows]  # fmt: skip
            for label, client_rss, server_rss in rows:
                print(f"  {label:<26} stager {client_rss:6.1f} MiB   worker {server_rss:6.1f} MiB")
        return 0
    finally:
        bench.children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            args.tmp.rmdir()  # only when empty
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
