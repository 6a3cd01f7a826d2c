"""The paper's entity extractor: NLTK named-entity chunking (needs NLTK's data).

``NLTKExtractor`` (``name = "nltk"``)
    ``word_tokenize`` -> ``pos_tag`` -> binary ``ne_chunk``; each ``NE``
    subtree is one entity, mapped back to character offsets by aligning the
    tokens with the original text (``word_tokenize`` rewrites ``"`` as
    `````` / ``''``, which the aligner accounts for).  It needs the NLTK data
    packages in :data:`NLTK_DATA_PACKAGES`; nothing here ever downloads
    them.  Install with::

        python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng maxent_ne_chunker_tab words
"""
from __future__ import annotations

from ...compat import version_tuple
from .entity import Entity

__all__ = ["NLTKExtractor", "NLTKDataMissingError", "NLTK_DATA_PACKAGES", "NLTK_INSTALL_COMMAND",
           "missing_nltk_data"]


#: NLTK data packages needed by :class:`NLTKExtractor` (nltk >= 3.9 names).
NLTK_DATA_PACKAGES: tuple[str, ...] = (
    "punkt_tab",
    "averaged_perceptron_tagger_eng",
    "maxent_ne_chunker_tab",
    "words",
)

#: Resource path(s) looked up with ``nltk.data.find`` for each package; a
#: package counts as present when any of its paths is found (a directory or
#: the zip NLTK's downloader leaves beside it).
_NLTK_RESOURCE_PATHS: dict[str, tuple[str, ...]] = {
    "punkt_tab": ("tokenizers/punkt_tab/english/", "tokenizers/punkt_tab/"),
    "averaged_perceptron_tagger_eng": ("taggers/averaged_perceptron_tagger_eng/",),
    "maxent_ne_chunker_tab": (
        "chunkers/maxent_ne_chunker_tab/english_ace_binary/",
        "chunkers/maxent_ne_chunker_tab/",
    ),
    "words": ("corpora/words/", "corpora/words", "corpora/words.zip"),
}

NLTK_INSTALL_COMMAND = "python -m nltk.downloader " + " ".join(NLTK_DATA_PACKAGES)


class NLTKDataMissingError(RuntimeError):
    """NLTK (or the NLTK data it needs for NER) is not installed."""

    def __init__(self, missing, nltk_missing: bool = False, detail: str = "", reason: str = ""):
        self.missing = list(missing)
        if reason:
            msg = f"{reason}; then install the data with: {install_command(self.missing)}"
        elif nltk_missing:
            msg = (
                "The NLTK entity extractor needs the 'nltk' package, which is not "
                "importable; install it with `pip install nltk`, then its data with "
                f"`{NLTK_INSTALL_COMMAND}`."
            )
        else:
            msg = (
                "NLTK NER data is missing: "
                + ", ".join(self.missing)
                + f". Install it with: {install_command(self.missing)}"
            )
            if detail:
                msg += f" (the installed data failed to load: {detail})"
        self.detail = detail
        super().__init__(msg)


def install_command(missing) -> str:
    return "python -m nltk.downloader " + " ".join(missing or NLTK_DATA_PACKAGES)


def _import_nltk():
    try:
        import nltk  # noqa: F401
        import nltk.data  # noqa: F401
    except Exception:  # pragma: no cover - nltk is a dependency here
        return None
    return nltk


def missing_nltk_data() -> list[str]:
    """Names of the :data:`NLTK_DATA_PACKAGES` not found by ``nltk.data.find``.

    Only looks; never downloads.  If nltk itself cannot be imported, every
    package is reported missing.
    """
    nltk = _import_nltk()
    if nltk is None:
        return list(NLTK_DATA_PACKAGES)
    missing = []
    for pkg in NLTK_DATA_PACKAGES:
        for res in _NLTK_RESOURCE_PATHS[pkg]:
            try:
                nltk.data.find(res)
                break
            except (LookupError, OSError, ValueError):
                continue
        else:
            missing.append(pkg)
    return missing


_QUOTE_ALTERNATIVES = {
    "``": ('"', "``", "“", "''"),
    "''": ('"', "''", "”", "``"),
    '"': ('"', "“", "”"),
    "`": ("'", "`", "‘"),
    "'": ("'", "’"),
}


def _align_tokens(tokens, text: str) -> list[tuple[int, int] | None]:
    """Char spans of ``tokens`` in ``text``, scanning left to right.

    Handles the rewrites ``word_tokenize`` performs on quotes; a token that
    cannot be found (some other rewrite) gets ``None`` and does not move the
    cursor.
    """
    spans: list[tuple[int, int] | None] = []
    pos = 0
    for tok in tokens:
        best = None
        for cand in _QUOTE_ALTERNATIVES.get(tok, (tok,)):
            idx = text.find(cand, pos)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, idx + len(cand))
        # don't let a token jump over a long stretch of unseen text
        if best is not None and text[pos : best[0]].strip() and len(tok) <= 2:
            # short punctuation-like token found far ahead: accept only if the
            # skipped text is whitespace; otherwise treat as unaligned
            best = None
        spans.append(best)
        if best is not None:
            pos = best[1]
    return spans


class NLTKExtractor:
    """NLTK ``ne_chunk(binary=True)`` entity extractor.

    Raises :class:`NLTKDataMissingError` at construction when nltk or any of
    :data:`NLTK_DATA_PACKAGES` is missing (nothing is downloaded).
    """

    name = "nltk"

    def __init__(self):
        nltk = _import_nltk()
        if nltk is None:
            raise NLTKDataMissingError(NLTK_DATA_PACKAGES, nltk_missing=True)
        if version_tuple(getattr(nltk, "__version__", "0")) < (3, 9):
            raise NLTKDataMissingError(
                NLTK_DATA_PACKAGES,
                reason=f"nltk {nltk.__version__} is too old for the NLTK anchor backend: it needs nltk >= 3.9, "
                       "whose tab-format NER data replaced the pickled models. EasyEdit's requirements pin "
                       "nltk 3.6.5; `pip install 'nltk>=3.9'` works alongside EasyEdit")
        missing = missing_nltk_data()
        if missing:
            raise NLTKDataMissingError(missing)
        try:
            from nltk.chunk import ne_chunker
            from nltk.tag import PerceptronTagger
            from nltk.tokenize import word_tokenize

            self._word_tokenize = word_tokenize
            self._tagger = PerceptronTagger()
            self._chunker = ne_chunker(fmt="binary")
            # warm the punkt model and the word list now, so missing or
            # broken data is reported here rather than on the first call
            self._extract("Marie Curie was born in Warsaw.")
        except (LookupError, OSError) as exc:  # data found but incomplete
            raise NLTKDataMissingError(
                list(NLTK_DATA_PACKAGES), detail=f"{type(exc).__name__}: {exc}"
            ) from exc

    def _extract(self, text: str) -> list[Entity]:
        from nltk.tree import Tree

        tokens = self._word_tokenize(text)
        if not tokens:
            return []
        spans = _align_tokens(tokens, text)
        tree = self._chunker.parse(self._tagger.tag(tokens))
        out: list[Entity] = []
        idx = 0
        for child in tree:
            if isinstance(child, Tree):
                k = len(child.leaves())
                got = [sp for sp in spans[idx : idx + k] if sp is not None]
                idx += k
                if got:
                    start, end = got[0][0], got[-1][1]
                    out.append(Entity(start, end, text[start:end]))
            else:
                idx += 1
        return out

    def __call__(self, text: str) -> list[Entity]:
        return self._extract(text)

    def __repr__(self) -> str:
        return "NLTKExtractor()"
