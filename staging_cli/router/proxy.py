"""Forwarding one OpenAI-style request to a worker and streaming the answer back unchanged.

Bytes are passed through as they arrive (no decompression, no re-chunking, no buffering), so
Server-Sent Events reach the client as the backend emits them. Hop-by-hop headers (RFC 9110
section 7.6.1, plus those named in ``Connection``) are dropped both ways; the client's
``Authorization`` is replaced by the worker's token.

A worker's client is a :class:`ForwardingClient`: httpx for the router's control calls, and an
aiohttp session for the forwarded requests, because per request httpx costs about five times the
CPU of aiohttp (~1 ms against ~0.2 ms here), which is most of what the router adds to a small
completion. Any other ``httpx.AsyncClient`` (a test's transport) is forwarded with httpx.

Two shortcuts that buffer nothing a client could have had earlier: an answer whose
``Content-Length`` is known (and small, and not an event stream) is read whole and sent as one
plain response; and a streamed answer's last piece goes out together with the end of the
stream when the worker's end has already arrived (one write to the client instead of two).

The common case, a request that does not ask for a stream (no ``"stream": true``) to a plain
``http://`` worker, skips aiohttp too: :mod:`.upstream` (a small protocol + httptools client
with a keep-alive pool per worker) sends it as one write with a prebuilt head. Together with the
pure-ASGI entry for POST /v1/* (``app._InferenceFirst``) this took the router's CPU per small
completion from ~0.40 ms to ~0.13 ms in ``bench/router_overhead.py`` at concurrency 16 (and the
worker's too: one read per request instead of two). Streamed requests, ``https`` workers and
requests with ``Expect`` stay on aiohttp.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import yarl
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..relay import (
    AIOHTTP_ERRORS,
    BUFFER_LIMIT,
    HOP_BY_HOP_RAW,
    AiohttpRelay,
    request_headers,
    response_headers,
)
from .upstream import Exchange, UpstreamError, WorkerConnections


class ForwardingClient(httpx.AsyncClient):
    """A worker's client: httpx for control calls (status, repository API); for :func:`forward`
    the lean :class:`.upstream.WorkerConnections` of each plain ``http://`` worker, and an
    aiohttp session (streamed requests, anything else) made on first use (inside the running
    loop) with the same ``Authorization`` header and connect timeout, no read timeout, no
    connection limit, no cookies, and none of aiohttp's automatic request headers (the client's
    are relayed)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session: aiohttp.ClientSession | None = None
        self._connections: dict[str, WorkerConnections | None] = {}

    def connections(self, worker: str) -> WorkerConnections | None:
        """The lean keep-alive pool for ``worker`` (None when it is not plain ``http://``)."""
        try:
            return self._connections[worker]
        except KeyError:
            pass
        try:
            conns: WorkerConnections | None = WorkerConnections(
                worker,
                self.headers.get("authorization"),
                connect_timeout=self.timeout.connect,
                buffer_limit=BUFFER_LIMIT,
            )
        except ValueError:
            conns = None
        self._connections[worker] = conns
        return conns

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            auth = self.headers.get("authorization")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
                headers={"Authorization": auth} if auth else None,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=None, sock_connect=self.timeout.connect, sock_read=None
                ),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def aclose(self) -> None:
        for conns in self._connections.values():
            if conns is not None:
                conns.close()
        try:
            if self._session is not None:
                await self._session.close()
        finally:
            await super().aclose()


def openai_error(
    status: int, message: str, code: str, kind: str = "server_error", **extra: object
) -> JSONResponse:
    body: dict[str, object] = {"message": message, "type": kind, "code": code, **extra}
    return JSONResponse({"error": body}, status_code=status)


def _unreachable(worker: str, exc: BaseException) -> JSONResponse:
    return openai_error(
        502,
        f"the worker {worker} could not be reached ({type(exc).__name__}: {exc}); "
        "retry: the router will place the model again if the worker is gone",
        "worker_unreachable",
    )


# request headers never relayed as they are: hop-by-hop, and those the router sets itself
_REQUEST_SKIP_RAW = HOP_BY_HOP_RAW | {b"host", b"content-length", b"authorization"}


def _request_headers_raw(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The client's request headers to relay, as ``name: value\r\n`` lines; None when the
    request has something the lean client does not do (``Expect``)."""
    lines: list[bytes] = []
    named: set[bytes] | None = None
    for name, value in headers:
        name = name.lower()
        if name in _REQUEST_SKIP_RAW:
            if name == b"connection":
                tokens = {token.strip().lower() for token in value.split(b",")}
                named = tokens if named is None else named | tokens
            continue
        if name == b"expect":
            return None
        lines.append(b"%s: %s\r\n" % (name, value))
    if named:
        lines = [line for line in lines if line.partition(b":")[0] not in named]
    return b"".join(lines)


def _response_headers_raw(
    headers: list[tuple[bytes, bytes]], keep_length: bool
) -> list[tuple[bytes, bytes]]:
    """``_filtered_raw`` for headers whose names are lower-cased already."""
    skip = HOP_BY_HOP_RAW if keep_length else _SKIP_WITH_LENGTH
    for name, value in headers:
        if name == b"connection":
            skip = skip | {token.strip().lower() for token in value.split(b",")}
    return [(k, v) for k, v in headers if k not in skip]


_SKIP_WITH_LENGTH = HOP_BY_HOP_RAW | {b"content-length"}


@dataclass
class Forwarded:
    response: Response
    reached: bool = True  # False: the worker could not be reached at all
    model_missing: bool = False  # the worker does not have the model loaded (any more)


MISSING_CODES = ("model_not_found", "model_not_loaded")


async def forward(
    scope: Scope,
    body: bytes,
    worker: str,
    client: httpx.AsyncClient,
    on_close: Callable[[], None] | None = None,
    *,
    stream: bool = False,
) -> Forwarded:
    """Send the request of ``scope`` (whose body was read as ``body``) to ``worker`` and relay
    the answer; ``stream``: the client asked for a streamed answer. ``on_close`` runs once the
    answer has been relayed completely (or failed)."""
    closed = False

    def close() -> None:
        nonlocal closed
        if not closed and on_close is not None:
            closed = True
            on_close()

    if not stream and isinstance(client, ForwardingClient):
        conns = client.connections(worker)
        if conns is not None:
            head = _request_headers_raw(scope["headers"])
            if head is not None:
                return await _forward_fast(scope, head, body, worker, conns, close)
    request = Request(scope)
    headers = request_headers(
        request.headers.items(), drop=("host", "content-length", "authorization")
    )
    url = worker + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    if isinstance(client, ForwardingClient):
        return await _forward_aiohttp(request.method, url, headers, body, worker, client, close)
    upstream_request = client.build_request(request.method, url, headers=headers, content=body)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.TransportError as exc:
        close()
        return Forwarded(_unreachable(worker, exc), reached=False)
    except BaseException:
        close()
        raise
    if upstream.status_code == 404:
        # small JSON error: read it to tell "the worker lost this model" from other 404s
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
            close()
        try:
            code = json.loads(content).get("error", {}).get("code")
        except (ValueError, AttributeError):
            code = None
        response = Response(
            content, status_code=404, media_type=upstream.headers.get("content-type")
        )
        return Forwarded(response, model_missing=code in MISSING_CODES)
    response_headers = request_headers(upstream.headers.multi_items(), drop=("content-length",))

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TransportError:
            # the worker vanished mid-answer: the status is sent already, so end the stream;
            # the client sees a truncated body rather than a hang
            return
        finally:
            await upstream.aclose()
            close()

    response = StreamingResponse(relay(), status_code=upstream.status_code)
    response.raw_headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response_headers
    ]
    return Forwarded(response)


async def _forward_aiohttp(
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
    worker: str,
    client: ForwardingClient,
    close: Callable[[], None],
) -> Forwarded:
    try:
        upstream = await client.session().request(
            method,
            yarl.URL(url, encoded=True),  # the client's path and query, byte for byte
            headers=headers,
            data=body,
            allow_redirects=False,
        )
    except AIOHTTP_ERRORS as exc:
        close()
        return Forwarded(_unreachable(worker, exc), reached=False)
    except BaseException:
        close()
        raise
    length = upstream.content_length
    small = (
        length is not None
        and length <= BUFFER_LIMIT
        and not upstream.headers.get("content-type", "").startswith("text/event-stream")
    )
    if upstream.status == 404 or small:
        # read it whole: a 404 to tell "the worker lost this model" from other 404s; a small
        # answer of known length to send it as one plain response (nothing streams earlier)
        try:
            content = await upstream.read()
        except AIOHTTP_ERRORS as exc:
            upstream.close()
            close()
            return Forwarded(_unreachable(worker, exc), reached=False)
        except BaseException:
            upstream.close()
            close()
            raise
        upstream.release()
        close()
        if upstream.status == 404:
            try:
                code = json.loads(content).get("error", {}).get("code")
            except (ValueError, AttributeError):
                code = None
            response = Response(
                content, status_code=404, media_type=upstream.headers.get("content-type")
            )
            return Forwarded(response, model_missing=code in MISSING_CODES)
        response = Response(content, status_code=upstream.status)
        response.raw_headers = response_headers(upstream.raw_headers, keep_length=True)
        return Forwarded(response)
    return Forwarded(AiohttpRelay(upstream, close, f"the worker {worker}"))


async def _forward_fast(
    scope: Scope,
    headers: bytes,
    body: bytes,
    worker: str,
    conns: WorkerConnections,
    close: Callable[[], None],
) -> Forwarded:
    target = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string")
    if query:
        target += b"?" + query
    payload = conns.request_head(scope["method"].encode("latin-1"), target, headers, len(body))
    try:
        exchange = await conns.send(payload + body)
    except UpstreamError as exc:
        close()
        return Forwarded(_unreachable(worker, exc), reached=False)
    except BaseException:
        close()
        raise
    if exchange.streamed:
        return Forwarded(_FastRelay(exchange, close))
    exchange.finish()
    close()
    if exchange.status == 404:
        try:
            code = json.loads(exchange.body).get("error", {}).get("code")
        except (ValueError, AttributeError):
            code = None
        media_type = next((v for k, v in exchange.headers if k == b"content-type"), None)
        response = Response(
            exchange.body,
            status_code=404,
            media_type=media_type.decode("latin-1") if media_type is not None else None,
        )
        return Forwarded(response, model_missing=code in MISSING_CODES)
    return Forwarded(
        _Plain(exchange.status, _response_headers_raw(exchange.headers, True), exchange.body)
    )


class _Plain(Response):
    """A whole answer with its headers as they are (no Starlette header processing)."""

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        # not Response.__init__: nothing to render, the headers are final
        self.status_code = status
        self.raw_headers = raw_headers
        self.body = body
        self.background = None


class _FastRelay(StreamingResponse):
    """``_Relay`` for an answer streamed through :mod:`.upstream`."""

    def __init__(self, exchange: Exchange, close: Callable[[], None]) -> None:
        # not StreamingResponse.__init__: the body is read in stream_response
        self.exchange = exchange
        self.close = close
        self.status_code = exchange.status
        self.background = None
        self.raw_headers = _response_headers_raw(exchange.headers, keep_length=False)

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        exchange = self.exchange
        try:
            while True:
                chunk = await exchange.read()
                if not chunk:
                    break
                last = exchange.at_eof
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
        except UpstreamError as exc:
            raise ConnectionResetError(f"the worker vanished mid-answer: {exc}") from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                self.exchange.finish()  # keep-alive if read to the end, closed otherwise
            finally:
                self.close()
