"""The router: cold-loads models on demand, never tied to a client connection.

``catalog`` lists the models the router may load (``--models-dir``); ``placement`` picks the
worker that gets a cold model.
"""

from __future__ import annotations

from .catalog import Catalog, CatalogEntry, CatalogProblem
from .placement import Placement, WorkerView, place

__all__ = ["Catalog", "CatalogEntry", "CatalogProblem", "Placement", "WorkerView", "place"]
