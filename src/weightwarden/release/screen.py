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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .._extras import require
from ..errors import WardenError

__all__ = ["DEFAULT_THRESHOLD", "Entry", "ScreeningError", "ScreeningList", "normalize", "screen", "update_list"]

DEFAULT_THRESHOLD = 86.0
_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")
# a word spelled out with one punctuation mark between letters: "S.e.r.g.e.i", "T.A.C.R.C.", "N-o-v-a-t-e-k"
_DOTTED = re.compile(r"(?<![\w.\-·'/*])(?:[^\W_][.\-·'_/*]){2,}[^\W_](?:[.\-·'_/*](?=\s|,|$))?(?!\w)")
_APOS = re.compile(r"(?<=\w)['’ʼ`](?=\w)")  # Int'l, O'Neil: one word


class ScreeningError(WardenError):
    """A screening list is missing, empty or in a format this tool does not read."""


@lru_cache(maxsize=1)
def _tables() -> tuple[frozenset[str], frozenset[str], dict[str, str], list[tuple[tuple[str, ...], tuple[str, ...]]],
                       frozenset[str]]:  # fmt: skip
    from importlib import resources

    doc = json.loads(resources.files(__package__).joinpath("lists/abbreviations.json").read_text())
    phrases = sorted(((tuple(a), tuple(b)) for a, b in doc["phrases"]), key=lambda p: -len(p[0]))
    return (frozenset(doc["company_forms"]), frozenset(doc["stopwords"]), dict(doc["words"]), phrases,
            frozenset(doc["generic"]))


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
    transliteration."""
    out = []
    for w in s.split(" "):
        if w.isascii():
            out.append(w)
            continue
        mapped = [c if c.isascii() or not c.isalpha() else _ascii_char(c) for c in w]
        has_latin = any(c.isascii() and c.isalpha() for c in w)
        if has_latin or all(mapped):
            w = "".join(m or c for m, c in zip(mapped, w, strict=True))
        out.append(w)
    return " ".join(out)


def _canonical(tokens: list[str]) -> list[str]:
    forms, stop, words, phrases, _ = _tables()
    toks = [words.get(t, t) for t in tokens if t not in stop]
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


def _prepare(name: str) -> str:
    s = unicodedata.normalize("NFKC", name or "")
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


def _abbreviated(name: str) -> frozenset[str]:
    """The words of ``name`` (case folded, punctuation dropped) that the abbreviation table expands to
    another word ("semi" in "Bright Semi")."""
    ascii_text = require("rigour.text", "ascii_text", extra="release")

    words = _tables()[2]
    s = _SPACE.sub(" ", _PUNCT.sub(" ", ascii_text(_prepare(name)).lower())).strip()
    return frozenset(t for t in s.split() if words.get(t, t) != t)


def _literal_words(name: str) -> frozenset[str]:
    ascii_text = require("rigour.text", "ascii_text", extra="release")

    return frozenset(_SPACE.sub(" ", _PUNCT.sub(" ", ascii_text(_prepare(name)).lower())).split())


def _unmatched(words: frozenset[str] | set[str], other: frozenset[str] | set[str], joined: str) -> set[str]:
    """The ``words`` with no counterpart in ``other``: not there, not spelled closely (ratio 80), not cut short
    ("Comp." for "Components"), not written joined ("micro systems" / "microsystems")."""
    fuzz = require("rapidfuzz", "fuzz", extra="release")

    flat = joined.replace(" ", "")
    return {w for w in words if w not in other and not (len(w) >= 4 and w in flat)
            and not any(fuzz.ratio(w, o) >= 80 or (len(o) >= 3 and w.startswith(o)) for o in other)}  # fmt: skip


def _marks_sample(e: Entry) -> bool:
    """An entry the shipped sample marks as fictitious: programme ``SAMPLE``, id ``sample-...``, or a source
    naming the sample list or fictitious parties."""
    src = e.source.casefold()
    return (any(p.strip().casefold() == "sample" for p in e.programs) or e.id.strip().casefold().startswith("sample-")
            or "fictitious" in src or "sample list" in src)  # fmt: skip


@lru_cache(maxsize=1)
def _sample_pairs() -> frozenset[tuple[str, str]]:
    from importlib import resources

    data = resources.files(__package__).joinpath("lists/sample_csl.json").read_bytes()
    return frozenset((e.id.strip().casefold(), normalize(e.name)) for e in _csl_json(data.decode("utf-8")))


def _is_sample(entries: list[Entry]) -> bool:
    """Whether a list is (or holds) the shipped fictitious sample, by content, not bytes (issue 17 red team: a
    BOM, CRLF or re-serialised JSON changed the digest): any entry marked as the sample, or the sample's
    canonical set of (id, name) pairs."""
    if any(_marks_sample(e) for e in entries):
        return True
    return _sample_pairs() <= {(e.id.strip().casefold(), normalize(e.name)) for e in entries}


@dataclass(frozen=True)
class Entry:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    kind: str = ""
    countries: tuple[str, ...] = ()
    source: str = ""
    programs: tuple[str, ...] = ()


@dataclass
class ScreeningList:
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
    _by_token: dict[str, list[int]] = field(default_factory=dict)
    _abbr: dict[int, frozenset[str]] = field(default_factory=dict)
    _cols: list[int] = field(default_factory=list)
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
                        abbr = _abbreviated(n) if org and tokens < frozenset(primary.split()) else frozenset()
                        if abbr:
                            self._abbr[len(self._names)] = abbr
                    for w in tokens:
                        self._by_token.setdefault(w, []).append(len(self._names))
                    self._names.append(k)
                    self._tokens.append(tokens)
                    self._owner.append(i)
                    self._raw.append(n)
            self._words.append(frozenset(words))
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
            raise ScreeningError(f"cannot read the screening list ({type(e).__name__})") from None
        return cls.parse(data, p.name)

    @classmethod
    def parse(cls, data: bytes, origin: str = "") -> ScreeningList:
        lst = cls._parse(data, origin)
        lst.is_sample = _is_sample(lst.entries)  # the fictitious sample, however it was loaded or re-serialised
        return lst

    @classmethod
    def _parse(cls, data: bytes, origin: str = "") -> ScreeningList:
        digest = hashlib.sha256(data).hexdigest()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ScreeningError("the screening list is not UTF-8") from None
        head = text.lstrip()[:1]
        first = text.splitlines()[0].lower() if text.strip() else ""
        try:
            if head == "{" and '"schema"' in text[:2000] and '"properties"' in text[:4000]:
                return cls(_ftm(text), "opensanctions-ftm", digest, origin)
            if head in ("{", "["):
                return cls(_csl_json(text), "csl-json", digest, origin)
            if "name" in first and "source" in first:
                return cls(_csl_csv(text), "csl-csv", digest, origin)
        except (TypeError, AttributeError, ValueError, csv.Error) as e:  # a hostile field of the wrong type
            raise ScreeningError(f"the screening list is malformed ({type(e).__name__})") from None
        raise ScreeningError("unknown screening-list format (expected CSL JSON or CSV, or OpenSanctions FtM)")

    @classmethod
    def from_home(cls, home: str | os.PathLike[str]) -> ScreeningList:
        """The list loaded by `warden screen update` under ``home``, else the shipped (fictitious) sample;
        ``is_sample`` tells which."""
        from importlib import resources

        store = Path(home) / "screening"
        if (store / "list.dat").exists():
            meta = json.loads((store / "list.json").read_text())
            return cls.parse((store / "list.dat").read_bytes(), meta.get("origin", ""))
        with resources.as_file(resources.files(__package__).joinpath("lists/sample_csl.json")) as p:
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
        for q in (name, *aliases):
            nq = normalize(q)
            if nq:
                queries.append((q, nq))
                short = " ".join(t for t in nq.split() if len(t) > 1)  # initials dropped: "S. I. Petrov"
                if short and short != nq:
                    queries.append((q, short))
        generic = _tables()[4]
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
                if len(small - generic) < 2 or not small <= big or shortened_org:
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
                    # Semiconductor" (the expansion is a word any semiconductor firm has)
                    if j in self._abbr:
                        literal = _literal_words(q) if literal is None else literal
                        if not self._abbr[j] <= literal:
                            continue
                    # an organisation is named by all its words: one that the query lacks ("Orion
                    # Technologies" for "Orion AI Technologies", "North Star Manufacturing" for "North Star
                    # Electronics Manufacturing") makes it another organisation.  Words the query adds are not
                    # held against it: an evader appends a city or "Branch" to a listed name
                    if _unmatched(nt, qt, nq):
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
            # an alias together with words of the entry's other names: every word accounted for
            for t in qt:
                for i, at, j in self._combos.get(t, ()):
                    rest = qt - at
                    if at <= qt and rest and rest <= self._words[i] and not rest <= generic:
                        self._keep(best, j, 95.0, q, nq, {"alias_with_name": self._raw[j]})
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


    def _candidates(self, nq: str, qt: set[str], generic: frozenset[str], cut: float) -> Any:
        """The names that can score ``cut`` or more: plain and token-sort similarity is 2 * (longest common
        subsequence) / (both lengths), at most 2 * (letters in common) / (both lengths), which the names' letter
        counts give at once; a token-set match needs two non-generic words in common, so a name sharing none
        is out.  The same hits as scoring every name, from tens of names instead of thousands."""
        import numpy as np

        b = nq.encode("ascii", "replace")
        q = np.array([b.count(bytes([c])) for c in self._cols], dtype=np.int16)
        common = np.minimum(self._bags, q).sum(axis=1)
        out = set(np.flatnonzero(200.0 * common >= cut * (self._lens + len(nq)) - 1e-6).tolist())
        for w in qt - generic:
            out.update(self._by_token.get(w, ()))
        return sorted(out)

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


def _csl_json(text: str) -> list[Entry]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise ScreeningError("the screening list is not valid JSON") from None
    rows = doc.get("results", doc) if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ScreeningError("a CSL JSON list holds its entries under 'results'")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise ScreeningError(f"CSL entry {i} has no name")
        alts = r.get("alt_names") or []
        if isinstance(alts, str):
            alts = [a.strip() for a in alts.split(";")]
        countries = tuple(sorted({str(a.get("country", "")).upper() for a in r.get("addresses") or []
                                  if isinstance(a, dict) and a.get("country")}))  # fmt: skip
        progs = r.get("programs") or []
        out.append(Entry(str(r.get("id", i)), r["name"], tuple(str(a) for a in alts if a), str(r.get("type", "")),
                         countries, str(r.get("source", "")), tuple(str(p) for p in progs)))  # fmt: skip
    return out


def _csl_csv(text: str) -> list[Entry]:
    out = []
    for i, r in enumerate(csv.DictReader(io.StringIO(text))):
        if not r.get("name"):
            raise ScreeningError(f"CSL row {i} has no name")
        alts = tuple(a.strip() for a in (r.get("alt_names") or "").split(";") if a.strip())
        countries = tuple(sorted({c.strip().upper() for c in re.findall(r",\s*([A-Z]{2})\s*(?:;|$)",
                                                                          r.get("addresses") or "")}))  # fmt: skip
        out.append(Entry(r.get("_id") or r.get("id") or str(i), r["name"], alts, r.get("type", ""), countries,
                         r.get("source", ""), tuple(p.strip() for p in (r.get("programs") or "").split(";")
                                                    if p.strip())))  # fmt: skip
    return out


def _ftm(text: str) -> list[Entry]:
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            props = r["properties"]
            names = [str(n) for n in props.get("name", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ScreeningError(f"FtM line {i + 1} is not an entity") from None
        if r.get("schema") not in ("Person", "Company", "Organization", "LegalEntity") or not names:
            continue
        aliases = names[1:] + [str(a) for a in props.get("alias", []) + props.get("previousName", [])]
        out.append(Entry(str(r.get("id", i)), names[0], tuple(aliases), r["schema"],
                         tuple(sorted({str(c).upper() for c in props.get("country", [])})),
                         ",".join(r.get("datasets", [])), tuple(str(t) for t in props.get("topics", []))))  # fmt: skip
    return out


# -- the library calls `warden screen` makes (each an event of the home's trail) ------------------------
def screen(name: str, *, aliases: tuple[str, ...] = (), country: str | None = None,
           threshold: float = DEFAULT_THRESHOLD, file: str | os.PathLike[str] | None = None,
           home: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """Screen ``name`` against ``file`` or the list loaded under ``home`` (else the shipped sample);
    returns the result and whether the sample was used.  Logged with the decision and the list's digest."""
    from .. import trail
    from ..audit import AuditAction
    from ..keys.local import default_home
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
    import datetime as _dt

    from .. import trail
    from .._atomic import atomic_write_bytes
    from ..audit import AuditAction
    from ..keys.local import default_home

    p = Path(file)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ScreeningError(f"cannot read the screening list {p.name} ({type(e).__name__})") from None
    lst = ScreeningList.parse(data, p.name)  # refuses an unknown format before anything is replaced
    store = Path(home or default_home()) / "screening"
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(store / "list.dat", data, force=True)
    rec = {"origin": p.name, "sha256": lst.sha256, "format": lst.format, "entries": len(lst.entries),
           "loaded": (now or _dt.datetime.now(_dt.UTC)).isoformat(timespec="seconds")}  # fmt: skip
    atomic_write_bytes(store / "list.json", json.dumps(rec).encode(), force=True)
    trail.record(AuditAction.RELEASE_SCREEN_LIST, home=home, subject=p.name, **rec)
    return rec
