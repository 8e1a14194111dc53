"""Relaying HTTP answers through a proxy hop: shared by the router (client -> worker) and the
worker's ``/v1`` proxy (worker -> backend).

Hop-by-hop headers (RFC 9110 section 7.6.1, plus those named in ``Connection``) are dropped both
ways. :class:`AiohttpRelay` streams an aiohttp answer to the ASGI client as it arrives: no
decompression, no re-chunking, no buffering (Server-Sent Events pass through), the last piece
sent together with the end of the body when the upstream's end has already arrived, and the
upstream connection and the caller's ``on_done`` settled exactly once however the relay ends
(finished: the connection goes back to the pool; client gone or upstream broken off: it is
closed). An upstream that breaks off mid-answer aborts the client connection (no final chunk),
so a cut answer is never passed off as complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import aiohttp
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("staging_cli.relay")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
HOP_BY_HOP_RAW = frozenset(name.encode("latin-1") for name in HOP_BY_HOP)

BUFFER_LIMIT = 1 << 20  # answers of known length up to this size are relayed as one response

# what aiohttp raises when the upstream cannot be reached or breaks off (timeouts are OSErrors)
AIOHTTP_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)


def request_headers(
    headers: Iterable[tuple[str, str]], drop: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Headers to forward upstream: without hop-by-hop ones, those named in ``Connection`` and
    ``drop`` (lower-case names, e.g. host, content-length, authorization)."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    skip = HOP_BY_HOP | named | set(drop)
    return [(k, v) for k, v in pairs if k.lower() not in skip]


def response_headers(
    headers: Iterable[tuple[bytes, bytes]], *, keep_length: bool
) -> list[tuple[bytes, bytes]]:
    """An upstream answer's raw headers to relay, names lower-cased for ASGI; hop-by-hop ones
    (and those named in ``Connection``) dropped, ``Content-Length`` kept if ``keep_length``."""
    pairs = [(k.lower(), v) for k, v in headers]
    named = {
        token.strip().lower() for k, v in pairs if k == b"connection" for token in v.split(b",")
    }
    skip = HOP_BY_HOP_RAW | named
    if not keep_length:
        skip = skip | {b"content-length"}
    return [(k, v) for k, v in pairs if k not in skip]


class AiohttpRelay(StreamingResponse):
    """An aiohttp answer relayed as it arrives; ``on_done`` runs exactly once at the end.
    ``source`` names the upstream in messages ("the worker http://w1:8081")."""

    def __init__(
        self, upstream: aiohttp.ClientResponse, on_done: Callable[[], None], source: str
    ) -> None:
        # not StreamingResponse.__init__: the body is read in stream_response
        self.upstream = upstream
        self.on_done = on_done
        self.source = source
        self.status_code = upstream.status
        self.background = None
        self.raw_headers = response_headers(upstream.raw_headers, keep_length=False)

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
                last = stream.at_eof()  # the upstream's end arrived: end with this same write
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
        except AIOHTTP_ERRORS as exc:
            log.warning("%s broke off its answer: %r", self.source, exc)
            raise ConnectionResetError(f"{self.source} broke off its answer: {exc}") from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                if self.upstream.content.at_eof():
                    self.upstream.release()  # keep-alive: the connection goes back to the pool
                else:
                    self.upstream.close()  # cut short: the upstream sees the disconnect
            finally:
                self.on_done()
