"""File-system helpers shared by the modules that write files atomically (artifacts, concept labels).

No torch here: :mod:`fact_model.concept_labels` imports this without loading the model stack.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (best effort: not every platform can open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
