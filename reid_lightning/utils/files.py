"""Whole-file writes that readers never see half done.

Called as ``write_atomically(path, text)`` by the sweep summary and ``PeriodicWriter``.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it (``os.replace``), so readers
    never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
