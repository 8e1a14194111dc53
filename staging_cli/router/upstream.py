"""A lean HTTP/1.1 client for the router's forwarded requests: an ``asyncio.Protocol`` with the
httptools response parser and a small keep-alive pool per worker.

Why hand-written rather than a library: the router's CPU per forwarded small completion is what
limits its throughput (client, router, worker and backend share the cores), and a general client
spends most of its time on things a proxy hop does not need: aiohttp's ``ClientSession._request``
builds a request object, header multidicts, a payload writer, a stream reader, timers and
tracing hooks per request, about as much CPU as the rest of the router's work. This client
writes the request in one ``transport.write`` (head and body prebuilt as bytes), parses the
answer with httptools (the parser uvicorn already uses, a dependency through
``uvicorn[standard]``) and hands back raw header pairs and the body. It does only plain
``http://`` workers, one request per connection at a time, no redirects, cookies, proxies or
decompression; everything else (``https``, streamed requests) stays on aiohttp
(``proxy._forward_aiohttp``).

An answer is delivered in one of two modes, decided when its headers are complete:

- *buffered*: a 404, or a known ``Content-Length`` up to ``buffer_limit`` that is not an event
  stream: the caller gets the whole answer at once (usually within a single ``data_received``);
- *streamed*: anything else: the caller gets the headers, then reads the body piece by piece
  (:meth:`Exchange.read`), with reading paused while ``buffer_limit`` bytes wait unread.

A reused keep-alive connection that turns out to be closed before any byte of the answer
arrived is retried once on a fresh connection (the worker closed it while idle).
"""

from __future__ import annotations

import asyncio
import collections
import time
from urllib.parse import urlsplit

import httptools

IDLE_TIMEOUT = 30.0  # seconds an idle connection is kept (the worker's uvicorn keeps 75 s)
MAX_IDLE = 64  # idle connections kept per worker


class UpstreamError(ConnectionError):
    """The worker could not be reached, or broke off, or answered something unparseable."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a worker; one exchange at a time."""

    def __init__(self, buffer_limit: int) -> None:
        self.buffer_limit = buffer_limit
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.used = False  # an exchange ran on it already (so a close may be a stale keep-alive)
        self._begin()

    def _begin(self) -> None:
        self.active = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.pending = 0  # bytes in chunks
        self.received = False  # any byte of the answer arrived
        self.headers_done = False
        self.complete = False
        self.streamed = False
        self.until_close = False  # neither Content-Length nor chunked: the body ends at EOF
        self.keep_alive = False  # (httptools forgets it once the message is complete)
        self.error: BaseException | None = None
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # nothing asked for: a protocol violation (or a late answer); drop the connection
            self._abort(UpstreamError("the worker sent data no request asked for"))
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._abort(UpstreamError("the worker upgraded the connection"))
        except httptools.HttpParserError as exc:
            self._abort(UpstreamError(f"the worker's answer is not valid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.active or self.complete:
            return
        if self.headers_done and self.until_close and self.error is None:
            self.complete = True
        elif self.error is None:
            self.error = UpstreamError(
                f"the worker closed the connection{': ' + str(exc) if exc else ''}"
            )
        self._wake()

    def pause_writing(self) -> None:  # the request is written whole; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:
            # an interim answer (100 Continue and the like): not expected, not supported
            self._abort(UpstreamError(f"the worker sent an interim {self.status} answer"))
            return
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        length: int | None = None
        chunked = False
        event_stream = False
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-type":
                event_stream = value.lower().startswith(b"text/event-stream")
        self.until_close = length is None and not chunked
        small = length is not None and length <= self.buffer_limit and not event_stream
        if not (self.status == 404 or small):
            self.streamed = True
            self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.pending += len(body)
        if self.streamed:
            if self.pending > self.buffer_limit and not self.paused and self.transport:
                self.paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- the exchange ----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _abort(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    async def wait(self) -> None:
        """Until something the caller waits for happened (headers for a streamed answer, the
        end for a buffered one, the next piece, an error)."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class Exchange:
    """One request's answer: ``status``, ``headers`` (raw pairs, names lower-cased), and either
    ``body`` (buffered) or :meth:`read` (streamed). :meth:`finish` must be called once."""

    __slots__ = ("_conn", "_pool", "body", "headers", "status", "streamed")

    def __init__(self, pool: WorkerConnections, conn: _Conn) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = conn.status
        self.headers = conn.headers
        self.streamed = conn.streamed
        if conn.streamed:
            self.body = b""
        else:
            chunks = conn.chunks
            self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            conn.pending = 0

    @property
    def at_eof(self) -> bool:
        conn = self._conn
        return conn is None or (conn.complete and not conn.chunks)

    async def read(self) -> bytes:
        """The next piece of a streamed body; ``b""`` at its end. Raises UpstreamError when the
        worker breaks off."""
        conn = self._conn
        if conn is None:
            return b""
        while not conn.chunks:
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return b""
            await conn.wait()
        data = b"".join(conn.chunks) if len(conn.chunks) > 1 else conn.chunks[0]
        conn.chunks.clear()
        conn.pending = 0
        if conn.paused and conn.transport is not None and not conn.lost:
            conn.paused = False
            conn.transport.resume_reading()
        return data

    def finish(self) -> None:
        """Give the connection back (answer read to its end, keep-alive) or close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)


class WorkerConnections:
    """Keep-alive connections to one ``http://`` worker and the request head they share."""

    def __init__(
        self,
        url: str,
        authorization: str | None,
        *,
        connect_timeout: float | None,
        buffer_limit: int,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
            raise ValueError(f"not a plain http:// worker URL: {url}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.connect_timeout = connect_timeout
        self.buffer_limit = buffer_limit
        fixed = b"host: " + parts.netloc.encode("latin-1") + b"\r\n"
        if authorization:
            fixed += b"authorization: " + authorization.encode("latin-1") + b"\r\n"
        self.fixed_headers = fixed
        self._idle: collections.deque[_Conn] = collections.deque()
        self._closed = False

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        limit = self.buffer_limit
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Conn(limit), self.host, self.port)
        except TimeoutError as exc:
            raise UpstreamError(f"connecting to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        return conn

    def _acquire_idle(self) -> _Conn | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.lost or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > IDLE_TIMEOUT:
                conn.transport.close()
                continue
            return conn
        return None

    def _release(self, conn: _Conn) -> None:
        reusable = (
            conn.complete
            and conn.error is None
            and not conn.chunks
            and not conn.lost
            and not conn.paused
            and conn.keep_alive
            and not self._closed
            and len(self._idle) < MAX_IDLE
        )
        if reusable:
            conn._begin()
            conn.used = True
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.lost = True
            conn.transport.close()

    def request_head(self, method: bytes, target: bytes, headers: bytes, length: int) -> bytes:
        """The request line and headers: ``headers`` are the client's (already filtered, as
        ``name: value\\r\\n`` lines), then Host, the worker's Authorization and the length."""
        return b"%s %s%s HTTP/1.1\r\n%s%scontent-length: %d\r\n\r\n" % (
            method,
            self.prefix,
            target,
            self.fixed_headers,
            headers,
            length,
        )

    async def send(self, payload: bytes) -> Exchange:
        """Send one prebuilt request; return once the answer is buffered whole, or once the
        headers of a streamed answer are in. Raises UpstreamError."""
        for attempt in range(2):
            conn = self._acquire_idle() if attempt == 0 else None
            if conn is None:
                conn = await self._connect()
            conn.active = True
            assert conn.transport is not None
            try:
                conn.transport.write(payload)
                while conn.error is None and not conn.complete and not conn.streamed:
                    await conn.wait()
            except BaseException:
                conn.lost = True
                conn.transport.abort()  # cancelled mid-exchange: the connection is unusable
                raise
            if conn.error is not None:
                conn.lost = True
                conn.transport.abort()
                if conn.used and not conn.received and attempt == 0:
                    continue  # a stale keep-alive connection: once more on a fresh one
                raise conn.error
            return Exchange(self, conn)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
