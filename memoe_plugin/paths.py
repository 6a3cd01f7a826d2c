"""Where memoe_plugin keeps what it computes once: exported models, assembled model files, relation prototypes."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MEMOE_CACHE``, read now; ``~/.cache/memoe_plugin`` when it is unset."""
    return Path(os.environ.get("MEMOE_CACHE") or os.path.join("~", ".cache", "memoe_plugin")).expanduser()
