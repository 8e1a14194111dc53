"""A generated sample model for the quickstart and tests: a valid GGUF v3 header (no tensors,
a few metadata fields) followed by pseudo-random padding up to the requested size.

    python -m staging_cli.sample PATH [SIZE]      # SIZE like 256MiB, default 256MiB
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

from .config import parse_size

GGUF_MAGIC = b"GGUF"
_STRING = 8  # GGUF metadata value type: string


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return (
        struct.pack("<Q", len(k)) + k + struct.pack("<I", _STRING) + struct.pack("<Q", len(v)) + v
    )


def write_sample_model(path: Path, size: int, *, name: str = "sample", seed: int = 0) -> Path:
    """Write a GGUF-looking file of exactly ``size`` bytes (at least the header's size)."""
    kvs = [_kv_string("general.architecture", "demo"), _kv_string("general.name", name)]
    header = GGUF_MAGIC + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    rng = random.Random(seed)
    block = rng.randbytes(1 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(header)
        remaining = max(0, size - len(header))
        counter = 0
        while remaining > 0:
            piece = counter.to_bytes(8, "little") + block[8:]
            fh.write(piece[: min(remaining, len(piece))])
            remaining -= len(piece)
            counter += 1
    tmp.replace(path)  # never visible half-written (a models dir may be watching)
    return path


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    size = parse_size(argv[1]) if len(argv) == 2 else 256 * 1024 * 1024
    write_sample_model(Path(argv[0]), size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
