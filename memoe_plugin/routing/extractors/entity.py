"""The entity tuple every extractor returns."""
from __future__ import annotations

from typing import NamedTuple


class Entity(NamedTuple):
    """One entity: ``text == source_text[start:end]``."""

    start: int  # char offset in the text
    end: int  # char offset (exclusive)
    text: str
