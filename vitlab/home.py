"""Where vitlab keeps what it downloads and measures: ``$VITLAB_HOME``, one rule for every layer that writes there
(the hub's download cache, the CPU-kernel and precision measurements)."""

from __future__ import annotations

import os
from pathlib import Path


def vitlab_home() -> Path:
    """``$VITLAB_HOME``, default ``~/.cache/vitlab`` (read at each call, so tests and users can change it)."""
    return Path(os.environ.get("VITLAB_HOME") or Path.home() / ".cache" / "vitlab").expanduser()
