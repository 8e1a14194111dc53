"""Forwarding one OpenAI-style request to a worker and streaming the answer back unchanged.

Bytes are passed through as they arrive (``aiter_raw``: no decompression, no re-chunking, no
buffering), so Server-Sent Events reach the client as the backend emits them. Hop-by-hop headers
(RFC 9110 section 7.6.1, plus those named in ``Connection``) are dropped both ways; the client's
``Authorization`` is replaced by the worker's token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

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
    upstream_request = client.build_request(request.method, url, headers=headers, content=body)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.TransportError as exc:
        close()
        return Forwarded(
            openai_error(
                502,
                f"the worker {worker} could not be reached ({type(exc).__name__}: {exc}); "
                "retry: the router will place the model again if the worker is gone",
                "worker_unreachable",
            ),
            reached=False,
        )
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
