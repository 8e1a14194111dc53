"""A minimal disk sink under the worker's uvicorn setup: this machine's ceiling for a Python
server that writes an HTTP body to disk.

``PUT /sink/{name}`` (or POST) writes the body to ``DIR/name`` and fdatasyncs every
``--sync-every`` bytes (default 32 MiB, the worker's cadence: once per 32 MiB chunk) and at the
end; it does no hashing and no bookkeeping. The body pieces are written straight from the event
loop (page-cache writes are fast); the fdatasync runs in a thread and is awaited, so, as on the
worker, the connection is not read while the disk flushes.

    python bench/sink.py --dir D --port 0     # prints "listening on URL"
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from staging_cli.worker.server import bind, url_of, uvicorn_config


def create_app(directory: Path, sync_every: int) -> Starlette:
    async def sink(request: Request) -> Response:
        name = os.path.basename(request.path_params["name"])
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        total = 0
        unsynced = 0
        try:
            async for piece in request.stream():
                view = memoryview(piece)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                total += len(piece)
                unsynced += len(piece)
                if unsynced >= sync_every:
                    await asyncio.to_thread(os.fdatasync, fd)
                    unsynced = 0
            await asyncio.to_thread(os.fdatasync, fd)
        finally:
            os.close(fd)
        return JSONResponse({"bytes": total})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/sink/{name}", sink, methods=["PUT", "POST"]),
            Route("/healthz", healthz),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where bodies are written")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sync-every", type=int, default=32 * 1024 * 1024)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    sock = bind(args.host, args.port)
    server = uvicorn.Server(uvicorn_config(create_app(args.dir, args.sync_every)))
    print(f"listening on {url_of(sock)}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
