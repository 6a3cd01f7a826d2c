"""Named-entity ("knowledge anchor") extraction for MEMoE routing.

MEMoE routes an input to an expert by the named entities ("knowledge
anchors") it mentions.  This module finds those entities in a prompt string
and reports them as :class:`Entity` tuples with character offsets into the
*original* text (``text[e.start:e.end] == e.text`` always holds).

Two backends are provided:

* :mod:`.offline`: ``OfflineExtractor`` (``name = "offline"``), capitalisation rules in pure Python;
* :mod:`.nltk_ner`: ``NLTKExtractor`` (``name = "nltk"``), NLTK's ``ne_chunk``, the paper's method.

:func:`make_extractor` picks a backend by name; ``"auto"`` uses NLTK when
its data is present and otherwise falls back to the offline extractor with
a single warning per process.
"""
from __future__ import annotations

import warnings

from . import nltk_ner
from .entity import Entity
from .nltk_ner import NLTK_DATA_PACKAGES, NLTK_INSTALL_COMMAND, NLTKDataMissingError, NLTKExtractor, missing_nltk_data
from .offline import CONNECTORS, STOPWORDS, OfflineExtractor

__all__ = ["Entity", "NLTKDataMissingError", "NLTK_DATA_PACKAGES", "NLTK_INSTALL_COMMAND", "STOPWORDS",
           "CONNECTORS", "missing_nltk_data", "OfflineExtractor", "NLTKExtractor", "make_extractor"]


_BACKENDS = ("offline", "nltk", "auto")
_auto_fallback_warned = False


def make_extractor(backend: str) -> OfflineExtractor | NLTKExtractor:
    """Build an extractor: ``"offline"``, ``"nltk"`` or ``"auto"``.

    ``"auto"`` returns an :class:`NLTKExtractor` when nltk and its NER data
    are present, otherwise an :class:`OfflineExtractor`, warning once per
    process about the missing data.
    """
    global _auto_fallback_warned
    if backend == "offline":
        return OfflineExtractor()
    if backend == "nltk":
        return NLTKExtractor()
    if backend == "auto":
        missing = missing_nltk_data()
        if not missing:
            try:
                return NLTKExtractor()
            except NLTKDataMissingError as exc:
                reason = str(exc)
            else:  # pragma: no cover
                reason = ""
        else:
            reason = (
                "NLTK NER data is missing ("
                + ", ".join(missing)
                + f"); install it with `{nltk_ner.install_command(missing)}`"
            )
        if not _auto_fallback_warned:
            _auto_fallback_warned = True
            warnings.warn(
                f"{reason}. Using the offline (capitalisation-based) entity "
                "extractor instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        return OfflineExtractor()
    raise ValueError(
        f"unknown entity extractor backend {backend!r}; valid choices: "
        + ", ".join(repr(b) for b in _BACKENDS)
    )
