"""The worker's model endpoints: the KServe v2 / Triton repository API, gc, and the /v1 proxy.

Routes (mounted next to the tus routes with ``create_app(..., extra_routes=repository_routes(m))``;
the worker's bearer token applies to all of them)::

    POST /v2/repository/index                  [{"name", "state", "reason", "files", ...}, ...]
    POST /v2/repository/models/{name}/load     load (or join the load of) a model
    POST /v2/repository/models/{name}/unload   stop its backend and forget its record
    POST /v2/repository/gc                     toolkit: remove blobs no recorded model uses
    *    /v1/...                               OpenAI-style requests, proxied to the backend of
                                               the model named in the JSON body's "model"

``{name}`` is URL-encoded (``org%2Fmodel%3Atag``); a literal ``org/model`` works as well. Names
are checked with :func:`staging_cli.tus.validate_model_name` (400 otherwise) and are never used
as file paths.

The load body (KServe v2 style: everything sits in ``parameters``)::

    {"parameters": {
        "files": ["<sha256 hex>", ...],        # or [{"sha256": "...", "filename": "x.gguf"}]
                                                # or "hex,hex" (KServe scalar parameters);
                                                # the first file is {model_path}
        "backend": {"ctx_size": 4096}           # optional: extra {placeholders} for the command
    }}

Answers: 200 with the model's index entry when READY (also when it already was: a repeated load
with the same files and backend parameters is a no-op); 400 bad name or body; 404 a named blob is
not in the store; 409 a blob is still being uploaded, or a conflicting load/unload is in flight;
500 the backend failed to start (the reason has its exit code and last output lines); 504 it did
not become healthy within the load timeout; 503 + Retry-After when the worker runs
``--max-loaded`` models already and every one of them is serving requests (an idle one would have
been unloaded to make room). Errors are ``{"error": "<sentence>"}`` as Triton's.
A client that disconnects while waiting leaves the load; when no caller is left the load is
abandoned and its backend process stopped.

The gc body is ``{"dry_run": true|false, "min_age": seconds}`` (both optional; dry_run defaults
to true, min_age to 3600 so that a blob staged a moment ago, whose load is still on its way, is
kept); the answer lists ``removed`` blobs (or those that would be) and ``bytes_freed``.

The index entries carry ``in_flight`` (requests being proxied to the model's backend) and
``idle_seconds`` (since its last request ended, or since it loaded; 0 while a request is in
flight; null unless READY),
so that a router can prefer a worker where the model is warm and not busy.

The proxy streams the backend's answer through unchanged (SSE included; no decompression, no
re-chunking, no buffering), dropping hop-by-hop headers (also those named in ``Connection``) and
the worker's Authorization header. An answer of known, small length that is not an event stream
is read whole and sent as one plain response with its ``Content-Length`` (502 if the backend
breaks it off). A backend that breaks off a streamed answer aborts the client's connection (no
final chunk), so that a cut answer is not passed off as complete. Each request counts as in
flight on its model from before it is forwarded until the streamed answer has ended, failed or the client has gone
away; a model with requests in flight is never unloaded for idleness or to make room. Its errors are OpenAI-shaped
(``{"error": {"message", "type", "code"}}``): 400 bad JSON or no "model"; 404 model not loaded;
503 + Retry-After while it loads; 501 the worker has no backend; 502 the backend died or cannot
be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp
import yarl
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import LoadError, LoadTimeout
from .models import (
    LOADING,
    READY,
    UNLOADING,
    ModelError,
    ModelManager,
    ModelSpec,
    RequestLease,
)

log = logging.getLogger("staging_cli.worker.repository")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "authorization",
    }
)
HOP_BY_HOP_RAW = frozenset(name.encode("latin-1") for name in HOP_BY_HOP)

BUFFER_LIMIT = 1 << 20  # answers up to this Content-Length are relayed as one plain response

# what aiohttp raises when the backend cannot be reached or breaks off (timeouts are OSErrors)
_AIOHTTP_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)


def _request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers to forward: without hop-by-hop ones (and those named in
    ``Connection``), ``Host``, ``Content-Length`` and the worker's ``Authorization``."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def _response_headers(
    headers: Iterable[tuple[bytes, bytes]], keep_length: bool
) -> list[tuple[bytes, bytes]]:
    """The backend's raw answer headers to relay, names lower-cased for ASGI; hop-by-hop ones
    (and those named in ``Connection``) dropped, ``Content-Length`` kept if ``keep_length``."""
    pairs = [(k.lower(), v) for k, v in headers]
    named = {
        token.strip().lower() for k, v in pairs if k == b"connection" for token in v.split(b",")
    }
    skip = HOP_BY_HOP_RAW | named
    if keep_length:
        skip = skip - {b"content-length"}
    return [(k, v) for k, v in pairs if k not in skip]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _model_error(exc: ModelError) -> JSONResponse:
    response = _error(exc.status, exc.message)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return response


class _ProxiedStream(StreamingResponse):
    """A backend answer relayed as it arrives, with the upstream response and the in-flight
    lease settled exactly once however the relay ends: finished (the connection goes back to
    the pool), the client gone (Starlette cancels the relay on ``http.disconnect``, or the send
    raises) or the backend broken off (the upstream connection is closed)."""

    def __init__(self, upstream: aiohttp.ClientResponse, lease: RequestLease, name: str) -> None:
        # not StreamingResponse.__init__: the body is read in stream_response
        self.upstream = upstream
        self.lease = lease
        self.name = name
        self.status_code = upstream.status
        self.background = None
        self.raw_headers = _response_headers(upstream.raw_headers, keep_length=False)

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
                # the backend's end already arrived: end the answer with this same write
                last = stream.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
        except _AIOHTTP_ERRORS as exc:
            # The backend vanished mid-answer. The status is sent already; ending the body
            # normally would pass a cut answer off as complete, so the connection is aborted
            # (no final chunk) and the client sees the truncation.
            log.warning("proxy to %s: the backend broke off its answer: %r", self.name, exc)
            raise ConnectionResetError(f"the backend broke off its answer: {exc}") from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                if self.upstream.content.at_eof():
                    self.upstream.release()  # keep-alive: the connection goes back to the pool
                else:
                    self.upstream.close()  # cut short: the backend sees the disconnect
            finally:
                self.lease.release()


def _openai_error(status: int, message: str, kind: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )


def _unreachable(name: str, exc: BaseException) -> JSONResponse:
    return _openai_error(
        502,
        f"the backend of model {name} cannot be reached ({type(exc).__name__}): it may have died",
        "server_error",
        "backend_unreachable",
    )


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    return json.loads(raw)


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def repository_routes(manager: ModelManager) -> list[Route]:
    """The routes to pass as ``extra_routes`` to :func:`staging_cli.worker.app.create_app`."""

    async def index(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except ValueError:
            return _error(400, "the index body must be JSON (or empty)")
        entries = manager.index()
        if isinstance(body, dict) and body.get("ready") is True:
            entries = [e for e in entries if e["state"] == READY]
        return JSONResponse(entries)

    async def load(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body = await _json_body(request)
        except ValueError:
            return _error(
                400, 'the load body must be JSON: {"parameters": {"files": ["<sha256>", ...]}}'
            )
        try:
            spec = ModelSpec.parse(body.get("parameters") if isinstance(body, dict) else None)
        except ModelError as exc:
            return _error(exc.status, exc.message)
        loading = asyncio.ensure_future(manager.load(name, spec))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({loading, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not loading.done():
                # This caller leaves; the manager stops the load if it was the last one waiting.
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loading
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if loading.cancelled():
            log.info("load of %s: the client went away", name)
            return _error(499, "the client closed the connection")
        try:
            model = loading.result()
        except ModelError as exc:
            return _model_error(exc)
        except LoadTimeout as exc:
            return _error(504, exc.message)
        except LoadError as exc:
            return _error(500, exc.message)
        return JSONResponse(model.public())

    async def unload(request: Request) -> Response:
        try:
            await manager.unload(request.path_params["name"])
        except ModelError as exc:
            return _error(exc.status, exc.message)
        return JSONResponse({})

    async def gc(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except ValueError:
            return _error(400, 'the gc body must be JSON: {"dry_run": true|false}')
        if not isinstance(body, dict):
            return _error(400, 'the gc body must be a JSON object: {"dry_run": true|false}')
        dry_run = body.get("dry_run", True)
        min_age = body.get("min_age", 3600.0)
        if not isinstance(dry_run, bool):
            return _error(400, '"dry_run" must be true or false')
        if isinstance(min_age, bool) or not isinstance(min_age, int | float) or min_age < 0:
            return _error(400, '"min_age" must be a number of seconds (0 or more)')
        return JSONResponse(manager.gc(dry_run=dry_run, min_age=float(min_age)))

    async def proxy(request: Request) -> Response:
        if request.method == "GET" and request.url.path.rstrip("/") == "/v1/models":
            return JSONResponse(
                {
                    "object": "list",
                    "data": [
                        {"id": e["name"], "object": "model", "owned_by": "staging-cli"}
                        for e in manager.index()
                        if e["state"] == READY
                    ],
                }
            )
        raw = await request.body()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            return _openai_error(
                400, "the request body is not valid JSON", "invalid_request_error", "invalid_json"
            )
        name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not name:
            return _openai_error(
                400,
                'the request body must be a JSON object with a "model"',
                "invalid_request_error",
                "model_required",
            )
        model = manager.get(name)
        if model is not None and model.state == UNLOADING:
            return _openai_error(
                404,
                f"model {name} is being unloaded ({model.reason}); load it again "
                "(POST /v2/repository/models/{name}/load)",
                "invalid_request_error",
                "model_not_loaded",
            )
        if model is None:
            return _openai_error(
                404,
                f"model {name} is not loaded on this worker: load it "
                "first (POST /v2/repository/models/{name}/load)",
                "invalid_request_error",
                "model_not_found",
            )
        if model.state == LOADING:
            response = _openai_error(
                503, f"model {name} is loading; retry shortly", "server_error", "model_loading"
            )
            response.headers["Retry-After"] = "5"
            return response
        if model.state != READY:
            if model.backend_died:
                return _openai_error(
                    502,
                    f"the backend of model {name} died: {model.reason}",
                    "server_error",
                    "backend_died",
                )
            return _openai_error(
                404,
                f"model {name} is recorded but not loaded: {model.reason}",
                "invalid_request_error",
                "model_not_loaded",
            )
        backend = model.backend
        if backend is None:
            return _openai_error(
                501,
                f"model {name} is staged and recorded but this worker has no backend: start "
                "the worker with --backend-cmd or --demo-backend",
                "server_error",
                "no_backend",
            )
        # In flight from here (no await since the READY check): never unloaded meanwhile.
        lease = manager.begin_request(model)
        try:
            # the client's path and query, byte for byte
            raw_path = request.scope.get("raw_path")
            target = raw_path.decode("latin-1") if raw_path else request.url.path
            if request.url.query:
                target += "?" + request.url.query
            try:
                upstream = await manager.http_session().request(
                    request.method,
                    yarl.URL(backend.url + target, encoded=True),
                    headers=_request_headers(request.headers.items()),
                    data=raw,
                    allow_redirects=False,
                )
            except _AIOHTTP_ERRORS as exc:
                lease.release()
                return _unreachable(name, exc)
            length = upstream.content_length
            small = (
                length is not None
                and length <= BUFFER_LIMIT
                and not upstream.headers.get("content-type", "").startswith("text/event-stream")
            )
            if not small:
                return _ProxiedStream(upstream, lease, name)
            # known and small: read whole and sent as one plain response (one write)
            try:
                content = await upstream.read()
            except _AIOHTTP_ERRORS as exc:
                upstream.close()
                lease.release()
                return _unreachable(name, exc)
            except BaseException:
                upstream.close()
                raise
            upstream.release()
            lease.release()
        except BaseException:  # cancelled (the client left) or a bug: not in flight any more
            lease.release()
            raise
        answer = Response(content, status_code=upstream.status)
        answer.raw_headers = _response_headers(upstream.raw_headers, keep_length=True)
        return answer

    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/gc", gc, methods=["POST"]),
        Route("/v2/repository/models/{name:path}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name:path}/unload", unload, methods=["POST"]),
        Route("/v1/{path:path}", proxy, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
