"""The loader: an async client of the KServe v2 / Triton model repository API.

It asks a worker to load or unload a model and reads the repository index. It speaks to the
staging-cli worker (whose load body names the model's blobs by sha256, see
:mod:`staging_cli.worker.repository`) and to servers we did not write, such as Triton in
``--model-control-mode=explicit``: only the shapes both share are relied upon (the index is a
bare JSON array of ``{"name", "state", ...}``; errors are ``{"error": "<text>"}``; a successful
load may have an empty body).

The HTTP client is injected (``httpx.AsyncClient``) so callers choose pooling, TLS and auth and
tests can swap the transport. httpx errors and refusals are translated into
:mod:`staging_cli.errors` types whose messages say what happened and what to do:

* 401/403 -> :class:`~staging_cli.errors.AuthenticationError`
* connection failures -> :class:`~staging_cli.errors.WorkerUnreachable`
* 504, or no answer within the load timeout -> :class:`~staging_cli.errors.LoadTimeout`
* any other refusal of a load -> :class:`~staging_cli.errors.LoadError`
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from . import tus
from .budget import DEFAULT_LOAD_TIMEOUT_CAP
from .errors import (
    AuthenticationError,
    LoadError,
    LoadTimeout,
    UsageError,
    WorkerUnreachable,
)

__all__ = ["Loader", "ModelState"]

# The worker bounds every load by its own size-scaled timeout (capped); the client waits a bit
# longer than the default cap so the worker's own, more precise, answer arrives first.
DEFAULT_LOAD_WAIT = DEFAULT_LOAD_TIMEOUT_CAP + 60.0


@dataclass(frozen=True)
class ModelState:
    """One entry of the repository index (or the answer to a load)."""

    name: str
    state: str
    reason: str = ""
    version: str | None = None
    files: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelState:
        files = raw.get("files")
        version = raw.get("version")
        return cls(
            name=str(raw.get("name", "")),
            state=str(raw.get("state") or "UNAVAILABLE"),
            reason=str(raw.get("reason") or ""),
            version=None if version is None else str(version),
            files=tuple(str(f) for f in files) if isinstance(files, list) else (),
            raw=dict(raw),
        )


def _error_text(response: httpx.Response) -> str | None:
    """The server's own sentence: ``{"error": "..."}`` (Triton, ours) or OpenAI's shape."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else None


class Loader:
    """Load, unload and list models on one worker through its repository API."""

    def __init__(self, client: httpx.AsyncClient, url: str, *, token: str | None = None) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _model_url(self, name: str, action: str) -> str:
        tus.validate_model_name(name)  # raises InvalidModelName before any request
        # "/" is encoded so org/model stays one path segment; "." and ".." segments cannot
        # occur (validated above), so dots can travel as they are.
        return f"{self.url}/v2/repository/models/{quote(name, safe='')}/{action}"

    async def _post(self, url: str, body: Any, what: str, wait: float | None) -> httpx.Response:
        kwargs: dict[str, Any] = {}
        if wait is not None:
            kwargs["timeout"] = httpx.Timeout(30.0, read=wait)
        try:
            return await self.client.post(url, json=body, headers=self._headers, **kwargs)
        except httpx.ReadTimeout as exc:
            raise LoadTimeout(
                f"worker {self.url} gave no answer to {what} within {wait or 0:.0f} s: the "
                "backend may still be loading a large model; check the worker's index and "
                "raise the load timeout if it needs longer"
            ) from exc
        except httpx.TransportError as exc:
            raise WorkerUnreachable(
                f"cannot reach worker {self.url} for {what} ({type(exc).__name__}: {exc}): "
                "check that it runs and the URL is right"
            ) from exc

    def _refused(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        text = _error_text(response)
        if status in (401, 403):
            raise AuthenticationError(
                f"worker {self.url} refused {what} ({status}): "
                + (text or "pass the worker's token with --token or STAGING_CLI_TOKEN"),
                status=status,
            )
        if text is None and status in (404, 405):
            raise LoadError(
                f"worker {self.url} does not offer the KServe v2 repository API ({status} on "
                f"{response.request.method} {response.request.url.path}): use a staging-cli "
                "worker, or Triton with --model-control-mode=explicit"
            )
        detail = text or response.text.strip()[:500] or response.reason_phrase
        if status == 504:
            raise LoadTimeout(f"{what} on worker {self.url} timed out: {detail}")
        raise LoadError(f"{what} on worker {self.url} failed ({status}): {detail}")

    async def index(self) -> list[ModelState]:
        """Every model the worker's repository knows, with its state."""
        response = await self._post(
            f"{self.url}/v2/repository/index", {}, "the repository index", None
        )
        self._refused(response, "the repository index")
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise LoadError(
                f"worker {self.url} answered the repository index with something that is not "
                "JSON: is the URL a KServe v2 server?"
            ) from exc
        if isinstance(body, dict) and isinstance(body.get("models"), list):
            body = body["models"]  # some KServe servers wrap the array
        if not isinstance(body, list):
            raise LoadError(
                f"worker {self.url} answered the repository index with {body!r:.200}, "
                "not a list of models"
            )
        return [ModelState.from_json(e) for e in body if isinstance(e, dict)]

    async def state(self, name: str) -> ModelState | None:
        """The index entry of one model, or None when the worker does not know it."""
        for entry in await self.index():
            if entry.name == name:
                return entry
        return None

    async def load(
        self,
        name: str,
        files: Sequence[str] = (),
        parameters: Mapping[str, Any] | None = None,
        *,
        wait: float | None = DEFAULT_LOAD_WAIT,
    ) -> ModelState:
        """Load ``name`` made of blobs ``files`` (sha256 hex); returns its state once READY.

        ``parameters`` are merged into the request's ``parameters`` object (for example
        ``{"backend": {"ctx_size": 4096}}`` on a staging-cli worker, or Triton's ``config``).
        ``wait`` is how many seconds to wait for the answer (None: the client's own timeout);
        the worker applies its own size-scaled load timeout, so this is a safety net.
        """
        url = self._model_url(name, "load")
        params: dict[str, Any] = dict(parameters or {})
        if files:
            try:
                params["files"] = [
                    tus.validate_sha256(f.lower().removeprefix("sha256:")) for f in files
                ]
            except tus.HeaderError as exc:
                raise UsageError(f"cannot load model {name}: {exc}") from exc
        body: dict[str, Any] = {"parameters": params} if params else {}
        what = f"loading model {name}"
        response = await self._post(url, body, what, wait)
        self._refused(response, what)
        try:
            answer = response.json() if response.content.strip() else None
        except (ValueError, UnicodeDecodeError):
            answer = None
        if isinstance(answer, dict) and "state" in answer:
            return ModelState.from_json({"name": name, **answer})
        return ModelState(name=name, state="READY", files=tuple(params.get("files", ())))

    async def unload(self, name: str) -> bool:
        """Unload ``name``; False when the worker did not have it loaded."""
        url = self._model_url(name, "unload")
        what = f"unloading model {name}"
        response = await self._post(url, {}, what, None)
        if response.status_code == 404 and _error_text(response) is not None:
            return False
        self._refused(response, what)
        return True

    async def gc(self, *, dry_run: bool = True, min_age: float | None = None) -> dict[str, Any]:
        """``POST /v2/repository/gc`` (staging-cli workers): remove blobs no model uses."""
        body: dict[str, Any] = {"dry_run": dry_run}
        if min_age is not None:
            body["min_age"] = min_age
        response = await self._post(
            f"{self.url}/v2/repository/gc", body, "garbage collection", None
        )
        self._refused(response, "garbage collection")
        result: dict[str, Any] = response.json()
        return result
