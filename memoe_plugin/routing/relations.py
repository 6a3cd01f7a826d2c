"""The relation bank: other facts a subject can have, for the key scope's anti-keys.

A fact is (subject, relation, object). The key scope keeps an edit in scope where the layer input is
close to the edit's own; a question about *another* relation of the same subject can be closer still
when it shares the edit's wording ("The place of birth of S is" after editing "The gender of S is").
For each edit, :func:`anti_key_prompts` writes prompts about the edit's subject that ask for other
relations; their layer inputs become the edit's *anti-keys* (``routing.scope``), which keep such
questions out.

Two kinds of prompt are built from the edit prompt and its subject alone:

* ``other_relation``: the plain cloze "The {label} of {subject} is" for every relation of the bank
  except the ones the edit prompt names;
* ``same_frame``: the edit prompt with the relation label it names replaced by another relation's
  label (only when the prompt names one): the other facts worded exactly as the edit is.

The bank was written for this project from the names of common Wikidata properties (people, places,
organisations, creative works, things and species), a few labels each; no prompt of any evaluation
file was read to build it. The cloze frame is the generic way to turn a property label into a prompt,
the form LAMA-style probes use.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

OTHER_RELATION, SAME_FRAME = "other_relation", "same_frame"

# relation -> its labels (the first is the one written into prompts), the relations that most subjects have first:
# ``anti_key_prompts(..., relations=N)`` asks about the first N
RELATIONS: dict[str, tuple[str, ...]] = {
    'instance of': ('type', 'kind', 'category'),
    'country': ('country', 'nation', 'state'),
    'region': ('region', 'province', 'administrative district'),
    'gender': ('gender', 'sex'),
    'occupation': ('occupation', 'profession', 'job'),
    'citizenship': ('country of citizenship', 'nationality', 'citizenship'),
    'date of birth': ('date of birth', 'birth year', 'year of birth'),
    'place of birth': ('place of birth', 'birthplace', 'city of birth'),
    'date of death': ('date of death', 'year of death'),
    'place of death': ('place of death', 'city of death'),
    'given name': ('given name', 'first name', 'forename'),
    'family name': ('family name', 'surname', 'last name'),
    'spouse': ('spouse', 'husband or wife', 'partner'),
    'father': ('father', 'dad'),
    'mother': ('mother', 'mum'),
    'child': ('child', 'son or daughter', 'eldest child'),
    'sibling': ('sibling', 'brother or sister'),
    'languages spoken': ('spoken language', 'working language'),
    'native language': ('native language', 'first language', 'mother tongue'),
    'educated at': ('alma mater', 'university', 'school'),
    'employer': ('employer', 'workplace'),
    'member of': ('group', 'band', 'organisation they belong to'),
    'position held': ('position held', 'office', 'political post'),
    'political party': ('political party', 'party affiliation'),
    'award': ('award received', 'prize', 'honour'),
    'sports team': ('team', 'club', 'current club'),
    'sport': ('sport', 'discipline of sport'),
    'playing position': ('playing position', 'position on the field'),
    'league': ('league',),
    'field of work': ('field of work', 'area of research', 'discipline'),
    'notable work': ('notable work', 'best-known work', 'masterpiece'),
    'genre': ('genre', 'category'),
    'musical genre': ('musical genre', 'style of music'),
    'instrument': ('instrument', 'musical instrument'),
    'record label': ('record label', 'label'),
    'country of origin': ('country of origin', 'home country'),
    'original language': ('original language', 'language'),
    'author': ('author', 'writer'),
    'director': ('director', 'film director'),
    'composer': ('composer', 'music writer'),
    'performer': ('performer', 'singer', 'artist'),
    'cast member': ('lead actor', 'star', 'cast member'),
    'publisher': ('publisher', 'publishing house'),
    'publication date': ('publication year', 'release date', 'year of release'),
    'producer': ('producer',),
    'screenwriter': ('screenwriter', 'script writer'),
    'founder': ('founder', 'creator', 'co-founder'),
    'inception': ('founding year', 'year of establishment', 'inception'),
    'headquarters': ('headquarters', 'head office', 'main office'),
    'industry': ('industry', 'sector', 'line of business'),
    'parent organization': ('parent company', 'owner', 'parent organisation'),
    'chief executive': ('chief executive', 'CEO', 'director'),
    'product': ('main product', 'product', 'best-selling product'),
    'capital': ('capital', 'capital city', 'seat of government'),
    'continent': ('continent', 'part of the world'),
    'official language': ('official language', 'language'),
    'shares border with': ('neighbour', 'bordering region'),
    'population': ('population', 'number of inhabitants'),
    'head of government': ('mayor', 'head of government', 'leader'),
    'named after': ('namesake', 'name origin'),
    'parent taxon': ('family', 'genus', 'parent taxon'),
    'taxon rank': ('taxon rank', 'taxonomic rank', 'rank'),
    'found in taxon': ('organism', 'species', 'host species'),
    'part of': ('parent system', 'whole it belongs to'),
    'subclass of': ('broader class', 'superclass'),
    'manufacturer': ('manufacturer', 'maker'),
    'developer': ('developer', 'programmer'),
    'religion': ('religion', 'faith', 'religious affiliation'),
    'residence': ('residence', 'home', 'place of residence'),
    'ethnic group': ('ethnic group', 'ethnicity'),
    'military branch': ('military branch', 'armed service'),
    'military rank': ('military rank', 'rank'),
    'conflict': ('war fought in', 'conflict'),
    'cause of death': ('cause of death',),
    'academic degree': ('academic degree', 'highest degree'),
    'doctoral advisor': ('doctoral advisor', 'PhD supervisor'),
    'student of': ('teacher', 'mentor'),
    'influenced by': ('main influence', 'inspiration'),
    'nominated for': ('nomination', 'award nomination'),
    'noble title': ('noble title', 'title'),
    'voice type': ('voice type', 'vocal range'),
    'twin town': ('twin town', 'twin city', 'sister city'),
    'time zone': ('time zone',),
    'highest point': ('highest point', 'tallest mountain'),
    'located next to body of water': ('river', 'body of water', 'lake'),
    'anthem': ('anthem', 'national anthem'),
    'currency': ('currency', 'money'),
    'stock exchange': ('stock exchange', 'listing'),
    'legal form': ('legal form', 'type of company'),
    'home venue': ('home ground', 'stadium', 'home venue'),
    'coach': ('head coach', 'manager', 'coach'),
    'lyricist': ('lyricist', 'songwriter'),
    'original network': ('original network', 'broadcaster', 'TV channel'),
    'followed by': ('sequel', 'successor'),
    'follows': ('predecessor', 'prequel'),
    'based on': ('source material', 'basis'),
    'narrative location': ('setting', 'narrative location'),
    'main subject': ('main subject', 'topic', 'theme'),
    'number of episodes': ('number of episodes', 'episode count'),
    'distributor': ('distributor',),
    'chromosome': ('chromosome', 'genomic location'),
    'discoverer': ('discoverer', 'inventor'),
    'discovery date': ('year of discovery', 'discovery date'),
    'material': ('material', 'main material'),
    'operating system': ('operating system', 'platform'),
    'programming language': ('programming language', 'implementation language'),
    'launch date': ('launch date', 'launch year', 'date of first flight'),
    'operator': ('operator', 'user'),
    'color': ('colour', 'color'),
    'use': ('use', 'purpose', 'function'),
    'architect': ('architect', 'designer'),
    'architectural style': ('architectural style', 'style'),
    'diocese': ('diocese', 'archdiocese'),
}
CLOZE = "The {label} of {subject} is"
# Subjects of every kind the bank asks about, for the relation prototypes (``routing.prototypes``): what a relation
# does to the layer input is estimated over these. Written for this project (well-known people, places,
# organisations, works, things and species, and made-up names), not read from any evaluation file.
GENERIC_SUBJECTS = ("Paris", "the Amazon River", "the Toyota Corolla", "Albert Einstein", "Harry Potter",
                    "Pablo Picasso", "Lake Victoria", "Nokia", "Tokyo", "the Roman Empire", "Maria Lopez", "Kenji Sato",
                    "the African elephant", "the Louvre", "Buenos Aires", "Adobe Photoshop")
# 16 subjects: every second one of the 32 the prototypes were first measured on. On dev (120 wiki_counterfact and 120
# ZsRE edits, docs/results.md "The first run") the scores were the same to the tenth with either list, and the first
# run builds the prototypes in half the time.


class AntiKeyPrompt(NamedTuple):
    text: str
    kind: str          # OTHER_RELATION or SAME_FRAME
    relation: str


def _label_pattern() -> re.Pattern:
    labels = sorted({label for names in RELATIONS.values() for label in names}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, labels)) + r")(?!\w)", re.IGNORECASE)


_LABELS = _label_pattern()
_RELATIONS_OF: dict[str, set[str]] = {}
for _relation, _names in RELATIONS.items():
    for _name in _names:
        _RELATIONS_OF.setdefault(_name.lower(), set()).add(_relation)


def named_relation(prompt: str, subject: Optional[str]) -> Optional[re.Match]:
    """The first relation label the prompt names outside its subject (longest label first), or None."""
    masked = prompt
    if subject:
        at = prompt.lower().find(subject.lower())
        if at >= 0:
            masked = prompt[:at] + "\0" * len(subject) + prompt[at + len(subject):]
    return _LABELS.search(masked)


def asked_relations(prompt: str, subject: Optional[str]) -> set[str]:
    """The relations of the bank whose label the prompt names outside its subject (empty when it names none)."""
    found = named_relation(prompt, subject.strip() if subject else subject)
    return set(_RELATIONS_OF.get(found.group(0).lower(), set())) if found else set()


def anti_key_prompts(prompt: str, subject: Optional[str], relations: Optional[int] = None) -> list[AntiKeyPrompt]:
    """Prompts about ``subject`` that ask for relations other than the one ``prompt`` asks for: those of the
    first ``relations`` relations of the bank (None: all), each once.

    Without a subject there is nothing to ask about, and the list is empty."""
    if not subject or not subject.strip():
        return []
    subject = subject.strip()
    found = named_relation(prompt, subject)
    own = asked_relations(prompt, subject)
    asked = [(relation, names[0]) for relation, names in list(RELATIONS.items())[:relations] if relation not in own]
    prompts = [AntiKeyPrompt(CLOZE.format(label=label, subject=subject), OTHER_RELATION, relation)
               for relation, label in asked]
    if found:
        seen = {p.text for p in prompts}   # a prompt worded as the cloze already has those: ask once
        reworded = [(relation, prompt[:found.start()] + label + prompt[found.end():]) for relation, label in asked]
        prompts += [AntiKeyPrompt(text, SAME_FRAME, relation) for relation, text in reworded if text not in seen]
    return prompts


def same_relation_rewordings(prompt: str, subject: Optional[str]) -> list[str]:
    """The prompt with the relation label it names (outside its subject) replaced by each other label of the bank for
    that relation ("The birthplace of S is" for "The place of birth of S is"); empty when the prompt names no label,
    or one that several relations share (its relation is then not known)."""
    found = named_relation(prompt, subject.strip() if subject else subject)
    if not found:
        return []
    relations = _RELATIONS_OF.get(found.group(0).lower(), set())
    if len(relations) != 1:
        return []
    named = found.group(0).lower()
    return [prompt[:found.start()] + label + prompt[found.end():]
            for label in RELATIONS[next(iter(relations))] if label.lower() != named]
