"""Time budgets: how long the toolkit waits before it gives up (pure logic, no I/O).

A model load takes time that grows with the model: a backend has to read (and often map into
GPU memory) every byte. A fixed timeout is either too short for large models (LocalAI's fixed
5 minutes failed an 83 GB model at 302 s) or far too long for small ones, so the load timeout
is a base plus a per-GiB allowance, under an absolute cap.
"""

from __future__ import annotations

GIB = 1024**3

DEFAULT_LOAD_TIMEOUT_BASE = 60.0
DEFAULT_LOAD_TIMEOUT_PER_GIB = 10.0
DEFAULT_LOAD_TIMEOUT_CAP = 1800.0


def load_timeout(
    size_bytes: int,
    base: float = DEFAULT_LOAD_TIMEOUT_BASE,
    per_gib: float = DEFAULT_LOAD_TIMEOUT_PER_GIB,
    cap: float = DEFAULT_LOAD_TIMEOUT_CAP,
) -> float:
    """Seconds a backend may take to become healthy for a model of ``size_bytes`` bytes.

    ``base + per_gib * size_in_GiB``, never more than ``cap`` (and never negative). With the
    defaults a 1 GiB model gets 70 s, a 15.7 GB model about 206 s, and anything above
    ~174 GiB the 30-minute cap. A ``cap`` below ``base`` wins: the cap is absolute.
    """
    if size_bytes < 0:
        raise ValueError(f"a model size cannot be negative ({size_bytes})")
    timeout = base + per_gib * (size_bytes / GIB)
    return max(0.0, min(timeout, cap))
