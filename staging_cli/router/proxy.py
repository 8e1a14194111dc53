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

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)


HOP_BY_HOP_RAW = frozenset(name.encode("latin-1") for name in HOP_BY_HOP)

BUFFER_LIMIT = 1 << 20  # answers up to this Content-Length are relayed as one plain response

# what aiohttp raises when the worker cannot be reached or breaks off (timeouts are OSErrors)
_AIOHTTP_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)


class ForwardingClient(httpx.AsyncClient):
    """A worker's client: httpx for control calls (status, repository API) and, for
    :func:`forward`, an aiohttp session made on first use (inside the running loop) with the
    same ``Authorization`` header and connect timeout, no read timeout, no connection limit,
    no cookies, and none of aiohttp's automatic request headers (the client's are relayed)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session: aiohttp.ClientSession | None = None

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


def _filtered(
    headers: Iterable[tuple[str, str]], drop: Iterable[str] = ()
) -> list[tuple[str, str]]:
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    skip = HOP_BY_HOP | named | {d.lower() for d in drop}
    return [(k, v) for k, v in pairs if k.lower() not in skip]


def _filtered_raw(
    headers: Iterable[tuple[bytes, bytes]], keep_length: bool
) -> list[tuple[bytes, bytes]]:
    """``_filtered`` for raw (bytes) response headers, names lower-cased for ASGI."""
    pairs = [(k.lower(), v) for k, v in headers]
    named = {
        token.strip().lower() for k, v in pairs if k == b"connection" for token in v.split(b",")
    }
    skip = HOP_BY_HOP_RAW | named
    if not keep_length:
        skip = skip | {b"content-length"}
    return [(k, v) for k, v in pairs if k not in skip]


def _unreachable(worker: str, exc: BaseException) -> JSONResponse:
    return openai_error(
        502,
        f"the worker {worker} could not be reached ({type(exc).__name__}: {exc}); "
        "retry: the router will place the model again if the worker is gone",
        "worker_unreachable",
    )


@dataclass
class Forwarded:
    response: Response
    reached: bool = True  # False: the worker could not be reached at all
    model_missing: bool = False  # the worker does not have the model loaded (any more)


MISSING_CODES = ("model_not_found", "model_not_loaded")


async def forward(
    request: Request,
    body: bytes,
    worker: str,
    client: httpx.AsyncClient,
    on_close: Callable[[], None] | None = None,
) -> Forwarded:
    """Send ``request`` (whose body was read as ``body``) to ``worker`` and relay the answer.
    ``on_close`` runs once the answer has been relayed completely (or failed)."""
    closed = False

    def close() -> None:
        nonlocal closed
        if not closed and on_close is not None:
            closed = True
            on_close()

    headers = _filtered(request.headers.items(), drop=("host", "content-length", "authorization"))
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
    response_headers = _filtered(upstream.headers.multi_items(), drop=("content-length",))

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
    except _AIOHTTP_ERRORS as exc:
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
        except _AIOHTTP_ERRORS as exc:
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
        response.raw_headers = _filtered_raw(upstream.raw_headers, keep_length=True)
        return Forwarded(response)
    return Forwarded(_Relay(upstream, close))


class _Relay(StreamingResponse):
    """A streamed worker answer relayed as it arrives (Starlette's disconnect handling), with
    the upstream response and ``close`` settled exactly once however the relay ends."""

    def __init__(self, upstream: aiohttp.ClientResponse, close: Callable[[], None]) -> None:
        # not StreamingResponse.__init__: the body is read in stream_response
        self.upstream = upstream
        self.close = close
        self.status_code = upstream.status
        self.background = None
        self.raw_headers = _filtered_raw(upstream.raw_headers, keep_length=False)

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        stream = self.upstream.content
        try:
            while True:
                chunk = await stream.readany()
                if not chunk:
                    break
                # the worker's end already arrived: end the answer with this same write
                last = stream.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
        except _AIOHTTP_ERRORS as exc:
            # the worker vanished mid-answer. The status is sent already; ending the body
            # normally would pass a cut answer off as complete, so the connection is aborted
            # (no final chunk) and the client sees the truncation
            raise ConnectionResetError(f"the worker vanished mid-answer: {exc}") from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                if self.upstream.content.at_eof():
                    self.upstream.release()  # keep-alive: the connection goes back to the pool
                else:
                    self.upstream.close()  # cut short: the worker sees the disconnect
            finally:
                self.close()
