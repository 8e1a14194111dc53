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
from typing import Any

import yarl
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import LoadError, LoadTimeout
from ..relay import AIOHTTP_ERRORS, BUFFER_LIMIT, AiohttpRelay, request_headers, response_headers
from .models import (
    LOADING,
    READY,
    UNLOADING,
    ModelError,
    ModelManager,
    ModelSpec,
)

log = logging.getLogger("staging_cli.worker.repository")

# not forwarded to a backend: the worker's own token, and what the relay sets itself
_DROP = ("content-length", "host", "authorization")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _model_error(exc: ModelError) -> JSONResponse:
    response = _error(exc.status, exc.message)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return response


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
                    headers=request_headers(request.headers.items(), drop=_DROP),
                    data=raw,
                    allow_redirects=False,
                )
            except AIOHTTP_ERRORS as exc:
                lease.release()
                return _unreachable(name, exc)
            length = upstream.content_length
            small = (
                length is not None
                and length <= BUFFER_LIMIT
                and not upstream.headers.get("content-type", "").startswith("text/event-stream")
            )
            if not small:
                return AiohttpRelay(upstream, lease.release, f"the backend of model {name}")
            # known and small: read whole and sent as one plain response (one write)
            try:
                content = await upstream.read()
            except AIOHTTP_ERRORS as exc:
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
        answer.raw_headers = response_headers(upstream.raw_headers, keep_length=True)
        return answer

    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/gc", gc, methods=["POST"]),
        Route("/v2/repository/models/{name:path}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name:path}/unload", unload, methods=["POST"]),
        Route("/v1/{path:path}", proxy, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
