"""The workers a router may place models on: their clients, stagers and current state.

Each worker has its own bearer token (``--worker URL --worker-token T`` pairs, or a
``[[workers]]`` table in the config file). One HTTP client per worker carries that token for
control calls (status, repository API) and for forwarded inference requests; one stager per
worker shares the user's digest cache and resume records.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..config import Paths
from ..stager import StageOptions, Stager, open_stager
from .placement import WorkerView
from .proxy import ForwardingClient

STATUS_TTL = 1.0  # seconds a worker's /status answer is reused for placement


@dataclass(frozen=True)
class WorkerRef:
    url: str
    token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))


class WorkerPool:
    """Clients, stagers and cached status of every worker the router may use."""

    def __init__(
        self,
        workers: Sequence[WorkerRef],
        *,
        paths: Paths,
        stage_options: StageOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not workers:
            raise ValueError("a router needs at least one worker")
        self.refs = {w.url: w for w in workers}
        self.paths = paths
        self.stage_options = stage_options
        self.in_flight: Counter[str] = Counter()
        self._transport = transport
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._stagers: dict[str, Stager] = {}
        self._views: tuple[float, list[WorkerView]] | None = None

    @property
    def urls(self) -> list[str]:
        return list(self.refs)

    def client(self, url: str) -> httpx.AsyncClient:
        """The worker's client: its token, a generous pool, no read timeout (generation is
        slow and streams); connects fail fast so a vanished worker is reported at once."""
        client = self._clients.get(url)
        if client is None:
            token = self.refs[url].token if url in self.refs else None
            # forwarded requests go through the ForwardingClient's aiohttp session; a test's
            # transport only applies to httpx, so then everything stays on httpx
            kind = httpx.AsyncClient if self._transport is not None else ForwardingClient
            client = kind(
                headers={"Authorization": f"Bearer {token}"} if token else {},
                timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=30.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                transport=self._transport,
            )
            self._clients[url] = client
        return client

    def stager_for(self, url: str) -> Stager:
        stager = self._stagers.get(url)
        if stager is None:
            token = self.refs[url].token if url in self.refs else None
            stager = open_stager(url, token=token, options=self.stage_options, paths=self.paths)
            self._stagers[url] = stager
        return stager

    async def _view(self, url: str) -> WorkerView:
        client = self.client(url)
        try:
            response = await client.get(f"{url}/status", timeout=5.0)
        except httpx.HTTPError as exc:
            return WorkerView.unreachable(url, f"{type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return WorkerView.unreachable(url, f"/status answered {response.status_code}")
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            return WorkerView.unreachable(url, "/status is not JSON")
        return WorkerView.from_status(url, body, in_flight=self.in_flight[url])

    async def views(self, *, fresh: bool = False) -> list[WorkerView]:
        """Every worker's current state (one ``GET /status`` each, in parallel, cached 1 s)."""
        now = time.monotonic()
        if not fresh and self._views is not None and now - self._views[0] < STATUS_TTL:
            return self._views[1]
        views = list(await asyncio.gather(*(self._view(url) for url in self.refs)))
        self._views = (now, views)
        return views

    async def aclose(self) -> None:
        for stager in self._stagers.values():
            await stager.aclose()
            stager.digests.close()
            stager.records.close()
        for client in self._clients.values():
            await client.aclose()
