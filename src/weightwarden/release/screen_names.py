"""Screening names: the form names are compared in (look-alike letters, spelled-out words, transliteration,
abbreviations and company forms) and the word-level checks the matcher makes (``lists/abbreviations.json``)."""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from itertools import pairwise
from typing import Any

from .._extras import require
from ..errors import WardenError

__all__ = ["ScreeningError", "abbreviated_words", "digit_lookalikes", "literal_words", "name_tables", "normalize",
           "unmatched_words"]

_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")
# a word spelled out with one punctuation mark between letters: "S.e.r.g.e.i", "T.A.C.R.C.", "N-o-v-a-t-e-k"
_DOTTED = re.compile(r"(?<![\w.\-·'/*])(?:[^\W_][.\-·'_/*]){2,}[^\W_](?:[.\-·'_/*](?=\s|,|$))?(?!\w)")
_APOS = re.compile(r"(?<=\w)['’ʼ`](?=\w)")  # Int'l, O'Neil: one word
# digits written for the letters they look like inside a word of letters ("Petr0v", "Serg3i", "A1-Rashidi"): the
# Latin letters of each digit's look-alike class (UTS #39 puts 0 with O and 1 with l and I; 1 also stands for i)
_DIGIT_LETTERS = {"0": "o", "1": "il", "2": "z", "3": "e", "4": "a", "5": "s", "6": "b", "7": "t", "8": "b", "9": "g"}
_MIXED = re.compile(r"\b(?=\w*[a-z])(?=\w*\d)\w+\b")


class ScreeningError(WardenError):
    """A screening list is missing, empty or in a format this tool does not read."""


@lru_cache(maxsize=1)
def name_tables() -> tuple[frozenset[str], frozenset[str], dict[str, str],
                           list[tuple[tuple[str, ...], tuple[str, ...]]], frozenset[str], tuple[str, ...],
                           frozenset[str]]:  # fmt: skip
    from importlib import resources

    doc = json.loads(resources.files(__package__).joinpath("lists/abbreviations.json").read_text())
    phrases = sorted(((tuple(a), tuple(b)) for a, b in doc["phrases"]), key=lambda p: -len(p[0]))
    script_forms = tuple(sorted(doc["script_company_forms"], key=len, reverse=True))  # longest first
    words = {**doc["words"], **doc["places"], **doc["translations"]}  # one word for another, three tables
    return (frozenset(doc["company_forms"]), frozenset(doc["stopwords"]), words, phrases,
            frozenset(doc["generic"]), script_forms, frozenset(doc["branch_words"]))


@lru_cache(maxsize=1)
def _spoof() -> Any:
    return require("icu", extra="release").SpoofChecker()


@lru_cache(maxsize=8192)
def _ascii_char(c: str) -> str:
    """The Latin letter a look-alike stands for, by its UTS #39 confusable skeleton (ICU's table), or ''."""
    k = _spoof().getSkeleton(0, c)
    if not k.isascii() or not k.isalpha():
        return ""
    # the skeleton's prototype of the I / l / 1 class is "l"; a capital look-alike reads as "I"
    return "I" if k == "l" and c.isupper() else k


def _unconfuse(s: str) -> str:
    """Replace look-alike letters in words written mainly to pass as Latin: a word with a Latin letter, or one
    whose every letter has a Latin look-alike ("Ѕеrgеі", "Ρеtrоν"); words of another script are left to
    transliteration, and so is a word of look-alikes alone in a name that another word shows is written in its
    script (the initial "Н." of "Кузнецов Н. П." is the Cyrillic N, not a Latin H)."""
    words = s.split(" ")
    mapped_words = [[c if c.isascii() or not c.isalpha() else _ascii_char(c) for c in w] for w in words]
    # a word with no Latin letter and a letter with no Latin look-alike: the name is written in that script
    native = any(not w.isascii() and not any(c.isascii() and c.isalpha() for c in w) and not all(m)
                 for w, m in zip(words, mapped_words, strict=True))  # fmt: skip
    out = []
    for w, mapped in zip(words, mapped_words, strict=True):
        if w.isascii():
            out.append(w)
            continue
        has_latin = any(c.isascii() and c.isalpha() for c in w)
        if has_latin or (all(mapped) and not native):
            w = "".join(m or c for m, c in zip(mapped, w, strict=True))
        out.append(w)
    return " ".join(out)


# the Arabic article assimilated to a "sun letter" that follows it ("ar-Rashidi", "ash-Shami", "ad-Din"): al
_SUN_ARTICLES = frozenset({"ar", "as", "at", "ad", "an", "az", "ash", "ath", "adh"})


def _article(tokens: list[str]) -> list[str]:
    """``tokens`` with an assimilated Arabic article written as "al" (before the word whose first letters it
    repeats): "ar rashidi" is "al rashidi", "ash shami" "al shami"."""
    return [("al" if t in _SUN_ARTICLES and i + 1 < len(tokens) and len(tokens[i + 1]) > len(t)
             and tokens[i + 1].startswith(t[1:]) else t) for i, t in enumerate(tokens)]  # fmt: skip


def _canonical(tokens: list[str]) -> list[str]:
    forms, stop, words, phrases = name_tables()[:4]
    toks = [words.get(t, t) for t in _article(tokens) if t not in stop]
    out: list[str] = []
    i = 0
    while i < len(toks):
        for a, b in phrases:
            if tuple(toks[i:i + len(a)]) == a:
                out.extend(b)
                i += len(a)
                break
        else:
            out.append(toks[i])
            i += 1
    kept = [t for t in out if t not in forms]
    return kept or out


def _drop_format(s: str) -> str:
    """``s`` without Unicode format characters (category Cf: zero-width space, joiner and non-joiner, word joiner,
    soft hyphen, BOM, bidirectional marks): invisible, they split or disguise a word ("Sokol\u200bov")."""
    return "".join(c for c in s if unicodedata.category(c) != "Cf") if not s.isascii() else s


def _strip_script_forms(s: str) -> str:
    """``s`` without a company form written in Chinese, Japanese or Korean script at its end or start
    (``script_company_forms``: 有限公司 "Co., Ltd.", 株式会社 "K.K."), which transliteration would make name words."""
    for f in name_tables()[5]:
        if s.endswith(f) and len(s) > len(f):
            s = s[: -len(f)].rstrip()
        if s.startswith(f) and len(s) > len(f):
            s = s[len(f):].lstrip()
    return s


def _prepare(name: str) -> str:
    s = unicodedata.normalize("NFKC", _drop_format(name or ""))
    s = _strip_script_forms(s)
    s = _SPACE.sub(" ", s).strip()
    s = _unconfuse(s)
    s = _DOTTED.sub(lambda m: re.sub(r"[\W_]", "", m.group(0)), s)
    return _APOS.sub("", s)


def normalize(name: str) -> str:
    """The form names are compared in: look-alike letters read as the Latin letters they imitate (UTS #39
    skeletons), words spelled out with dots joined, transliterated to ASCII, punctuation dropped, the
    abbreviations of trade documents and company forms made canonical (``lists/abbreviations.json`` and
    rigour's org types), honorifics removed, case folded."""
    remove_org_types, remove_person_prefixes = require("rigour.names", "remove_org_types", "remove_person_prefixes",
                                                       extra="release")
    ascii_text = require("rigour.text", "ascii_text", extra="release")

    s = ascii_text(_prepare(name)).lower()
    s = _SPACE.sub(" ", _PUNCT.sub(" ", s)).strip()
    s = " ".join(_canonical(s.split()))
    s = remove_person_prefixes(remove_org_types(s, replacement=" "))
    return " ".join(_canonical(s.split()))


def joined_parts(name: str) -> list[str]:
    """``name``'s fragments in order, look-alikes read as Latin, transliterated, case folded, punctuation
    dropped ("Ser gei Pet rov" -> ["ser", "gei", "pet", "rov"]): what :meth:`ScreeningList._rejoined` joins."""
    ascii_text = require("rigour.text", "ascii_text", extra="release")

    return _SPACE.sub(" ", _PUNCT.sub("", ascii_text(_prepare(name)).lower())).split()


def abbreviated_words(name: str) -> frozenset[str]:
    """The words of ``name`` (case folded, punctuation dropped) that the abbreviation table expands to
    another word ("semi" in "Bright Semi")."""
    ascii_text = require("rigour.text", "ascii_text", extra="release")

    words = name_tables()[2]
    s = _SPACE.sub(" ", _PUNCT.sub(" ", ascii_text(_prepare(name)).lower())).strip()
    return frozenset(t for t in s.split() if words.get(t, t) != t)


def literal_words(name: str) -> frozenset[str]:
    ascii_text = require("rigour.text", "ascii_text", extra="release")

    return frozenset(_SPACE.sub(" ", _PUNCT.sub(" ", ascii_text(_prepare(name)).lower())).split())


_HARD_C = re.compile(r"c(?![eiyh])")  # c sounded k: before a, o, u, a consonant or at the end


def _spelling(word: str) -> str:
    """A word with the letters European transliterations write for one sound made one: qu / kv (Kvantum /
    Quantum), w / v, ph / f, ck / k, x / ks, a hard c / k (Kaspian / Caspian, Elektronik / Electronic)."""
    w = word.replace("qu", "kv").replace("ph", "f").replace("ck", "k").replace("w", "v").replace("x", "ks")
    return _HARD_C.sub("k", w)


def unmatched_words(words: frozenset[str] | set[str], other: frozenset[str] | set[str], joined: str,
                    name: str = "") -> set[str]:  # fmt: skip
    """The ``words`` with no counterpart in ``other``: not there, not spelled closely (ratio 80, the same first
    letter: "Western" is not "Eastern", a word one letter longer at its start is another word), not spelled
    otherwise for the same sound ("Kvantum" / "Quantum"), not cut short ("Comp." for "Components"), not written
    joined ("micro systems" / "microsystems"; with ``name``, the words' own name in order, two words written as
    one in ``other``: "dual use" / "dualuse")."""
    fuzz = require("rapidfuzz", "fuzz", extra="release")

    flat = joined.replace(" ", "")
    ws = name.split()
    together = {x for a, b in pairwise(ws) if a + b in other for x in (a, b)}
    return {w for w in words if w not in other and w not in together and not (len(w) >= 4 and w in flat)
            and not any((fuzz.ratio(w, o) >= 80 and w[0] == o[0]) or (len(o) >= 3 and w.startswith(o))
                        or (len(w) >= 4 and _spelling(w) == _spelling(o)) for o in other)}  # fmt: skip


def digit_lookalikes(normalized: str) -> list[str]:
    """The readings of a normalised name whose words mix letters and digits, each digit read as a letter it
    looks like ("serg3i petr0v" -> "sergei petrov"; "1" read as "i", then as "l"); [] when no word mixes them.
    Words of digits alone ("3", "2024") are left as they are."""
    if not _MIXED.search(normalized):
        return []
    out = []
    for k in range(2):  # the two readings of "1"; the other digits have one
        table = str.maketrans({d: ls[min(k, len(ls) - 1)] for d, ls in _DIGIT_LETTERS.items()})
        f = _MIXED.sub(lambda m, t=table: m.group(0).translate(t), normalized)  # type: ignore[misc]
        if f != normalized and f not in out:
            out.append(f)
    return out
