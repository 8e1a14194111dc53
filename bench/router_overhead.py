"""What the router adds to a small inference request (a script, not a test).

    .venv/bin/python bench/router_overhead.py                    # 3 runs x 4 cells x 3 s
    .venv/bin/python bench/router_overhead.py --duration 5 --runs 1 --concurrency 1,4,16

One run starts, in a scratch directory (``--tmp``; removed at the end):

- a worker: ``staging-cli worker --dir D --port 0 --demo-backend``;
- stages a generated 1 MiB GGUF into it as model ``bench-m`` (``staging-cli stage ... --json``,
  which also loads it: the worker starts the demo backend);
- a router: ``staging-cli serve --port 0 --worker URL --models-dir M`` where M holds the same
  file as ``bench-m.gguf``; one warm-up request through the router lets it find the model
  already loaded on the worker.

Then it measures small non-streaming chat completions (``POST /v1/chat/completions``,
``{"model": "bench-m", "messages": [{"role": "user", "content": "hi"}]}``) sent directly to
the worker and through the router (client -> router -> worker -> backend), at each concurrency.
The load generator is a separate process (this script, ``_loadgen`` mode): raw asyncio with the
httptools parser (the one uvicorn uses) and uvloop when installed, one keep-alive connection per
concurrent client, each client sending its next request when the previous answer is complete
(closed loop). Every cell first runs ``--warmup`` seconds that are not counted; then it runs
``--duration`` seconds or ``--max-requests`` requests, whichever ends first.

Per cell: requests/s, p50 and p99 latency, and the CPU time each process spent per request
(from /proc: the load generator, the router, the worker, the backend), which tells where the
time goes on this 2-core machine (four processes share two cores: the figures are
CPU-bound, the load generator included). With ``--runs N`` the cells are interleaved N times and
the median of each figure is shown.

Targets: the router adds <= 2 ms to the p50 at concurrency 1, and keeps >= 0.5 x the direct
throughput at concurrency 16.

Every child runs in its own session and is killed (SIGTERM, then SIGKILL) in a ``finally``, the
demo backend (the worker starts it in a session of its own) included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
STAGING_CLI = str(BIN / "staging-cli") if (BIN / "staging-cli").exists() else "staging-cli"
MODEL = "bench-m"
CHAT_PATH = "/v1/chat/completions"
TICK = os.sysconf("SC_CLK_TCK")


# -- the load generator (a child process) ----------------------------------------------------


def _request_bytes(url: str, model: str) -> tuple[str, int, bytes]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return host, port, head + body


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, int, bytes]] | None = None
        self.size = 0
        self.sample = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a protocol error: fail the request in flight
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.size = 0
        self.sample = b""

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if len(self.sample) < 400:
            self.sample += body[:400]

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.size, self.sample))
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()

    async def request(self, payload: bytes) -> tuple[int, int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter


@dataclass
class _Shared:
    record: bool = False
    stop: bool = False
    max_requests: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    first_error: str = ""
    body_sample: str = ""
    started: float = 0.0
    ended: float = 0.0


async def _client(host: str, port: int, payload: bytes, shared: _Shared) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    clock = time.perf_counter
    while not shared.stop:
        if conn is None or conn.closed:
            _, conn = await loop.create_connection(_Conn, host, port)
        t0 = clock()
        try:
            status, _size, sample = await conn.request(payload)
        except (OSError, Exception) as exc:
            if shared.record:
                shared.errors += 1
                shared.first_error = shared.first_error or f"{type(exc).__name__}: {exc}"
            conn = None
            continue
        elapsed = clock() - t0
        if not shared.record:
            continue
        shared.statuses[status] = shared.statuses.get(status, 0) + 1
        if status != 200:
            shared.errors += 1
            shared.first_error = shared.first_error or f"{status}: {sample[:300]!r}"
        elif not shared.body_sample:
            shared.body_sample = sample[:200].decode("utf-8", "replace")
        shared.latencies.append(elapsed)
        if len(shared.latencies) + shared.errors >= shared.max_requests:
            shared.stop = True
            shared.ended = clock()
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def _loadgen(
    url: str, model: str, concurrency: int, warmup: float, duration: float, max_requests: int
) -> dict[str, Any]:
    host, port, payload = _request_bytes(url, model)
    shared = _Shared(max_requests=max_requests)
    tasks = [asyncio.create_task(_client(host, port, payload, shared)) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    shared.record = True
    shared.started = time.perf_counter()
    cpu0 = os.times()
    deadline = shared.started + duration
    while not shared.stop and time.perf_counter() < deadline:
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.01)
    if not shared.stop:
        shared.stop = True
        shared.ended = time.perf_counter()
    cpu1 = os.times()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            shared.first_error = shared.first_error or repr(task.exception())
            shared.errors += 1
    lat = sorted(shared.latencies)
    return {
        "requests": len(lat),
        "errors": shared.errors,
        "statuses": shared.statuses,
        "seconds": shared.ended - shared.started,
        "latencies_ms": [x * 1000 for x in lat],
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "first_error": shared.first_error,
        "body_sample": shared.body_sample,
    }


def loadgen_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="router_overhead.py _loadgen")
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("concurrency", type=int)
    p.add_argument("warmup", type=float)
    p.add_argument("duration", type=float)
    p.add_argument("max_requests", type=int)
    a = p.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(_loadgen(a.url, a.model, a.concurrency, a.warmup, a.duration, a.max_requests))
    print(json.dumps(result), flush=True)
    return 0


# -- processes --------------------------------------------------------------------------------


class Children:
    """Every process the bench starts, so that all of them are stopped at the end."""

    def __init__(self, scratch: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.scratch = scratch

    def start(self, argv: Sequence[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(list(argv), env=env, text=True, start_new_session=True, **kw)
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
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        # the demo backend runs in a session of its own: stop any left behind (it names a model
        # path inside our scratch directory, so no other process matches)
        for pid in backend_pids(self.scratch):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def backend_pids(scratch: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [c.decode(errors="replace") for c in cmd]
        if "staging_cli.worker.demo_backend" in text and any(str(scratch) in c for c in text):
            found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_server(
    children: Children, argv: list[str], env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[str], str]:
    """Start a server that prints ``listening on URL``; its stderr goes to ``log``."""
    with log.open("w") as err:
        proc = children.start(argv, env, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        children.stop(proc)
        raise RuntimeError(
            f"{' '.join(argv[:2])} did not start: {line!r}\n{log.read_text()[-2000:]}"
        )
    return proc, line.split()[-1]


def post_json(url: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Cell:
    target: str
    concurrency: int
    rps: float
    p50: float
    p99: float
    requests: int
    errors: int
    cpu_ms: dict[str, float]  # process -> CPU ms per request


def pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    children: Children,
    env: dict[str, str],
    target: str,
    url: str,
    concurrency: int,
    args: argparse.Namespace,
    pids: dict[str, int],
) -> Cell:
    argv = [sys.executable, str(Path(__file__).resolve()), "_loadgen", url, MODEL,
            str(concurrency), str(args.warmup), str(args.duration), str(args.max_requests)]  # fmt: skip
    proc = children.start(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # sample the servers' CPU over the measured window (after the warm-up)
    time.sleep(args.warmup)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    try:
        out, err = proc.communicate(timeout=args.warmup + args.duration + 60)
    except subprocess.TimeoutExpired:
        children.stop(proc)
        raise RuntimeError(f"the load generator for {target} c={concurrency} hung") from None
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed ({proc.returncode}): {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if result["errors"] or not result["requests"]:
        print(
            f"  ! {target} c={concurrency}: {result['errors']} errors "
            f"(statuses {result['statuses']}; first: {result['first_error']})",
            file=sys.stderr,
        )
    n = max(1, result["requests"])
    lat = result["latencies_ms"]
    cpu = {"loadgen": result["cpu_s"] * 1000 / n}
    for name in pids:
        if target == "direct" and name == "router":
            continue
        cpu[name] = (after[name] - before[name]) * 1000 / n
    return Cell(
        target=target,
        concurrency=concurrency,
        rps=result["requests"] / result["seconds"] if result["seconds"] > 0 else 0.0,
        p50=pct(lat, 0.50),
        p99=pct(lat, 0.99),
        requests=result["requests"],
        errors=result["errors"],
        cpu_ms=cpu,
    )


def median_cell(cells: list[Cell]) -> Cell:
    med = statistics.median
    names = {k for c in cells for k in c.cpu_ms}
    return Cell(
        target=cells[0].target,
        concurrency=cells[0].concurrency,
        rps=med(c.rps for c in cells),
        p50=med(c.p50 for c in cells),
        p99=med(c.p99 for c in cells),
        requests=sum(c.requests for c in cells),
        errors=sum(c.errors for c in cells),
        cpu_ms={k: med(c.cpu_ms.get(k, 0.0) for c in cells) for k in sorted(names)},
    )


def print_cells(cells: list[Cell], title: str) -> None:
    print(title)
    print(
        f"  {'target':<7} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} "
        f"{'errors':>6}   CPU ms/request: loadgen router worker backend"
    )
    for c in cells:
        cpu = "  ".join(
            f"{c.cpu_ms[k]:6.2f}" if k in c.cpu_ms else f"{'-':>6}"
            for k in ("loadgen", "router", "worker", "backend")
        )
        print(
            f"  {c.target:<7} {c.concurrency:>3} {c.rps:>8.0f} {c.p50:>8.2f} {c.p99:>8.2f} "
            f"{c.requests:>9} {c.errors:>6}   {' ' * 15}{cpu}"
        )


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Latency and throughput the router adds to small chat completions.",
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell (3)")
    p.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds per cell (0.5)")
    p.add_argument(
        "--max-requests", type=int, default=20000, help="stop a cell after this many (20000)"
    )
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels (1,16)")
    p.add_argument("--runs", type=int, default=3, help="interleaved repetitions; medians (3)")
    p.add_argument("--size", default="1MiB", help="size of the generated model file (1MiB)")
    p.add_argument("--tmp", type=Path, default=None, help="parent of the scratch directory")
    p.add_argument(
        "--router-only", action="store_true", help="skip the direct cells (profiling runs)"
    )
    p.add_argument(
        "--hold", type=float, default=0.0,
        help="before measuring, print the router's pid and wait this many seconds (to attach "
        "a profiler)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="router-overhead-", dir=args.tmp))
    children = Children(scratch)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        env = dict(os.environ)
        for name in ("STATE", "CACHE", "CONFIG", "DATA"):
            env[f"STAGING_CLI_{name}_DIR"] = str(scratch / name.lower())
        env.pop("STAGING_CLI_DSN", None)
        models = scratch / "models"
        models.mkdir()
        model_file = models / f"{MODEL}.gguf"
        subprocess.run(
            [sys.executable, "-m", "staging_cli.sample", str(model_file), args.size],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip

        worker_proc, worker_url = start_server(
            children,
            [STAGING_CLI, "worker", "--dir", str(scratch / "worker"), "--port", "0",
             "--demo-backend", "--log-level", "warning"],
            env, scratch / "worker.log",
        )  # fmt: skip
        staged = subprocess.run(
            [STAGING_CLI, "stage", str(model_file), "--model", MODEL, "--worker", worker_url,
             "--json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if staged.returncode != 0:
            raise RuntimeError(f"staging failed ({staged.returncode}): {staged.stderr[-2000:]}")
        router_proc, router_url = start_server(
            children,
            [STAGING_CLI, "serve", "--port", "0", "--worker", worker_url, "--models-dir",
             str(models), "--log-level", "warning"],
            env, scratch / "router.log",
        )  # fmt: skip

        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        status, answer = post_json(worker_url + CHAT_PATH, body)
        if status != 200:
            raise RuntimeError(f"the worker answered {status}: {answer[:500]!r}")
        deadline = time.monotonic() + 60
        while True:
            status, answer = post_json(router_url + CHAT_PATH, body, timeout=60)
            if status == 200:
                break
            if status != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"the router answered {status}: {answer[:500]!r}")
            time.sleep(0.2)
        backends = backend_pids(scratch)
        if len(backends) != 1:
            raise RuntimeError(f"expected one demo backend process, found {backends}")
        pids = {"router": router_proc.pid, "worker": worker_proc.pid, "backend": backends[0]}
        print(
            f"worker {worker_url}  router {router_url}  model {MODEL} ({args.size})  "
            f"answer {len(answer)} bytes; {args.runs} run(s) x {args.duration:g} s per cell "
            f"(+{args.warmup:g} s warm-up); {os.cpu_count()} CPUs",
            flush=True,
        )
        if args.hold > 0:
            print(f"router pid {router_proc.pid}: holding {args.hold:g} s", flush=True)
            time.sleep(args.hold)

        targets = [("router", router_url)]
        if not args.router_only:
            targets.insert(0, ("direct", worker_url))
        runs: dict[tuple[str, int], list[Cell]] = {}
        for _ in range(args.runs):
            for level in levels:
                for target, url in targets:
                    cell = measure(children, env, target, url, level, args, pids)
                    runs.setdefault((target, level), []).append(cell)
        cells = [median_cell(runs[(t, c)]) for c in levels for t, _ in targets]
        title = "median of runs" if args.runs > 1 else "results"
        print_cells(cells, f"{title} (latency per request as the client sees it)")

        by = {(c.target, c.concurrency): c for c in cells}
        if ("direct", 1) in by and ("router", 1) in by:
            added = by[("router", 1)].p50 - by[("direct", 1)].p50
            ok = added <= 2.0
            print(
                f"router p50 - direct p50 at c=1:        {added:6.2f} ms  "
                f"(target <= 2 ms)  {'OK' if ok else 'MISSED'}"
            )
        top = max(levels)
        if top > 1 and ("direct", top) in by and ("router", top) in by and by[("direct", top)].rps:
            ratio = by[("router", top)].rps / by[("direct", top)].rps
            ok = ratio >= 0.5
            print(
                f"router / direct throughput at c={top}:  {ratio:6.2f} x   "
                f"(target >= 0.5)  {'OK' if ok else 'MISSED'}"
            )
        if any(c.errors for c in cells):
            print("errors occurred: see the messages above", file=sys.stderr)
            return 1
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        children.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        sys.exit(loadgen_main(sys.argv[2:]))
    sys.exit(main())
