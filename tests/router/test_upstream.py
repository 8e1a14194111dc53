"""The router's lean HTTP/1.1 client against a real uvicorn server on loopback: buffered and
streamed answers, chunked bodies, keep-alive reuse, stale connections, refusals, auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from staging_cli.router.upstream import UpstreamError, WorkerConnections

from ..support import free_port, serve_app

LIMIT = 1024 * 1024
seen_connections: list[tuple[str, int]] = []


async def echo(request: Request) -> Response:
    body = await request.body()
    client = request.client
    assert client is not None
    seen_connections.append((client.host, client.port))
    return JSONResponse(
        {
            "body": body.decode(),
            "auth": request.headers.get("authorization"),
            "path": request.url.path,
        }
    )


async def big(request: Request) -> Response:
    return Response(b"x" * (3 * LIMIT), media_type="application/octet-stream")


async def chunked(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"part{i};".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(parts(), media_type="text/plain")


async def events(request: Request) -> Response:
    async def sse() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0.05)

    return StreamingResponse(sse(), media_type="text/event-stream")


async def missing(request: Request) -> Response:
    return JSONResponse({"error": {"code": "model_not_found"}}, status_code=404)


APP = Starlette(
    routes=[
        Route("/v1/echo", echo, methods=["POST"]),
        Route("/v1/big", big, methods=["POST"]),
        Route("/v1/chunked", chunked, methods=["POST"]),
        Route("/v1/events", events, methods=["POST"]),
        Route("/v1/missing", missing, methods=["POST"]),
    ]
)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_app(APP) as url:
        yield url


async def call(
    pool: WorkerConnections, path: bytes, body: bytes = b"{}"
) -> tuple[int, bytes, bool]:
    exchange = await pool.send(pool.request_head(b"POST", path, b"", len(body)) + body)
    try:
        if not exchange.streamed:
            return exchange.status, exchange.body, False
        pieces = []
        while piece := await exchange.read():
            pieces.append(piece)
        return exchange.status, b"".join(pieces), True
    finally:
        exchange.finish()


def test_buffered_streamed_and_chunked_answers(server: str) -> None:
    async def go() -> None:
        pool = WorkerConnections(server, "Bearer w", connect_timeout=5, buffer_limit=LIMIT)
        try:
            status, body, streamed = await call(pool, b"/v1/echo", b'{"model": "m"}')
            assert (status, streamed) == (200, False)
            assert b'"auth":"Bearer w"' in body and b'{\\"model\\": \\"m\\"}' in body
            status, body, streamed = await call(pool, b"/v1/big")
            assert streamed and len(body) == 3 * LIMIT  # above the limit: passed through
            status, body, streamed = await call(pool, b"/v1/chunked")
            assert streamed and body == b"part0;part1;part2;part3;part4;"
            status, body, streamed = await call(pool, b"/v1/events")
            assert streamed and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            status, body, streamed = await call(pool, b"/v1/missing")
            assert status == 404 and not streamed and b"model_not_found" in body
        finally:
            pool.close()

    asyncio.run(go())


def test_keep_alive_connections_are_reused(server: str) -> None:
    async def go() -> None:
        pool = WorkerConnections(server, None, connect_timeout=5, buffer_limit=LIMIT)
        try:
            seen_connections.clear()
            for _ in range(20):
                assert (await call(pool, b"/v1/echo"))[0] == 200
            assert len(set(seen_connections)) == 1
            # concurrent exchanges get connections of their own, then go back to the pool
            seen_connections.clear()
            await asyncio.gather(*(call(pool, b"/v1/echo") for _ in range(8)))
            assert 1 < len(set(seen_connections)) <= 8
        finally:
            pool.close()

    asyncio.run(go())


def test_refused_and_stale_connections(server: str) -> None:
    async def go() -> None:
        refused = WorkerConnections(
            f"http://127.0.0.1:{free_port()}", None, connect_timeout=5, buffer_limit=LIMIT
        )
        with pytest.raises(UpstreamError):
            await call(refused, b"/v1/echo")
        pool = WorkerConnections(server, None, connect_timeout=5, buffer_limit=LIMIT)
        try:
            assert (await call(pool, b"/v1/echo"))[0] == 200
            # an idle connection that went away meanwhile is not reused: a fresh one is opened
            for conn in pool._idle:
                assert conn.transport is not None
                conn.transport.close()
            await asyncio.sleep(0.05)
            assert (await call(pool, b"/v1/echo"))[0] == 200
        finally:
            pool.close()

    asyncio.run(go())


def test_only_plain_http_workers() -> None:
    with pytest.raises(ValueError, match="plain http"):
        WorkerConnections("https://w:8081", None, connect_timeout=5, buffer_limit=LIMIT)
