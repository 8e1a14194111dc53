"""A fault-injecting TCP proxy for tests: cuts connections at random offsets and can flip a
byte in flight. Runs its own event loop in a thread; always stopped by its context manager."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Faults:
    cuts: int = 0  # how many connections to cut in total
    cut_min: int = 256 * 1024  # cut after this many client->server bytes at least
    cut_max: int = 8 * 1024 * 1024
    corrupt_at: int | None = None  # flip the byte at this client->server offset, once
    idle_timeout: float | None = None  # like a load balancer: cut a connection silent this long
    seed: int = 1
    done_cuts: int = 0
    corrupted: int = 0
    connections: int = 0
    idle_cuts: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class FaultProxy:
    def __init__(self, target: str, faults: Faults) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.target = (host, int(port))
        self.faults = faults
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._activity: dict[int, float] = {}

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        budget: int | None,
        corrupt: bool,
        conn: int = 0,
    ) -> None:
        sent = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                f = self.faults
                if (
                    corrupt
                    and f.corrupt_at is not None
                    and not f.corrupted
                    and sent <= f.corrupt_at < sent + len(data)
                ):
                    i = f.corrupt_at - sent
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                    f.corrupted += 1
                if budget is not None and sent + len(data) >= budget:
                    writer.write(data[: budget - sent])
                    await writer.drain()
                    f.done_cuts += 1
                    break
                writer.write(data)
                await writer.drain()
                sent += len(data)
                self._activity[conn] = asyncio.get_running_loop().time()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        f = self.faults
        f.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        budget = None
        if f.done_cuts < f.cuts:
            budget = f.rng.randint(f.cut_min, f.cut_max)
        self._activity[id(client_w)] = asyncio.get_running_loop().time()
        up = asyncio.ensure_future(self._pipe(client_r, server_w, budget, True, id(client_w)))
        down = asyncio.ensure_future(self._pipe(server_r, client_w, None, False, id(client_w)))
        waiters = [up, down]
        if f.idle_timeout is not None:
            waiters.append(asyncio.ensure_future(self._idle_watch(id(client_w), f.idle_timeout)))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for t in waiters[2:]:
            t.cancel()
        for t in (up, down):
            t.cancel()
        server_w.transport.abort()
        client_w.transport.abort()

    async def _idle_watch(self, conn: int, idle: float) -> None:
        loop = asyncio.get_running_loop()
        while True:  # polling: the pipes only stamp a time, they signal nobody
            silent = loop.time() - self._activity.get(conn, loop.time())
            if silent >= idle:
                break
            await asyncio.sleep(min(0.05, idle - silent))
        self.faults.idle_cuts += 1

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        self._ready.wait(10)
        try:
            yield self
        finally:

            async def stop() -> None:
                if self._server is not None:
                    self._server.close()
                tasks = [
                    t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()
                ]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._loop.stop()

            asyncio.run_coroutine_threadsafe(stop(), self._loop)
            thread.join(timeout=10)
