"""The router's HTTP surface: an OpenAI-compatible front that cold-loads models on demand.

Routes (all but ``/healthz`` need the router's bearer token when one is set)::

    GET  /v1/models         the catalog (models dir) in OpenAI list form
    POST /v1/*              any request whose JSON body names a "model": forwarded to the worker
                            that has it loaded, streamed through unchanged (SSE included)
    GET  /staging/jobs      every job the coordinator knows, plus this process's cold loads
    GET  /staging/events    the same as a Server-Sent Events stream of changes
    GET  /metrics           Prometheus text format
    GET  /healthz           liveness

A request for a model that is not loaded starts (or joins) the application-owned cold load and
waits for it at most ``load_wait`` seconds; then it gets ``503`` with ``Retry-After`` and
``{"error": {"code": "model_loading", "message", "loading": {model, phase, bytes_done,
bytes_total, eta_seconds, worker}}}`` while the load goes on. A failed load is answered with its
reason (``model_load_failed``) for the failure grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..coldload import ColdLoadResult
from ..config import Paths
from ..coordinator import open_coordinator
from ..worker.app import BearerAuth
from .catalog import Catalog
from .coldloads import ColdLoads
from .metrics import RouterMetrics
from .proxy import forward, openai_error
from .workers import WorkerPool, WorkerRef


@dataclass(frozen=True)
class RouterOptions:
    token: str | None = None
    load_wait: float = 30.0  # seconds; math.inf waits without limit, 0 answers at once
    retry_after_cap: float = 30.0
    failure_grace: float = 30.0
    adopt_interval: float = 5.0
    events_interval: float = 0.5


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"))


class Router:
    """Handlers over the catalog, the workers and the cold loads."""

    def __init__(self, catalog: Catalog, pool: WorkerPool, options: RouterOptions) -> None:
        self.catalog = catalog
        self.pool = pool
        self.options = options
        self.metrics = RouterMetrics()
        self.coldloads: ColdLoads  # set in the lifespan, once the coordinator is open
        self._counted: dict[tuple[str, int], Any] = {}  # labelled request counters, by use

    def _finished(
        self, model: str, result: ColdLoadResult | None, seconds: float, exc: BaseException | None
    ) -> None:
        if result is not None:
            self.metrics.cold_loads.labels(result.role).inc()
            self.metrics.bytes_staged.inc(result.bytes_sent)
            self.metrics.load_seconds.observe(seconds)
        else:
            self.metrics.cold_loads.labels("failed" if exc else "interrupted").inc()

    def _answer(self, model: str, response: Response) -> Response:
        key = (model, response.status_code)
        child = self._counted.get(key)
        if child is None:
            if len(self._counted) > 4096:
                self._counted.clear()
            child = self._counted[key] = self.metrics.requests.labels(model, str(key[1]))
        child.inc()
        return response

    def _loading(self, model: str) -> Response:
        status = self.coldloads.status.get(model)
        loading = status.public() if status else {"model": model, "phase": "queued"}
        eta = loading.get("eta_seconds")
        retry = min(
            self.options.retry_after_cap, max(1.0, eta if isinstance(eta, int | float) else 5.0)
        )
        phase = loading.get("phase", "queued")
        response = openai_error(
            503,
            f"model {model} is being loaded ({phase}); the load continues without this request: "
            f"retry in {math.ceil(retry)} s",
            "model_loading",
            loading=loading,
        )
        response.headers["Retry-After"] = str(math.ceil(retry))
        return response

    async def _worker_for(self, model: str) -> str | Response:
        """The worker that has ``model`` loaded, after a cold load if needed; or an answer."""
        worker = self.coldloads.routes.get(model)
        if worker is not None:
            return worker
        entry = self.catalog.get(model)
        deadline = time.monotonic() + self.catalog.stable_seconds + 1.0
        while entry is None and self.catalog.pending(model) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)  # its file is still being written: give it a moment
            entry = self.catalog.get(model)
        if entry is None and self.catalog.pending(model):
            response = openai_error(
                503,
                f"the file of model {model} is still being written; retry when it is complete",
                "model_file_incomplete",
            )
            response.headers["Retry-After"] = str(math.ceil(self.catalog.stable_seconds))
            return response
        if entry is None:
            return openai_error(
                404,
                f"the model {model!r} does not exist: put its file in the router's models "
                "directory (GET /v1/models lists the known ones)",
                "model_not_found",
                "invalid_request_error",
            )
        failed = self.coldloads.failure(model)
        if failed is not None:
            left = self.options.failure_grace - (time.time() - (failed.failed_at or 0))
            response = openai_error(
                503,
                f"loading model {model} failed: {failed.error}",
                "model_load_failed",
                loading=failed.public(),
            )
            response.headers["Retry-After"] = str(max(1, math.ceil(left)))
            return response
        task = self.coldloads.start(entry)
        if not task.done():
            wait = self.options.load_wait
            self.metrics.waiters.inc()
            try:
                if wait > 0:
                    await asyncio.wait({task}, timeout=None if math.isinf(wait) else wait)
            finally:
                self.metrics.waiters.dec()
        if not task.done():
            return self._loading(model)
        if task.cancelled():
            return self._loading(model)
        if task.exception() is not None:
            return await self._worker_for(model)  # reported through failure() now
        return task.result().worker

    # -- endpoints -----------------------------------------------------------------------

    async def inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/*, as a plain ASGI app (no Starlette request or routing per request)."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone before its request was complete: nothing to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        response = await self._inference(scope, body)
        await response(scope, receive, send)

    async def _inference(self, scope: Scope, body: bytes) -> Response:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self._answer(
                "",
                openai_error(
                    400,
                    "the request body is not valid JSON",
                    "invalid_json",
                    "invalid_request_error",
                ),
            )
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            return self._answer(
                "",
                openai_error(
                    400,
                    'the JSON body must name a "model"',
                    "model_required",
                    "invalid_request_error",
                ),
            )
        stream = bool(payload.get("stream"))
        for _attempt in range(2):
            worker = self.coldloads.routes.get(model)
            if worker is None:  # not loaded (yet): a cold load, or an answer saying why not
                found = await self._worker_for(model)
                if isinstance(found, Response):
                    return self._answer(model if found.status_code != 404 else "", found)
                worker = found
            self.pool.in_flight[worker] += 1
            result = await forward(
                scope,
                body,
                worker,
                self.pool.client(worker),
                on_close=functools.partial(self._done_with, worker),
                stream=stream,
            )
            if result.model_missing:
                # the worker lost the model (restarted, evicted, unloaded): load it again
                self.coldloads.forget_route(model)
                continue
            if not result.reached:
                self.coldloads.forget_route(model)
            return self._answer(model, result.response)
        return self._answer(model, self._loading(model))

    def _done_with(self, worker: str) -> None:
        self.pool.in_flight[worker] -= 1

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": e.name,
                "object": "model",
                "created": 0,
                "owned_by": "staging-cli",
                "size": e.total_size,
                "loaded": e.name in self.coldloads.routes,
            }
            for e in sorted(self.catalog.entries(), key=lambda e: e.name)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def jobs(self, request: Request) -> Response:
        jobs = [asdict(j) for j in await self.coldloads.coordinator.jobs()]
        body = {"jobs": jobs, "local": self.coldloads.snapshot(), "routes": self.coldloads.routes}
        return Response(_dumps(body), media_type="application/json")

    async def events(self, request: Request) -> Response:
        interval = self.options.events_interval

        async def stream() -> AsyncIterator[str]:
            seen: dict[str, tuple[Any, ...]] = {}
            last_sent = time.monotonic()
            yield ": staging-cli job events\n\n"
            while True:
                for job in await self.coldloads.coordinator.jobs():
                    signature = (job.status, job.phase, job.bytes_done, job.attempt, job.owner)
                    if seen.get(job.key) != signature:
                        seen[job.key] = signature
                        last_sent = time.monotonic()
                        yield f"event: job\ndata: {_dumps(asdict(job))}\n\n"
                if time.monotonic() - last_sent > 15:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(interval)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        self.metrics.cold_loads_active.set(len(self.coldloads.in_progress()))
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/staging/jobs", self.jobs, methods=["GET"]),
            Route("/staging/events", self.events, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/{path:path}", _Endpoint(self), methods=["POST"]),
        ]


class _Endpoint:
    """``Router.inference`` as an ASGI endpoint (a class instance: Starlette passes it the
    scope as it is instead of wrapping it in a request/response function)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router.inference(scope, receive, send)


class _InferenceFirst:
    """POST /v1/* straight to ``Router.inference``, everything else to the Starlette app.

    The forwarded requests are the router's hot path: Starlette's middleware stack, router and
    request objects cost CPU on each, and buy nothing the inference handler uses (it answers
    its own errors in OpenAI form). An app mounted under a root path goes through Starlette.
    """

    def __init__(self, router: Router, app: ASGIApp) -> None:
        self.router = router
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith("/v1/")
            and not scope.get("root_path")
        ):
            await self.router.inference(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_router_app(
    catalog: Catalog,
    workers: list[WorkerRef],
    *,
    dsn: str | None,
    paths: Paths,
    options: RouterOptions | None = None,
    pool: WorkerPool | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> ASGIApp:
    """The router ASGI app; the coordinator is opened (and closed) by its lifespan.
    ``on_shutdown`` (blocking, run in a thread) ends the lifespan: the embedded worker is
    stopped there, while the server still drains, not after it returned (uvicorn re-raises a
    SIGTERM once ``serve`` returns, which ends the process before any later cleanup)."""
    opts = options or RouterOptions()
    pool = pool or WorkerPool(workers, paths=paths)
    router = Router(catalog, pool, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_coordinator(dsn, state_dir=paths.state_dir) as coordinator:
            router.coldloads = ColdLoads(
                catalog,
                pool,
                coordinator,
                failure_grace=opts.failure_grace,
                on_finished=router._finished,
            )
            adopter = asyncio.create_task(router.coldloads.adopt_forever(opts.adopt_interval))
            try:
                yield
            finally:
                adopter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await adopter
                await router.coldloads.aclose()
                await pool.aclose()
                if on_shutdown is not None:
                    await asyncio.to_thread(on_shutdown)

    app = Starlette(routes=router.routes(), lifespan=lifespan)
    app.state.router = router
    return BearerAuth(_InferenceFirst(router, app), opts.token)
