"""The view's writer as the settings configure it, for every process that projects into a view:
the CLI's pipeline, the server's read side and its fresh copies, an erasure finishing its work."""
from __future__ import annotations

from typing import Any

from cdp.config import Settings
from projections.projector import Projector


def make_projector(settings: Settings, path: Any = None) -> Projector:
    """The view's writer, configured from the settings (path: the view's, unless given)."""
    return Projector(path or settings.duckdb_path, settings.as_of, settings.duckdb_memory, settings.survivorship)
