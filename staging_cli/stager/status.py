"""Reading a worker's ``GET /status`` (disk, uploads in progress, blobs)."""

from __future__ import annotations

from typing import Any

import httpx

from ..errors import AuthenticationError, TransferError, WorkerUnreachable


async def worker_status(
    worker: str, *, token: str | None = None, client: httpx.AsyncClient | None = None
) -> dict[str, Any]:
    """The worker's status document; raises a StagingError with a sentence on failure."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    own = client is None
    http = client or httpx.AsyncClient(timeout=30)
    url = worker.rstrip("/") + "/status"
    try:
        response = await http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise WorkerUnreachable(
            f"cannot reach worker {worker}: {exc or type(exc).__name__}"
        ) from exc
    finally:
        if own:
            await http.aclose()
    if response.status_code in (401, 403):
        raise AuthenticationError(
            f"worker {worker} refused the token ({response.status_code}): pass --token",
            status=response.status_code,
        )
    if response.status_code != 200:
        raise TransferError(f"worker {worker} answered /status with {response.status_code}")
    try:
        body: dict[str, Any] = response.json()
    except ValueError as exc:
        raise TransferError(f"worker {worker} answered /status with something not JSON") from exc
    return body
