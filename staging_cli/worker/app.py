"""The reference worker's HTTP surface (Starlette): tus 1.0 uploads plus the toolkit conventions.

Routes (all but ``/healthz`` need ``Authorization: Bearer <token>`` when a token is set)::

    GET     /healthz                    liveness, no auth
    OPTIONS /uploads[/{id}]             tus discovery: Tus-Version, Tus-Extension, ...
    POST    /uploads                    tus creation (+ creation-with-upload)
    GET     /uploads?sha256=HEX[&length=N]  toolkit: find uploads in progress of that content
    HEAD    /uploads/{id}               tus: Upload-Offset, Upload-Length, Upload-Expires
    PATCH   /uploads/{id}               tus: append a chunk (Upload-Checksum verified)
    DELETE  /uploads/{id}               tus termination
    HEAD    /blobs/sha256:{hex}         toolkit: 200 + Content-Length when the blob exists
    GET     /blobs/sha256:{hex}         the blob's bytes
    GET     /status                     toolkit: disk, uploads in progress, blobs (JSON)

Errors are a plain-text sentence with the status the protocol prescribes; the README's protocol
section lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__, tus
from .store import Store, StoreError

log = logging.getLogger("staging_cli.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How the worker behaves (the CLI fills this from flags, env and config)."""

    token: str | None = None
    idle_timeout: float = 60.0
    sweep_interval: float = 60.0
    status_extra: Callable[[], dict[str, Any]] | None = None  # merged into GET /status


TUS_HEADERS = {"Tus-Resumable": tus.TUS_VERSION}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(
        message + "\n", status_code=status, headers={**TUS_HEADERS, **(headers or {})}
    )


class BearerAuth:
    """Pure ASGI middleware: constant-time bearer token check on every path but /healthz."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        supplied = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                supplied = value
                break
        scheme, _, credential = supplied.partition(b" ")
        if not supplied:
            response = _error(
                401,
                "this worker needs a bearer token: pass --token or set STAGING_CLI_TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
        elif scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), self.token):
            response = _error(
                403,
                "the bearer token is not valid for this worker: check --token",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _upload_headers(upload: Any) -> dict[str, str]:
    r = upload.record
    return {
        **TUS_HEADERS,
        "Upload-Offset": str(r.offset),
        "Upload-Expires": tus.format_http_date(r.expires),
    }


async def _body(receive: Receive, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body, piece by piece; a piece that does not arrive within ``idle_timeout``
    ends the body with TimeoutError (a dead client's half-open connection must not keep the
    upload locked)."""
    while True:
        async with asyncio.timeout(idle_timeout):
            message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client disconnected mid-body")
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


class WorkerApp:
    """Request handlers bound to one store."""

    def __init__(self, store: Store, options: WorkerOptions) -> None:
        self.store = store
        self.options = options

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_tus(request: Request) -> Response | None:
        version = request.headers.get("tus-resumable")
        if version != tus.TUS_VERSION:
            return _error(
                412,
                f"Tus-Resumable must be {tus.TUS_VERSION}, got {version!r}",
                {"Tus-Version": tus.TUS_VERSION},
            )
        return None

    def _url(self, request: Request, upload_id: str) -> str:
        return str(request.url_for("upload", upload_id=upload_id))

    async def _receive_chunk(
        self, request: Request, upload: Any, offset: int, checksum: tuple[str, bytes] | None
    ) -> Response | int:
        """Stream one body into the upload. Returns the new offset or an error response."""
        if upload.busy:
            return _error(423, "another request is writing this upload; retry shortly")
        try:
            writer = self.store.begin(upload, offset, checksum)
        except StoreError as exc:
            return _error(exc.status, exc.message)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and offset + int(length) > upload.record.length:
            return _error(413, "the chunk runs past Upload-Length")
        upload.busy = True
        try:
            try:
                async for piece in _body(request.receive, self.options.idle_timeout):
                    await writer.feed(piece)
            except (TimeoutError, ConnectionResetError) as exc:
                kept = await writer.abort(keep=True)
                reason = "idle timeout" if isinstance(exc, TimeoutError) else "disconnect"
                log.info("upload %s: body ended early (%s); offset now %d", upload.id, reason, kept)
                return _error(
                    408, f"the request body stalled or was cut ({reason}); offset is {kept}"
                )
            except BaseException:
                await writer.abort(keep=False)
                raise
            return await writer.commit()
        except StoreError as exc:
            return _error(exc.status, exc.message)
        finally:
            upload.busy = False

    # -- endpoints -------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "version": __version__})

    async def discover(self, request: Request) -> Response:
        headers = {
            **TUS_HEADERS,
            "Tus-Version": tus.TUS_VERSION,
            "Tus-Extension": ",".join(tus.TUS_EXTENSIONS),
            "Tus-Checksum-Algorithm": ",".join(tus.CHECKSUM_ALGORITHMS),
        }
        if self.store.max_size is not None:
            headers["Tus-Max-Size"] = str(self.store.max_size)
        return Response(status_code=204, headers=headers)

    async def create(self, request: Request) -> Response:
        if (bad := self._check_tus(request)) is not None:
            return bad
        if request.headers.get("upload-defer-length") is not None:
            return _error(400, "creation-defer-length is not supported: send Upload-Length")
        try:
            length = tus.parse_offset(request.headers.get("upload-length"), "Upload-Length")
            metadata = tus.validate_metadata(
                tus.decode_metadata(request.headers.get("upload-metadata"))
            )
        except tus.HeaderError as exc:
            return _error(400, str(exc))
        body_type = request.headers.get("content-type")
        with_body = body_type == tus.OFFSET_CONTENT_TYPE
        checksum = None
        if with_body and (raw := request.headers.get("upload-checksum")):
            try:
                checksum = tus.decode_checksum(raw)
            except tus.HeaderError as exc:
                return _error(400, str(exc))
        try:
            upload = self.store.create(length, metadata)
        except StoreError as exc:
            return _error(exc.status, exc.message)
        url = self._url(request, upload.id)
        log.info("upload %s created: %d bytes, model=%s", upload.id, length, metadata.get("model"))
        if with_body:
            result = await self._receive_chunk(request, upload, 0, checksum)
            if isinstance(result, Response):
                result.headers["Location"] = url
                return result
        headers = {**_upload_headers(upload), "Location": url}
        if upload.record.offset == upload.record.length:
            headers["Upload-Offset"] = str(upload.record.length)
        return Response(status_code=201, headers=headers)

    async def lookup(self, request: Request) -> Response:
        try:
            sha256 = tus.validate_sha256(request.query_params.get("sha256", ""))
            raw_length = request.query_params.get("length")
            length = tus.parse_offset(raw_length, "length") if raw_length is not None else None
        except tus.HeaderError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        found = self.store.find(sha256, length)
        return JSONResponse({"uploads": [u.public(self._url(request, u.id)) for u in found]})

    async def head_upload(self, request: Request) -> Response:
        if (bad := self._check_tus(request)) is not None:
            return bad
        try:
            upload = self.store.get(request.path_params["upload_id"])
        except StoreError as exc:
            return Response(
                status_code=exc.status, headers={**TUS_HEADERS, "Cache-Control": "no-store"}
            )
        headers = {
            **_upload_headers(upload),
            "Upload-Length": str(upload.record.length),
            "Cache-Control": "no-store",
        }
        if upload.record.metadata:
            headers["Upload-Metadata"] = tus.encode_metadata(upload.record.metadata)
        return Response(status_code=200, headers=headers)

    async def patch(self, request: Request) -> Response:
        if (bad := self._check_tus(request)) is not None:
            return bad
        if request.headers.get("content-type") != tus.OFFSET_CONTENT_TYPE:
            return _error(415, f"PATCH needs Content-Type: {tus.OFFSET_CONTENT_TYPE}")
        try:
            upload = self.store.get(request.path_params["upload_id"])
            offset = tus.parse_offset(request.headers.get("upload-offset"))
            raw = request.headers.get("upload-checksum")
            checksum = tus.decode_checksum(raw) if raw else None
        except StoreError as exc:
            return _error(exc.status, exc.message)
        except tus.HeaderError as exc:
            return _error(400, str(exc))
        result = await self._receive_chunk(request, upload, offset, checksum)
        if isinstance(result, Response):
            return result
        return Response(
            status_code=204, headers={**_upload_headers(upload), "Upload-Offset": str(result)}
        )

    async def delete(self, request: Request) -> Response:
        if (bad := self._check_tus(request)) is not None:
            return bad
        try:
            self.store.delete(request.path_params["upload_id"])
        except StoreError as exc:
            return _error(exc.status, exc.message)
        return Response(status_code=204, headers=TUS_HEADERS)

    async def blob(self, request: Request) -> Response:
        digest = request.path_params["digest"]
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or not tus.SHA256_RE.match(hexdigest):
            return _error(400, "blob digests look like sha256:<64 hex characters>")
        path = self.store.blob_path(hexdigest)
        if path is None:
            return Response(status_code=404)
        if request.method == "HEAD":
            size = self.store.blob_size(hexdigest)
            return Response(status_code=200, headers={"Content-Length": str(size)})
        return FileResponse(path, media_type="application/octet-stream")

    async def status(self, request: Request) -> Response:
        body = self.store.status()
        body["version"] = __version__
        body["tus"] = {"version": tus.TUS_VERSION, "extensions": list(tus.TUS_EXTENSIONS)}
        if self.options.status_extra is not None:
            body.update(self.options.status_extra())
        return JSONResponse(body)

    # -- assembly --------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/uploads", self.discover, methods=["OPTIONS"], include_in_schema=False),
            Route("/uploads", self.create, methods=["POST"]),
            Route("/uploads", self.lookup, methods=["GET"]),
            Route(
                "/uploads/{upload_id}", self.discover, methods=["OPTIONS"], include_in_schema=False
            ),
            Route("/uploads/{upload_id}", self.head_upload, methods=["HEAD"], name="upload"),
            Route("/uploads/{upload_id}", self.patch, methods=["PATCH"]),
            Route("/uploads/{upload_id}", self.delete, methods=["DELETE"]),
            Route("/blobs/{digest}", self.blob, methods=["GET", "HEAD"]),
        ]

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.options.sweep_interval)
            try:
                self.store.sweep_expired()
            except OSError:
                log.exception("sweeping expired uploads failed")


def create_app(
    store: Store,
    options: WorkerOptions | None = None,
    *,
    extra_routes: list[Route] | None = None,
    lifespan_hooks: list[Callable[[], Awaitable[None]]] | None = None,
) -> ASGIApp:
    """The worker ASGI app over an opened store."""
    opts = options or WorkerOptions()
    handlers = WorkerApp(store, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[MutableMapping[str, Any]]:
        store.start_background()
        sweeper = asyncio.create_task(handlers._sweeper())
        try:
            yield {}
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            for hook in lifespan_hooks or []:
                await hook()

    app = Starlette(routes=handlers.routes() + (extra_routes or []), lifespan=lifespan)
    app.state.store = store
    app.state.handlers = handlers
    return BearerAuth(app, opts.token)
