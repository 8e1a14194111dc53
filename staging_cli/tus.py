"""tus 1.0.0 on the wire: constants and the header codecs shared by the stager and the worker.

Pure functions only (no I/O), so both sides agree byte for byte and unit tests can call them.
See https://tus.io/protocols/resumable-upload for the protocol; the toolkit conventions on top
of it (blob HEAD, upload lookup, ``/status``) are documented in the README.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from collections.abc import Mapping
from email.utils import formatdate, parsedate_to_datetime

from .errors import InvalidModelName

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = ("creation", "creation-with-upload", "expiration", "checksum", "termination")
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"

# Statuses beyond plain HTTP that the protocol and the toolkit use.
STATUS_CHECKSUM_MISMATCH = 460  # tus checksum extension: chunk discarded, offset unchanged
STATUS_DIGEST_MISMATCH = 422  # toolkit: whole-file sha256 differs; upload discarded

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")

MAX_MODEL_NAME = 256
MAX_FILENAME = 255
MAX_METADATA_VALUE = 4096


class HeaderError(ValueError):
    """A malformed tus header; the message is fit to send back to the client."""


def encode_metadata(metadata: Mapping[str, str | None]) -> str:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (a bare key for None)."""
    parts = []
    for key, value in metadata.items():
        if not key or " " in key or "," in key:
            raise ValueError(f"invalid metadata key {key!r}")
        if value is None:
            parts.append(key)
        else:
            parts.append(f"{key} {base64.b64encode(value.encode()).decode('ascii')}")
    return ",".join(parts)


def decode_metadata(header: str | None) -> dict[str, str | None]:
    """Parse ``Upload-Metadata``; values must be base64 of UTF-8 text."""
    result: dict[str, str | None] = {}
    if not header or not header.strip():
        return result
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition(" ")
        value = value.strip()
        if not key or " " in value:
            raise HeaderError(f"Upload-Metadata item {item[:60]!r} is not 'key base64value'")
        if key in result:
            raise HeaderError(f"Upload-Metadata key {key!r} appears twice")
        if not value:
            result[key] = None
            continue
        try:
            result[key] = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise HeaderError(f"Upload-Metadata value of {key!r} is not base64 UTF-8") from exc
    return result


def encode_checksum(algorithm: str, digest: bytes) -> str:
    """``Upload-Checksum: <algorithm> <base64 digest>``."""
    return f"{algorithm} {base64.b64encode(digest).decode('ascii')}"


def decode_checksum(header: str) -> tuple[str, bytes]:
    """Parse ``Upload-Checksum``; raises HeaderError for an unknown algorithm or bad base64."""
    algorithm, _, value = header.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise HeaderError(
            f"checksum algorithm {algorithm!r} is not supported; "
            f"use one of {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except binascii.Error as exc:
        raise HeaderError("Upload-Checksum digest is not base64") from exc
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise HeaderError(f"Upload-Checksum digest has the wrong length for {algorithm}")
    return algorithm, digest


def parse_offset(value: str | None, name: str = "Upload-Offset") -> int:
    """A non-negative decimal integer header (``Upload-Offset``, ``Upload-Length``)."""
    if value is None:
        raise HeaderError(f"{name} header is missing")
    value = value.strip()
    if not value.isdigit() or len(value) > 19:
        raise HeaderError(f"{name} must be a non-negative integer, got {value[:30]!r}")
    return int(value)


def format_http_date(timestamp: float) -> str:
    """RFC 9110 date, as ``Upload-Expires`` uses."""
    return formatdate(timestamp, usegmt=True)


def parse_http_date(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def validate_model_name(name: str) -> str:
    """Check a model name such as ``org/model``, ``name:tag`` or ``llama-3-8b.Q4_K_M``.

    Refused: empty or overlong names, control characters, absolute paths, backslashes, and
    ``.``/``..``/empty path segments. A model name is an identifier, never a file path; this
    check exists so that a name can also be shown in logs and used in URLs safely.
    """
    if not name or not name.strip():
        raise InvalidModelName("the model name is empty: give a name such as org/model:tag")
    if len(name) > MAX_MODEL_NAME:
        raise InvalidModelName(f"the model name is longer than {MAX_MODEL_NAME} characters")
    if _has_control(name):
        raise InvalidModelName(f"the model name {name!r} contains control characters")
    if name != name.strip():
        raise InvalidModelName(f"the model name {name!r} starts or ends with whitespace")
    if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise InvalidModelName(f"the model name {name!r} looks like a path; use org/model")
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        raise InvalidModelName(
            f"the model name {name!r} has an empty, '.' or '..' segment; use org/model"
        )
    return name


def validate_filename(name: str) -> str:
    """A file's base name as announced in metadata: no directories, no control characters."""
    if not name or len(name) > MAX_FILENAME:
        raise HeaderError("filename must be 1 to 255 characters")
    if "/" in name or "\\" in name or name in (".", "..") or _has_control(name):
        raise HeaderError(f"filename {name!r} must be a plain file name without directories")
    return name


def validate_sha256(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    if not SHA256_RE.match(value):
        raise HeaderError(f"{value[:80]!r} is not a sha256 hex digest (64 hex characters)")
    return value


def validate_metadata(metadata: Mapping[str, str | None]) -> dict[str, str | None]:
    """Validate the toolkit's metadata keys (``filename``, ``sha256``, ``model``) when present."""
    checked = dict(metadata)
    for key, value in metadata.items():
        if value is not None and len(value) > MAX_METADATA_VALUE:
            raise HeaderError(f"Upload-Metadata value of {key!r} is too long")
        if value is not None and key not in ("filename", "model") and _has_control(value):
            raise HeaderError(f"Upload-Metadata value of {key!r} contains control characters")
    if metadata.get("filename") is not None:
        checked["filename"] = validate_filename(str(metadata["filename"]))
    if metadata.get("sha256") is not None:
        checked["sha256"] = validate_sha256(str(metadata["sha256"]))
    if metadata.get("model") is not None:
        try:
            checked["model"] = validate_model_name(str(metadata["model"]))
        except InvalidModelName as exc:
            raise HeaderError(str(exc)) from exc
    return checked
