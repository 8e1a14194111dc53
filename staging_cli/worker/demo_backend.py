"""A demo backend: a tiny OpenAI-compatible server that only describes the model file it was given.

This is a demonstration, not an inference engine. It lets the whole path (stage -> load ->
backend process -> /v1 proxy, streaming included) run on a machine without llama.cpp or a GPU::

    python -m staging_cli.worker.demo_backend --model-path P --port N [--host 127.0.0.1]

At start it reads the model file: its size, its sha256 (of the whole file, or of the first
64 MiB only for bigger files, and it says so), and, when the file starts with the GGUF magic, the
GGUF header (version, tensor count, metadata key/value count) plus ``general.name`` and
``general.architecture`` when they appear among the first metadata entries. Its answers say all
of that ("demo backend: model file X, N bytes, sha256 abc123..., GGUF v3 ...").

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming,
and ``"stream": true`` as SSE: several ``data:`` chunks 20 ms apart, then ``data: [DONE]``).

Two optional request fields shape a stream, for demos and tests of long generations:
``"delay"`` (seconds between chunks, at most 10; default 0.02) and ``"max_tokens"`` (the number
of words to stream: the description is repeated, or cut, to that many; default its length).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shlex
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HASH_LIMIT = 64 * 1024 * 1024
GGUF_MAGIC = b"GGUF"
CHUNK_DELAY = 0.02
MAX_CHUNK_DELAY = 10.0
MAX_STREAM_WORDS = 100_000
MAX_KV_SCAN = 64

# GGUF metadata value types (gguf spec): fixed sizes of the scalar ones.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


def demo_gguf_bytes(
    name: str = "tiny-demo", architecture: str = "llama", padding: bytes = b"\0" * 64
) -> bytes:
    """A minimal GGUF v3 file (no tensors; general.architecture, general.alignment,
    general.name) followed by ``padding``: a stand-in model for demos and tests."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = string("general.architecture") + struct.pack("<I", _GGUF_STRING) + string(architecture)
    kv += string("general.alignment") + struct.pack("<II", 4, 32)
    kv += string("general.name") + struct.pack("<I", _GGUF_STRING) + string(name)
    return GGUF_MAGIC + struct.pack("<IQQ", 3, 0, 3) + kv + padding


def demo_backend_cmd() -> str:
    """The backend command template that runs this demo backend (``--demo-backend``)."""
    return (
        f"{shlex.quote(sys.executable)} -m staging_cli.worker.demo_backend "
        "--model-path {model_path} --port {port} --model-id {model}"
    )


@dataclass(frozen=True)
class ModelFacts:
    path: str
    size: int
    sha256: str
    hashed_bytes: int
    gguf: dict[str, Any] | None

    def describe(self) -> str:
        partial = (
            ""
            if self.hashed_bytes >= self.size
            else f" (of the first {self.hashed_bytes // (1024 * 1024)} MiB only)"
        )
        text = (
            f"demo backend: model file {Path(self.path).name}, {self.size} bytes, "
            f"sha256 {self.sha256[:12]}…{partial}"
        )
        if self.gguf is not None:
            g = self.gguf
            text += (
                f", GGUF v{g['version']}, {g['tensor_count']} tensors, "
                f"{g['kv_count']} metadata entries"
            )
            for key in ("general.architecture", "general.name"):
                if key in g:
                    text += f", {key}={g[key]}"
        else:
            text += ", not a GGUF file"
        return text + ". This is a demo backend: it describes the file, it does not run a model."


class _Truncated(Exception):
    pass


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _read_string(fh: BinaryIO, limit: int = 1 << 16) -> str | None:
    (length,) = struct.unpack("<Q", _read(fh, 8))
    if length > limit:
        fh.seek(length, 1)
        return None
    return _read(fh, length).decode("utf-8", "replace")


def _skip_value(fh: BinaryIO, vtype: int, depth: int = 0) -> None:
    if vtype in _GGUF_SCALAR_SIZES:
        fh.seek(_GGUF_SCALAR_SIZES[vtype], 1)
    elif vtype == _GGUF_STRING:
        (length,) = struct.unpack("<Q", _read(fh, 8))
        fh.seek(length, 1)
    elif vtype == _GGUF_ARRAY and depth < 2:
        (item_type,) = struct.unpack("<I", _read(fh, 4))
        (count,) = struct.unpack("<Q", _read(fh, 8))
        if item_type in _GGUF_SCALAR_SIZES:
            fh.seek(_GGUF_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(min(count, 1 << 20)):
                _skip_value(fh, item_type, depth + 1)
    else:
        raise _Truncated  # an unknown type: stop parsing, keep what we have


def read_gguf_header(fh: BinaryIO) -> dict[str, Any] | None:
    """GGUF version, counts, and general.name/architecture if found early; None if not GGUF."""
    fh.seek(0)
    if fh.read(4) != GGUF_MAGIC:
        return None
    out: dict[str, Any] = {}
    try:
        (out["version"],) = struct.unpack("<I", _read(fh, 4))
        if out["version"] < 2:  # v1 used 32-bit counts; not worth supporting in a demo
            return out | {"tensor_count": "?", "kv_count": "?"}
        out["tensor_count"], out["kv_count"] = struct.unpack("<QQ", _read(fh, 16))
        for _ in range(min(out["kv_count"], MAX_KV_SCAN)):
            key = _read_string(fh, 1024)
            (vtype,) = struct.unpack("<I", _read(fh, 4))
            if key in ("general.name", "general.architecture") and vtype == _GGUF_STRING:
                out[key] = _read_string(fh)
            else:
                _skip_value(fh, vtype)
    except (_Truncated, struct.error, OSError, ValueError):
        pass
    return out


def inspect_model(path: str) -> ModelFacts:
    """Size, sha256 (at most the first 64 MiB) and GGUF header of the model file."""
    hasher = hashlib.sha256()
    hashed = 0
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        while hashed < HASH_LIMIT:
            block = fh.read(min(1 << 20, HASH_LIMIT - hashed))
            if not block:
                break
            hasher.update(block)
            hashed += len(block)
        gguf = read_gguf_header(fh)
    return ModelFacts(path, size, hasher.hexdigest(), hashed, gguf)


def create_demo_app(facts: ModelFacts, model_id: str = "demo") -> Starlette:
    description = facts.describe()
    words = description.split(" ")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": model_id,
                        "object": "model",
                        "owned_by": "demo",
                        "description": description,
                    }
                ],
            }
        )

    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            error = {
                "message": "invalid JSON",
                "type": "invalid_request_error",
                "code": "invalid_json",
            }
            return JSONResponse({"error": error}, status_code=400)
        model = body.get("model", model_id) if isinstance(body, dict) else model_id
        created = int(time.time())
        ident = f"chatcmpl-demo-{created}"
        if isinstance(body, dict) and body.get("stream"):
            delay = body.get("delay", CHUNK_DELAY)
            if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
                delay = CHUNK_DELAY
            count = body.get("max_tokens")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                count = len(words)
            return StreamingResponse(
                _stream(
                    ident,
                    created,
                    model,
                    min(float(delay), MAX_CHUNK_DELAY),
                    min(count, MAX_STREAM_WORDS),
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": description},
                    }
                ],
                "usage": {
                    "prompt_tokens": 0,
                    "completion_tokens": len(words),
                    "total_tokens": len(words),
                },
            }
        )

    async def _stream(
        ident: str, created: int, model: str, delay: float, count: int
    ) -> AsyncIterator[bytes]:
        def event(delta: dict[str, str], finish: str | None = None) -> bytes:
            chunk = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(chunk)}\n\n".encode()

        streamed = [words[i % len(words)] for i in range(count)]
        yield event({"role": "assistant", "content": ""})
        for i in range(0, len(streamed), 4):
            await asyncio.sleep(delay)
            yield event({"content": " ".join(streamed[i : i + 4]) + " "})
        yield event({}, "stop")
        yield b"data: [DONE]\n\n"

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m staging_cli.worker.demo_backend",
        description="Demo backend: describes the model file it was given; runs no model.",
    )
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-id", default="demo")
    args = parser.parse_args(argv)
    try:
        facts = inspect_model(args.model_path)
    except OSError as exc:
        print(f"demo backend: cannot read {args.model_path}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    print(facts.describe(), file=sys.stderr, flush=True)
    import uvicorn

    uvicorn.run(
        create_demo_app(facts, args.model_id),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
