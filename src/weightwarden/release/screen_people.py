"""Screening people: a word-by-word check of a person's name that the string scores (``rapidfuzz``) do not make.

A string score sees "Li Wei" in "Li Wei Dong", "Wang Xiaoping" one letter from "Wang Xiaoming" and "Fatima Zahra
Bennani" two from "Fatima Zahra Benali": common personal names that differ from a listed person's by one name
score as high as the listed name misspelt (issue 17, held-out set 3).  So a hit on a person stands only where
the names line up part by part (``rigour``'s name analysis, the library OpenSanctions' matcher is built on):

* every name of the query has a counterpart among one of the listed person's names: the same word; the same
  sound in a word of five letters or more (metaphone: "Mohamad" / "Mohammed", "Alexandr" / "Aleksandr"); a
  spelling within typo distance (``rigour``'s ``compare_parts``: its cost model treats look-alike letters as
  cheap edits and joined or split words ("Cholho" / "Chol Ho") as almost free, and refuses an edit density that
  says another name); failing those, the same name in another transliteration (``rigour``'s name symbols, from
  Wikidata: "Michail" / "Mikhail", "Aly" / "Ali").  An initial stands for a name it begins;
* (or else the listed name is there whole: a word appended to a listed person's full name, a city, a suffix or a
  short patronymic, is an evader's as for an organisation)
* and the listed name's first and last part are matched: the given name and the family name, in whichever order
  either is written.  Middle names and patronymics may be left out ("Sergei Petrov" for "Sergei Ivanovich
  Petrov"), but a name cut at an end is another person ("Li Wei" is not "Li Wei Dong", nor "Kim Chol Min" "Kim
  Chol Ho").

The name symbols cost ``rigour`` a table of names built on first use (seconds of CPU, some 400 MB), so they are
asked only where the rest leaves a name on each side unmatched.  Organisations are not checked here (their rules
are in :mod:`.screen`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .._extras import require

__all__ = ["MIN_SOUND", "PART_SCORE", "person_agrees"]

# the least ``compare_parts`` score for two spellings to count as one name.  Set on the tuning set and held-out
# sets 1 to 3 of tests/vectors/ (sets 4 and 5 were never tuned on): the same name spelt otherwise scores 0.81 and
# more there ("Hoseyni" / "Hoseini" 0.81, "Serguei" / "Sergei" 0.86, "Cholho" / "Chol Ho" 0.97) and another name
# at most 0.77 ("Xiaoping" / "Xiaoming"; "Bennani" / "Benali" 0)
PART_SCORE = 0.8
# the shortest words compared by sound: shorter ones sound alike across names ("Ho" / "Hu", "Chen" / "Chan")
MIN_SOUND = 5


@lru_cache(maxsize=65536)
def _parts(name: str, symbols: bool) -> Any:
    """The analysed name (``rigour.names.Name``) of a normalised name, or None when nothing is left."""
    analyze_names, tag = require("rigour.names", "analyze_names", "NameTypeTag", extra="release")
    names = analyze_names(tag.PER, [name], symbols=symbols, phonetics=False, consolidate=False, rewrite=False)
    return next(iter(names), None)


def _symbol_pairs(q: Any, r: Any) -> tuple[set[int], set[int]]:
    """The query's and the listed name's parts (by index) that ``rigour`` pairs by a shared name symbol, taking
    the pairing that covers most parts."""
    pair_symbols = require("rigour.names", "pair_symbols", extra="release")
    best: tuple[set[int], set[int]] = (set(), set())
    for option in pair_symbols(q, r):
        qs = {p.index for a in option for p in a.qps}
        rs = {p.index for a in option for p in a.rps}
        if len(qs) + len(rs) > len(best[0]) + len(best[1]):
            best = (qs, rs)
    return best


def _agrees(q: Any, r: Any, symbols: bool) -> bool | None:
    """True where the names line up; False where they do not; None where they do not but a name is unmatched on
    each side (name symbols might pair them)."""
    compare_parts = require("rigour.names", "compare_parts", extra="release")
    metaphone = require("rigour.text", "metaphone", extra="release")
    qparts, rparts = list(q.parts), list(r.parts)
    qdone, rdone = _symbol_pairs(q, r) if symbols else (set(), set())

    def pair(same: Any) -> None:
        for p in qparts:
            for o in rparts:
                if p.index not in qdone and o.index not in rdone and len(p.form) > 1 and same(p.form, o.form):
                    qdone.add(p.index)
                    rdone.add(o.index)

    pair(lambda a, b: a == b)
    pair(lambda a, b: min(len(a), len(b)) >= MIN_SOUND and metaphone(a) == metaphone(b))
    # spellings within typo distance: the words left over together (a word joined or split: "cholho" / "chol
    # ho"), then two by two, the closest first (together, a word with no counterpart can pull a close pair apart)
    qrest = [p for p in qparts if p.index not in qdone and len(p.form) > 1]
    rrest = [p for p in rparts if p.index not in rdone]
    if qrest and rrest:
        for a in compare_parts(qrest, rrest):
            if a.qps and a.rps and a.score >= PART_SCORE:
                qdone |= {p.index for p in a.qps}
                rdone |= {p.index for p in a.rps}
    pairs = [
        (a.score, p.index, o.index)
        for p in qparts
        if p.index not in qdone and len(p.form) > 1
        for o in rparts
        if o.index not in rdone
        for a in compare_parts([p], [o])
        if a.qps and a.rps
    ]
    for score, pi, oi in sorted(pairs, reverse=True):
        if score >= PART_SCORE and pi not in qdone and oi not in rdone:
            qdone.add(pi)
            rdone.add(oi)
    for p in qparts:  # an initial stands for a name it begins that is not matched yet
        if p.index not in qdone and len(p.form) == 1:
            o = next((o for o in rparts if o.index not in rdone and o.form.startswith(p.form)), None)
            if o is not None:
                qdone.add(p.index)
                rdone.add(o.index)
    # every name of the query accounted for, or the listed name whole in it: a word appended to a listed person's
    # full name (a city, a title, "(Moscow)") is an evader's, as for an organisation, not another person
    whole = len(qdone) == len(qparts) or len(rdone) == len(rparts) > 1
    if whole and rparts[0].index in rdone and rparts[-1].index in rdone:
        return True
    if symbols or len(qdone) == len(qparts) or len(rdone) == len(rparts):
        return False
    return None


def person_agrees(query: str, names: list[str]) -> bool:
    """Whether the normalised ``query`` lines up part by part with one of a listed person's normalised ``names``
    (module docstring)."""
    maybe: list[str] = []
    for symbols in (False, True):
        q = _parts(query, symbols)
        if q is None:
            return False
        for n in names if not symbols else maybe:
            r = _parts(n, symbols)
            found = _agrees(q, r, symbols) if r is not None else False
            if found:
                return True
            if found is None:
                maybe.append(n)
        if not maybe:
            return False
    return False
