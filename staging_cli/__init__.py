"""staging-cli: resumable, verified staging of model files onto inference workers."""

from __future__ import annotations

__version__ = "0.1.0"
