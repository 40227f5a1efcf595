"""Restricted-party screening: fuzzy matching of a person or organisation against a list the user
downloads (the US Consolidated Screening List as JSON or CSV, or OpenSanctions FollowTheMoney
entities as JSON lines).

Names are normalised with ``rigour`` (transliteration to ASCII, company-type and honorific
removal, case folding) and scored with ``rapidfuzz`` against every name and alias of every entry
that can reach the threshold (a bound from letter counts made at load, and an index of words, skip the
rest): the score is the best of token-sort (word order), token-set (missing or extra names) and plain
ratio (spelling), 0..100.  A hit at or above the threshold is reported with the entry, the name
that matched, both normalised forms and the component scores; a destination country that the
entry lists adds nothing, one it does not list is noted (not a reason to clear a hit).

The names (normalisation, word checks) are :mod:`.screen_names`; the lists (formats, the sample, the list
stored under a home) :mod:`.screen_lists`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from .._extras import require
from .screen_lists import Entry, is_sample, parse_entries, sample_path, save_list, stored_list
from .screen_names import (
    ScreeningError,
    abbreviated_words,
    digit_lookalikes,
    literal_words,
    name_tables,
    normalize,
    unmatched_words,
)
from .screen_people import SLIP_LEN, name_keys, name_symbols, person_agrees, person_match, sino
from .screen_readings import Readings, _article_apart, _without_notes

__all__ = ["DEFAULT_THRESHOLD", "Entry", "ScreeningError", "ScreeningList", "normalize", "screen", "update_list"]

DEFAULT_THRESHOLD = 86.0
# the score of a person found part by part (:mod:`.screen_people`) whose name the string scores put under the
# default threshold: a hit at the default threshold, not above a stricter one
PART_SCORE_HIT = 88.0
# the most listed people checked part by part for one query (those sharing most words with it first)
MAX_PEOPLE_NEAR = 64


@dataclass
class ScreeningList(Readings):
    entries: list[Entry]
    format: str
    sha256: str
    origin: str = ""
    is_sample: bool = False
    _names: list[str] = field(default_factory=list)
    _owner: list[int] = field(default_factory=list)
    _raw: list[str] = field(default_factory=list)
    _tokens: list[frozenset[str]] = field(default_factory=list)

    _combos: dict[str, list[tuple[int, frozenset[str], int]]] = field(default_factory=dict)
    _words: list[frozenset[str]] = field(default_factory=list)
    _entry_names: list[list[str]] = field(default_factory=list)
    _by_token: dict[str, list[int]] = field(default_factory=dict)
    _org_words: set[str] = field(default_factory=set)  # every word of an organisation's listed names
    _org_vocab: set[str] = field(default_factory=set)  # organisations' long words, for a slip of the pen
    _sino_org: dict[str, set[str]] = field(default_factory=dict)  # organisations' words by their syllable key
    _abbr: dict[int, frozenset[str]] = field(default_factory=dict)
    _cols: list[int] = field(default_factory=list)
    _by_key: dict[str, list[int]] = field(default_factory=dict)
    _at: dict[tuple[int, str], int] = field(default_factory=dict)
    _syllabic: set[int] = field(default_factory=set)
    _primary: list[frozenset[str]] = field(default_factory=list)
    _by_name: dict[str, list[int]] = field(default_factory=dict)
    _slip: tuple[list[str], frozenset[str]] | None = None
    _by_symbol: dict[Any, set[int]] | None = None
    _bags: Any = None
    _lens: Any = None

    def __post_init__(self) -> None:
        import numpy as np

        if not self.entries:
            raise ScreeningError("the screening list has no entries")
        for i, e in enumerate(self.entries):
            seen: set[str] = set()
            words: set[str] = set()
            primary = normalize(e.name)
            org = e.kind.lower() not in ("", "individual", "person")
            for n in (e.name, *e.aliases):
                k = normalize(n)
                if k and k not in seen:
                    seen.add(k)
                    words |= set(k.split())
                    tokens = frozenset(k.split())
                    if k != primary:  # an alias written together with words of the entry's names ("TACRC Tehran")
                        self._combos.setdefault(min(tokens), []).append((i, tokens, len(self._names)))
                        # an organisation's short alias written with an abbreviation ("Bright Semi" of "Shenzhen
                        # Bright Semiconductor Technology"): its expansion is a generic word any firm may use
                        abbr = abbreviated_words(n) if org and tokens < frozenset(primary.split()) else frozenset()
                        if abbr:
                            self._abbr[len(self._names)] = abbr
                    for w in tokens:
                        self._by_token.setdefault(w, []).append(len(self._names))
                        if not org:  # a person's words by their spelling-free keys (the part-by-part path below)
                            for key in name_keys(w):
                                self._by_key.setdefault(key, []).append(len(self._names))
                    if not org:  # two names written as one ("Aliakbar" for "Ali Akbar"): found by the joined keys
                        ws = k.split()
                        for a, b in pairwise(ws):
                            for key in name_keys(a + b):
                                self._by_key.setdefault(key, []).append(len(self._names))
                    self._by_name.setdefault(k, []).append(len(self._names))
                    self._at[i, k] = len(self._names)
                    self._names.append(k)
                    self._tokens.append(tokens)
                    self._owner.append(i)
                    self._raw.append(n)
            # a person named in Han, Hangul or Kana: a given name of two syllables is written apart ("wang xiao
            # ming", "Kim Chol Ho") as often as joined, so no syllable of the listed name may be left out
            if not org and any(_syllabic_script(n) for n in (e.name, *e.aliases)):
                self._syllabic.add(i)
            if org:
                self._org_words |= words
                self._org_vocab |= {w for w in words if len(w) >= SLIP_LEN}
                for w in words:  # a firm's Chinese name in pinyin, by the key of its syllables (below)
                    if len(w) >= 4 and w.isalpha():
                        self._sino_org.setdefault(sino(w), set()).add(w)
            self._words.append(frozenset(words))
            self._primary.append(frozenset(primary.split()))
            self._entry_names.append(sorted(seen))
        # each name's letters as counts, to bound its similarity to a query before scoring it (below)
        codes = np.frombuffer("\n".join(self._names).encode("ascii", "replace"), dtype=np.uint8)
        row = np.cumsum(codes == 10) if len(codes) else codes
        keep = codes != 10
        self._bags = np.zeros((len(self._names), 128), dtype=np.int32)
        np.add.at(self._bags, (row[keep], np.minimum(codes[keep], 127)), 1)
        self._bags = self._bags[:, sorted(set(codes.tolist()) - {10})].astype(np.int16)
        self._cols = sorted(set(codes.tolist()) - {10})
        self._lens = np.array([len(n) for n in self._names], dtype=np.int32)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScreeningList:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ScreeningError(f"cannot read the screening list {p} ({type(e).__name__}: "
                                 f"{(e.strerror or e)}): check the --file path") from None
        return cls.parse(data, p.name)

    @classmethod
    def parse(cls, data: bytes, origin: str = "") -> ScreeningList:
        entries, fmt, digest = parse_entries(data)
        lst = cls(entries, fmt, digest, origin)
        lst.is_sample = is_sample(lst.entries)  # the fictitious sample, however it was loaded or re-serialised
        return lst

    @classmethod
    def from_home(cls, home: str | os.PathLike[str]) -> ScreeningList:
        """The list loaded by `warden screen update` under ``home``, else the shipped (fictitious) sample;
        ``is_sample`` tells which."""
        from importlib import resources

        stored = stored_list(home)
        if stored is not None:
            return cls.parse(*stored)
        with resources.as_file(sample_path()) as p:
            lst = cls.load(p)
        lst.is_sample = True
        return lst

    # -- screening ------------------------------------------------------------------------------
    def screen(self, name: str, *, aliases: tuple[str, ...] = (), country: str | None = None,
               threshold: float = DEFAULT_THRESHOLD, limit: int = 5) -> dict[str, Any]:  # fmt: skip
        """Hits for ``name`` (and its ``aliases``) at or above ``threshold``, best first, explained."""
        import numpy as np
        fuzz, process = require("rapidfuzz", "fuzz", "process", extra="release")

        best: dict[int, dict[str, Any]] = {}
        queries = []
        for q in (name, *aliases, *self._rejoined(name, aliases), *_without_notes(name, aliases),
                  *self._split_apart(name, aliases)):  # fmt: skip
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
                raise ScreeningError("a name or alias to screen is not valid text (it holds a byte that is not "
                                     "UTF-8): write the name as text") from None  # fmt: skip
            nq = normalize(q)
            if nq:
                queries.append((q, nq))
                short = " ".join(t for t in nq.split() if len(t) > 1)  # initials dropped: "S. I. Petrov"
                if short and short != nq:
                    queries.append((q, short))
                # digits for letters: "Serg3i Petr0v", "Kim Ch0l Ho" (read again: "C0rp" is a company form)
                queries += [(q, f) for f in map(normalize, digit_lookalikes(nq)) if f and f != nq]
                # "rn" scanned as "m" ("Drnitry", "Arnur"): the name read back with "m"
                if "rn" in nq and (m := normalize(nq.replace("rn", "m"))) != nq:
                    queries.append((q, m))
                # a slip of the pen in a firm's word ("Artifical Intelligence", "Semicondutor"): the name with
                # each long word one slip from exactly one organisation's word read as that word
                if (fixed := self._respelled(nq)) is not None:
                    queries.append((q, fixed))
                # a firm's Chinese name in Wade-Giles or another romanisation, its syllables written apart
                # ("Chung-hsing" for "Zhongxing", "T'ien-ho" for "Tianhe")
                if (joined := self._syllables_joined(nq)) is not None:
                    queries.append((q, joined))
                if (apart := _article_apart(nq)) is not None:  # "Alrashidi" for "Al-Rashidi"
                    queries.append((q, apart))
        generic = name_tables()[4]
        for q, nq in queries:
            # scores under the threshold come back as 0 (rapidfuzz stops early on them)
            cut = threshold - 1e-9
            qt = set(nq.split())
            cand = self._candidates(nq, qt, generic, cut)
            names = [self._names[j] for j in cand]
            sort = process.cdist([nq], names, scorer=fuzz.token_sort_ratio, score_cutoff=cut, workers=1)[0]
            tset = process.cdist([nq], names, scorer=fuzz.token_set_ratio, score_cutoff=cut, workers=1)[0]
            plain = process.cdist([nq], names, scorer=fuzz.ratio, score_cutoff=cut, workers=1)[0]
            # token-set (missing or extra names) counts only where one name's words are all in the other's,
            # and that name has two words at least that are not generic: "li na" is not a shortened
            # "li wei dong", nor "lotus engineering" a shortened "lotus intelligent systems engineering institute"
            for c in np.flatnonzero(tset >= threshold - 1e-9):
                j = cand[c]
                nt = self._tokens[j]
                small, big = (qt, nt) if len(qt) <= len(nt) else (nt, qt)
                # an organisation's name shortened by a word that says which one it is ("Rostov Devices" for
                # "Rostov Quantum Devices") is another organisation; people drop middle names
                shortened_org = small is qt and bool((nt - qt) - generic) and self._organisation(j)
                # a listed firm's whole name of three words or more with generic words added ("Global Tensor
                # General Trading" for "Global Tensor Trading"): the firm, however few words of its own its name
                # has (a two-word alias padded, "Orion AI Labs" for "Orion AI", is too little to go on)
                padded_org = small is nt and (qt - nt) <= generic and self._organisation(j) and len(small) >= 3
                if (len(small - generic) < 2 and not padded_org) or not small <= big or shortened_org:
                    tset[c] = 0
            score = np.maximum(np.maximum(sort, plain), tset * 0.98)  # a subset match counts a little less
            literal: frozenset[str] | None = None
            for c in np.flatnonzero(score >= threshold - 1e-9):
                j = cand[c]
                nt = self._tokens[j]
                # each has a generic word the other lacks: another kind of party ("... Bank" / "... Trading")
                if (qt - nt) & generic and (nt - qt) & generic:
                    continue
                if self._organisation(j):
                    # a short alias with an abbreviation matches as written: "Bright Semi", not "Bright
                    # Semiconductor" (the expansion is a word any semiconductor firm has) of "Shenzhen Bright
                    # Semiconductor" for "Kestrel Semi"), unless the query holds every word of the entry's name that
                    # says which firm it is ("Kestrel Semiconductor" of "Kestrel Semiconductor Manufacturing")
                    if j in self._abbr:
                        literal = literal_words(q) if literal is None else literal
                        if not self._abbr[j] <= literal and unmatched_words(
                                self._primary[self._owner[j]] - generic, qt, nq):
                            continue
                    # an organisation is named by all its words: one that the query lacks ("Orion
                    # Technologies" for "Orion AI Technologies", "North Star Manufacturing" for "North Star
                    # Electronics Manufacturing") makes it another organisation.  Words the query adds are not
                    # held against it: an evader appends a city or "Branch" to a listed name
                    if unmatched_words(nt, qt, nq, self._names[j]):
                        continue
                # a person is named by given and family name, part by part: not a common name one name away
                # ("Li Wei" for "Li Wei Dong", "Wang Xiaoping" for "Wang Xiaoming"; :mod:`.screen_people`)
                elif not person_agrees(nq, self._entry_names[i := self._owner[j]], complete=i in self._syllabic):
                    continue
                self._keep(best, j, float(score[c]), q, nq, {"token_sort": round(float(sort[c]), 1),
                           "token_set": round(float(tset[c]), 1), "ratio": round(float(plain[c]), 1)})  # fmt: skip
            # surname and initials: "M. A. Orlov" for "Mikhail Andreyevich Orlov", every initial a name's
            full, initials = [w for w in qt if len(w) > 1], sorted(w for w in nq.split() if len(w) == 1)
            if full and initials:
                for j in set.intersection(*(set(self._by_token.get(w, ())) for w in full)):
                    rest = self._tokens[j] - set(full)
                    if not self._organisation(j) and sorted(w[0] for w in rest) == initials:
                        self._keep(best, j, 90.0, q, nq, {"initials": " ".join(initials)})
            # a person whose names are spelt in another romanisation or language, or written with a title or a
            # note, that the string scores miss ("Jewgeni Morosow", "Serhiy Petrov", "Sheikh Mohammed Al-Rashidi"):
            # the listed people sharing two words' keys with the query, checked part by part
            if threshold <= PART_SCORE_HIT + 1e-9:
                near = self._people_near(nq)
                for i in near + [i for i in self._symbol_near(nq) if i not in near]:
                    if i not in best:
                        matched = person_match(nq, self._entry_names[i], complete=i in self._syllabic)
                        if matched is not None:
                            self._keep(best, self._at[i, matched], PART_SCORE_HIT, q, nq, {"part_by_part": True})
            # an alias together with words of the entry's other names: every word accounted for
            for t in qt:
                for i, at, j in self._combos.get(t, ()):
                    left = qt - at
                    if at <= qt and left and left <= self._words[i] and not left <= generic:
                        self._keep(best, j, 95.0, q, nq, {"alias_with_name": self._raw[j]})
        self._branches(best, dict(queries[::-1]), generic)
        hits = sorted(best.values(), key=lambda h: -h["score"])[:limit]
        for h in hits:
            cs = h["entry"]["countries"]
            if country and cs:
                h["explanation"]["country"] = ("listed for the entry" if country.upper() in cs
                                               else f"{country.upper()} not listed for the entry")  # fmt: skip
        return {"query": name, "aliases": list(aliases), "country": country, "threshold": threshold,
                "decision": "match" if hits else "clear", "hits": hits,
                "list": {"format": self.format, "sha256": self.sha256, "entries": len(self.entries),
                         "origin": self.origin}}  # fmt: skip

    def _branches(self, best: dict[int, dict[str, Any]], normalized: dict[str, str],
                  generic: frozenset[str]) -> None:  # fmt: skip
        """A listed organisation's name written whole, then a branch or office ("... FZE Dubai Branch", "... Riga
        Office": at most three words before a word of ``branch_words``), or a place after a comma ("... Ctr.,
        Khabarovsk": at most two words): the organisation, whatever the added words.  The name must be one of
        the entry's names exactly (normalised) and hold a word that is not generic."""
        branch = name_tables()[6]
        for q, nq in normalized.items():  # each name or alias and its normal form
            forms = []
            ws = nq.split()
            if len(ws) >= 2 and ws[-1] in branch:
                forms += [" ".join(ws[:k]) for k in range(max(1, len(ws) - 4), len(ws) - 1)]
            head, comma, tail = q.rpartition(",")
            if comma and head.strip() and 1 <= len(tail.split()) <= 2:
                forms.append(normalize(head))
            for f in forms:
                if len(f.split()) < 2 or not set(f.split()) - generic:
                    continue
                for j in self._by_name.get(f, ()):
                    if self._organisation(j):
                        self._keep(best, j, 90.0, q, f, {"branch_of": self._raw[j]})
            self._with_country(best, q, ws)

    def _with_country(self, best: dict[int, dict[str, Any]], q: str, ws: list[str]) -> None:
        """A listed name written whole with the name of a country the entry lists before or after it ("TACRC
        Iran", "China ZPI"): the entry, as the name alone is (and as "TACRC (Iran)", the country in brackets, is).
        Country names only (four letters or more), never a two- or three-letter code."""
        from ..errors import WardenError
        from .countries import resolve_country

        for k in range(1, min(4, len(ws) - 1) + 1):
            for head, tail in ((ws[:-k], ws[-k:]), (ws[k:], ws[:k])):
                f = " ".join(head)
                if f not in self._by_name or len("".join(tail)) < 4:
                    continue
                try:
                    code = resolve_country(" ".join(tail))
                except WardenError:
                    continue
                for j in self._by_name[f]:
                    if code in self.entries[self._owner[j]].countries:
                        self._keep(best, j, 90.0, q, f, {"with_country": " ".join(tail)})

    def _candidates(self, nq: str, qt: set[str], generic: frozenset[str], cut: float) -> Any:
        """The names that can score ``cut`` or more: plain and token-sort similarity is 2 * (longest common
        subsequence) / (both lengths), at most 2 * (letters in common) / (both lengths), which the names' letter
        counts give at once; a token-set match needs two non-generic words in common, so a name sharing none
        is out.  The same hits as scoring every name, from tens of names instead of thousands."""
        import numpy as np

        b = nq.encode("ascii", "replace")
        q = np.array([b.count(bytes([c])) for c in self._cols], dtype=np.int32)  # a letter 100,000 times
        common = np.minimum(self._bags, q).sum(axis=1)
        out = set(np.flatnonzero(200.0 * common >= cut * (self._lens + len(nq)) - 1e-6).tolist())
        for w in qt - generic:
            out.update(self._by_token.get(w, ()))
        return sorted(out)

    def _people_near(self, nq: str) -> list[int]:
        """The listed people (entry indexes) with a name sharing the keys (:func:`.screen_people.name_keys`) of two
        of the query's words (of three letters or more where it has two such words), most shared first."""
        words = [w for w in nq.split() if len(w) > 1]
        longer = [w for w in words if len(w) >= 3]
        words = longer if len(longer) >= 2 else words
        if len(words) < 2:
            return []
        count: dict[int, int] = {}
        for w in set(words):
            names = {j for key in name_keys(w) for j in self._by_key.get(key, ())}
            for j in names:
                count[j] = count.get(j, 0) + 1
        shared: dict[int, int] = {}
        for j, n in count.items():
            if n >= 2:
                i = self._owner[j]
                shared[i] = max(shared.get(i, 0), n)
        return sorted(shared, key=lambda i: -shared[i])[:MAX_PEOPLE_NEAR]

    def _symbol_near(self, nq: str) -> list[int]:
        """The people named in Han, Hangul or Kana (:func:`_syllabic_script`) with two parts of a name sharing a
        Wikidata name symbol (``rigour``) with two of a query of two to four syllable-long words: another
        reading of the same characters ("Chan Kin-kwok", Cantonese, for 陈建国 "Chen Jianguo"), which shares no
        spelling key.  The listed names' symbols are found on the first such query and kept."""
        words = [w for w in nq.split() if len(w) > 1]
        # each word one syllable (one run of vowels: "chan", "kwok", "siu"), not "sergei" or "petrov": rigour's
        # name symbols cost seconds the first time a process asks for them, so only such a query pays for them
        if (not self._syllabic or not 2 <= len(words) <= 4 or any(len(w) > 6 for w in words)
                or any(len(_VOWEL_RUNS.findall(w)) != 1 for w in words)):  # fmt: skip
            return []
        if self._by_symbol is None:
            self._by_symbol = {}
            for i in sorted(self._syllabic):
                for n in self._entry_names[i]:
                    for sym, _ in name_symbols(n):
                        self._by_symbol.setdefault(sym, set()).add(i)
        covered: dict[int, set[int]] = {}
        for sym, parts in name_symbols(nq):
            for i in self._by_symbol.get(sym, ()):
                covered.setdefault(i, set()).update(parts)
        return sorted((i for i, c in covered.items() if len(c) >= 2), key=lambda i: -len(covered[i]))[:MAX_PEOPLE_NEAR]

    def _organisation(self, j: int) -> bool:
        return self.entries[self._owner[j]].kind.lower() not in ("", "individual", "person")

    def _keep(self, best: dict[int, dict[str, Any]], j: int, s: float, q: str, nq: str,
              parts: dict[str, Any]) -> None:  # fmt: skip
        i = self._owner[j]
        if i in best and s <= best[i]["score"]:
            return
        e = self.entries[i]
        best[i] = {"score": round(s, 1), "entry": {"id": e.id, "name": e.name, "kind": e.kind,
                   "countries": list(e.countries), "source": e.source, "programs": list(e.programs)},
                   "matched_name": self._raw[j], "query": q,
                   "explanation": {"query_normalized": nq, "name_normalized": self._names[j], **parts}}  # fmt: skip


_VOWEL_RUNS = re.compile("[aeiouy]+")


def _syllabic_script(name: str) -> bool:
    return any(unicodedata.name(c, "").startswith(("CJK UNIFIED", "HANGUL", "HIRAGANA", "KATAKANA")) for c in name)


# -- the library calls `warden screen` makes (each an event of the home's trail) ------------------------
def screen(name: str, *, aliases: tuple[str, ...] = (), country: str | None = None,
           threshold: float = DEFAULT_THRESHOLD, file: str | os.PathLike[str] | None = None,
           home: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """Screen ``name`` against ``file`` or the list loaded under ``home`` (else the shipped sample);
    returns the result and whether the sample was used.  Logged with the decision and the list's digest."""
    from .. import trail
    from ..audit import AuditAction
    from ..home import default_home
    from .countries import resolve_country

    country = resolve_country(country) if country is not None else None  # an unknown country is refused
    lst = ScreeningList.load(file) if file is not None else ScreeningList.from_home(home or default_home())
    r = lst.screen(name, aliases=tuple(aliases), country=country, threshold=threshold)
    trail.record(AuditAction.RELEASE_SCREEN, home=home,
                 subject=name[:200], aliases=[a[:200] for a in aliases], country=country, decision=r["decision"],
                 threshold=threshold, hits=[h["entry"]["id"] for h in r["hits"]], list=r["list"],
                 sample=lst.is_sample)  # fmt: skip
    return r, lst.is_sample


def update_list(file: str | os.PathLike[str], home: str | os.PathLike[str] | None = None, *,
                now: Any = None) -> dict[str, Any]:  # fmt: skip
    """Load a new screening list into ``home`` (refused, with nothing replaced, unless it parses)."""
    from .. import trail
    from ..audit import AuditAction
    from ..home import default_home

    p = Path(file)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ScreeningError(f"cannot read the screening list {p} ({type(e).__name__}: {(e.strerror or e)}): "
                             "check the --file path") from None
    lst = ScreeningList.parse(data, p.name)  # refuses an unknown format before anything is replaced
    rec = save_list(home or default_home(), data, p.name, sha256=lst.sha256, format=lst.format,
                    entries=len(lst.entries), now=now)  # fmt: skip
    trail.record(AuditAction.RELEASE_SCREEN_LIST, home=home, subject=p.name, **rec)
    return rec
