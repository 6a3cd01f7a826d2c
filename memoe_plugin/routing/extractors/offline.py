"""The offline entity extractor: capitalisation rules, no downloaded data.

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
"""
from __future__ import annotations

import re

from .entity import Entity

__all__ = ["OfflineExtractor", "STOPWORDS", "CONNECTORS"]


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
