"""Named-entity ("knowledge anchor") extraction for MEMoE routing.

MEMoE routes an input to an expert by the named entities ("knowledge
anchors") it mentions.  This module finds those entities in a prompt string
and reports them as :class:`Entity` tuples with character offsets into the
*original* text (``text[e.start:e.end] == e.text`` always holds).

Two backends are provided:

``OfflineExtractor`` (``name = "offline"``)
    A capitalisation heuristic in pure Python + :mod:`re`; it needs no
    downloaded data and costs ~10-20 microseconds per prompt.  The rule:

    1. The text is split into word tokens (letters/digits, with internal
       ``- ' ’ . &`` allowed, so ``F-16``, ``McDonald's``, ``U.S``, ``AT&T``
       are one token).  A single capital letter, a dotted abbreviation
       (``U.S``, ``D.C``) or a known title abbreviation (``St``, ``Dr``,
       ``Jr`` ...) takes a directly following ``.`` into the token.
    2. A token is *name-like* if it starts with an upper-case letter, or
       contains a digit (``A5``, ``2012``), or has an upper-case letter after
       its first character (``iPhone``, ``eBay``).
    3. An entity is a maximal run of name-like tokens separated only by
       whitespace.  Up to two lower-case connectors (``of de da di del van
       von der den la le du bin al y the ...``) may sit *inside* a run when
       a name-like token follows them ("Autonomous University of Madrid",
       "Leonardo da Vinci", "Bank of the Philippine Islands").  Anything
       else -- a comma, ``and``, any other lower-case word, ``?`` -- ends the
       run.
    4. Leading capitalised function words (:data:`STOPWORDS`: What, Which,
       The, In, Did, Name, ...) are stripped from the start of every run,
       followed by any connectors left at its start: "The mother tongue" ->
       nothing, "In Wales" -> "Wales", "Did Watts Humphrey" -> "Watts
       Humphrey".  This is done always, not only at sentence starts, so a
       name that really begins with "The" loses it ("The Beatles" ->
       "Beatles").
    5. A possessive ``'s`` / ``’s`` is stripped and ends the run ("Marie
       Curie's father" -> "Marie Curie"; "Apple's iPhone" -> "Apple",
       "iPhone"; "McDonald's" -> "McDonald").

    Known limits: entities written in lower case are missed ("the genus
    catharylla"); sentence-initial capitalised common nouns are taken as
    entities ("Mother tongue of X" yields "Mother"); adjacent names with
    no punctuation between them merge ("Apple A5" is one entity, which is
    wanted, but so is "Paris France"); names whose own first word is a
    stopword lose that word; commas split names ("Washington, D.C.").

    Prefix property (relied on by callers): for a prompt ``P`` and an
    answer ``A`` starting a new word, the entities of ``P`` are a prefix of
    the entities of ``P + " " + A`` whenever ``P`` ends in punctuation or
    in a lower-case word that is not a connector -- true of ZsRE questions
    (ending in ``?``) and CounterFact prompts ("... is developed by").  It
    fails only when ``P`` itself ends inside a possible run (a name-like
    word or a connector) and ``A`` continues it.

``NLTKExtractor`` (``name = "nltk"``)
    ``word_tokenize`` -> ``pos_tag`` -> binary ``ne_chunk``; each ``NE``
    subtree is one entity, mapped back to character offsets by aligning the
    tokens with the original text (``word_tokenize`` rewrites ``"`` as
    `````` / ``''``, which the aligner accounts for).  It needs the NLTK data
    packages in :data:`NLTK_DATA_PACKAGES`; nothing here ever downloads
    them.  Install with::

        python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng maxent_ne_chunker_tab words

:func:`make_extractor` picks a backend by name; ``"auto"`` uses NLTK when
its data is present and otherwise falls back to the offline extractor with
a single warning per process.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

__all__ = [
    "Entity",
    "NLTKDataMissingError",
    "NLTK_DATA_PACKAGES",
    "NLTK_INSTALL_COMMAND",
    "STOPWORDS",
    "CONNECTORS",
    "missing_nltk_data",
    "OfflineExtractor",
    "NLTKExtractor",
    "make_extractor",
]


class Entity(NamedTuple):
    """One entity: ``text == source_text[start:end]``."""

    start: int  # char offset in the text
    end: int  # char offset (exclusive)
    text: str


# --------------------------------------------------------------------------
# NLTK data handling
# --------------------------------------------------------------------------

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
            msg = f"{reason}; then install the data with: {_install_command(self.missing)}"
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
                + f". Install it with: {_install_command(self.missing)}"
            )
            if detail:
                msg += f" (the installed data failed to load: {detail})"
        self.detail = detail
        super().__init__(msg)


def _install_command(missing) -> str:
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


# --------------------------------------------------------------------------
# Offline extractor
# --------------------------------------------------------------------------

#: Capitalised function words that never start an entity (stripped from the
#: start of a run).  Compared case-sensitively against the token text.
STOPWORDS: frozenset[str] = frozenset(
    """
    A An The This That These Those There Here Their Theirs His Her Hers Its It
    He She They We I You Me Him Them Us My Our Your Mine Ours Yours
    What Which Who Whom Whose Where When Why How Whatever Whichever Whoever
    What's Who's Where's When's How's It's That's There's
    In On At Of For By To From With Without Within Into Onto Upon Over Under
    About Above Below Across After Before During Since Until Till While Between
    Among Against Through Throughout Toward Towards Via Per Than Like Unlike
    Along Around Behind Beside Besides Beyond Despite Except Inside Outside
    Near Off Out Up Down According Regarding Concerning
    Is Are Was Were Be Been Being Am Did Does Do Done Has Have Had Having
    Can Could Would Should Will Shall May Might Must
    And But Or Nor If As So Yet Then Also Because Although Though Whereas
    Whether Once Not No Yes All Any Some Each Every Both Either Neither
    Many Much Most More Few Other Another Such Only Own Same
    Name Tell List Give Identify Describe Explain Find Please Let
    Answer Question Q
    """.split()
)

#: Lower-case words allowed *inside* an entity run (when a name-like token
#: follows them), as in "University of Madrid" or "Leonardo da Vinci".
CONNECTORS: frozenset[str] = frozenset(
    """
    of de da di del della delle dei degli des do dos das du van von der den
    la le les el y bin ibn bint al ter ten zu am upon the &
    """.split()
)

#: Title/abbreviation tokens that take a following "." ("St. Louis").
_ABBREVIATIONS: frozenset[str] = frozenset(
    """
    St Ste Mt Ft Dr Mr Mrs Ms Jr Sr Prof Gen Col Lt Sgt Capt Cpt Adm Rev
    Gov Sen Rep Pres Co Corp Inc Ltd Bros No Vol
    """.split()
)

_MAX_CONNECTORS = 2

# Word tokens are letters/digits with internal - ' ’ . & (F-16, McDonald's,
# U.S, AT&T); a bare "&" is a token of its own (Procter & Gamble).  For speed
# the regex never yields plain lower-case ASCII words other than connectors:
# they can only end a run, and skipping them leaves non-space text in the gap
# between the surrounding tokens, which ends the run just the same.
_JOIN = "[-'’.&]"
_CONNECTOR_ALT = "|".join(
    re.escape(c) for c in sorted(CONNECTORS - {"&"}, key=len, reverse=True)
)
_TOKEN_RE = re.compile(
    rf"""
    (?<!\w)(?<!\w{_JOIN})                              # at a token start
    (?:
        (?:{_CONNECTOR_ALT})(?!{_JOIN}?\w)               # a connector
      | (?![a-z]+(?:{_JOIN}[a-z]+)*(?!{_JOIN}?\w))       # not plain lower case
        \w+(?:{_JOIN}\w+)*                              # any other token
      | &
    )
    """,
    re.VERBOSE,
)
_WS_RE = re.compile(r"\s+")
_POSSESSIVES = ("'s", "’s", "'S", "’S")

# token kinds
_NAME, _CONN, _OTHER = 0, 1, 2


def _is_name_like(tok: str) -> bool:
    c = tok[0]
    if c.isupper():
        return True
    if c.isdigit():
        return True
    # lowercase-initial: digits or internal capitals (iPhone, eBay, mp3)
    for ch in tok[1:]:
        if ch.isupper() or ch.isdigit():
            return True
    return False


class OfflineExtractor:
    """Capitalisation-based entity extractor; see the module docstring."""

    name = "offline"

    def __call__(self, text: str) -> list[Entity]:
        # --- 1. tokenise: (start, end, kind, ends_run) ----------------------
        toks: list[tuple[int, int, int, bool]] = []
        n = len(text)
        for m in _TOKEN_RE.finditer(text):
            s, e = m.span()
            tok = m.group()
            if tok in CONNECTORS:
                toks.append((s, e, _CONN, False))
                continue
            if not _is_name_like(tok):
                toks.append((s, e, _OTHER, False))
                continue
            ends_run = False
            if tok.endswith(_POSSESSIVES) and len(tok) > 2:
                e -= 2
                ends_run = True
            elif (
                e < n
                and text[e] == "."
                and (
                    (len(tok) == 1 and tok.isupper())
                    or tok in _ABBREVIATIONS
                    or ("." in tok and tok[0].isupper())
                )
            ):
                e += 1  # "F.", "St.", "U.S."
            toks.append((s, e, _NAME, ends_run))

        # --- 2. group into runs ------------------------------------------------
        out: list[Entity] = []
        i, nt = 0, len(toks)
        while i < nt:
            if toks[i][2] != _NAME:
                i += 1
                continue
            run = [i]  # indices of tokens in the run
            j = i
            while not toks[j][3]:  # stop after a possessive
                # look ahead over <= _MAX_CONNECTORS connectors to a name token,
                # every gap being whitespace only
                k = j + 1
                nconn = 0
                ok = False
                while k < nt:
                    if not _gap_is_space(text, toks[k - 1][1], toks[k][0]):
                        break
                    kind = toks[k][2]
                    if kind == _NAME:
                        ok = True
                        break
                    if kind == _CONN and nconn < _MAX_CONNECTORS:
                        nconn += 1
                        k += 1
                        continue
                    break
                if not ok:
                    break
                run.extend(range(j + 1, k + 1))
                j = k
            i = j + 1

            # --- 3. strip leading stopwords, then leading connectors ----------
            a = 0
            while a < len(run):
                s, e, kind, _ = toks[run[a]]
                if kind == _CONN or text[s:e] in STOPWORDS:
                    a += 1
                else:
                    break
            if a == len(run):
                continue
            start = toks[run[a]][0]
            end = toks[run[-1]][1]
            out.append(Entity(start, end, text[start:end]))
        return out

    def __repr__(self) -> str:
        return "OfflineExtractor()"


def _gap_is_space(text: str, a: int, b: int) -> bool:
    if a == b:
        return False  # tokens glued by punctuation-less boundary (rare)
    if b - a == 1:
        return text[a].isspace()
    return _WS_RE.fullmatch(text, a, b) is not None


# --------------------------------------------------------------------------
# NLTK extractor
# --------------------------------------------------------------------------

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


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


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
        if _version_tuple(getattr(nltk, "__version__", "0")) < (3, 9):
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


# --------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------

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
                + f"); install it with `{_install_command(missing)}`"
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
