"""The other readings of a name screened (issue 17, rounds 4 and 5): the ways evaders and clerks write a listed
name that the string scores miss, each turned back into a name the matcher compares.  Every reading is screened
like the name itself, with every check (``ScreeningList.screen``); a reading never lowers what the name found.

* fragments joined into a listed word ("Ser gei Pet rov"), words of listed firms written together set apart
  ("BrightSemi"), notes in brackets taken out, an Arabic article written together with its name set apart;
* a firm's word one slip from exactly one listed or table word read as it ("Artifical", "Shenzen"), "rn"
  scanned as "m" the other way round ("Eastem"), a Russian adjective of a listed place read as the place;
* a firm's Chinese name in Wade-Giles, its syllables joined by key ("Chung-hsing" for Zhongxing).

:class:`Readings` is mixed into :class:`~.screen.ScreeningList` and uses its index.
"""

from __future__ import annotations

import re

from .._extras import require
from .screen_names import joined_parts, name_tables, normalize
from .screen_people import SLIP_LEN, sino

__all__ = ["JOINED_MIN", "MAX_FRAGMENTS", "Readings"]

JOINED_MIN = 5  # letters of fragments joined into a listed word, at least (shorter ones are common words)
MAX_FRAGMENTS = 200  # fragments of one name tried for joining (a longer name is screened as written)


class Readings:
    """The readings that need the list's index (mixed into ``ScreeningList``, whose fields these are)."""

    _by_token: dict[str, list[int]]
    _org_words: set[str]
    _org_vocab: set[str]
    _sino_org: dict[str, set[str]]
    _slip: tuple[list[str], frozenset[str]] | None

    def _respelled(self, nq: str) -> str | None:
        """``nq`` with each word of :data:`SLIP_LEN` letters or more that no listed name has, and that is one slip
        (a letter swapped with its neighbour, changed, dropped or added) from exactly one word of an
        organisation's listed names or of the abbreviation table, read as that word; None when none is."""
        process, osa = require("rapidfuzz", "process", extra="release"), require("rapidfuzz.distance", "OSA",
                                                                                 extra="release")  # fmt: skip
        vocab = self._slip_vocab()
        out, changed = [], False
        for w in nq.split():
            if w not in self._by_token and (city := self._city(w)) is not None:  # "minsky" for Minsk
                out.append(city)
                changed = True
                continue
            if len(w) >= SLIP_LEN - 1 and w not in self._by_token and w not in vocab[1] and "m" in w:
                # "rn" scanned as "m" the other way round: "Eastem" for "Eastern"
                rn = [f for k in range(len(w)) if w[k] == "m" and (f := w[:k] + "rn" + w[k + 1:]) in vocab[1]]
                if len(rn) == 1:
                    out.append(rn[0])
                    changed = True
                    continue
            if len(w) >= SLIP_LEN and w not in self._by_token and w not in vocab[1]:
                near = process.extract(w, vocab[0], scorer=osa.distance, score_cutoff=1, limit=2)
                if not near and w[0] == "l":  # an "l" scanned for an "I" and a slip besides ("lnfomatics")
                    near = [n for n in process.extract("i" + w[1:], vocab[0], scorer=osa.distance, score_cutoff=1,
                                                       limit=2) if n[0][0] == "i"]  # fmt: skip
                # the first letter kept, or an "l" scanned for an "I" ("lnstruments")
                if len(near) == 1 and (near[0][0][0] == w[0] or {near[0][0][0], w[0]} == {"i", "l"}):
                    out.append(near[0][0])
                    changed = True
                    continue
            out.append(w)
        return normalize(" ".join(out)) if changed else None

    def _city(self, w: str) -> str | None:
        """A Russian adjective of a place an organisation's listed name holds, as that place: "minsky" (Минский)
        for "minsk", "rostovskie" (Ростовские) for "rostov"; None when ``w`` is not one."""
        for end in _ADJECTIVE_ENDS:
            if w.endswith(end) and len(w) >= len(end) + 3:
                stem = w[: -len(end)]
                return next((c for c in (stem, stem + "sk") if c in self._org_words), None)
        return None

    def _syllables_joined(self, nq: str) -> str | None:
        """``nq`` with two or three short neighbouring words that together are, syllable by syllable
        (:func:`~.screen_people.sino`), one word of an organisation's listed name, written as that word."""
        toks = nq.split()
        out, i, changed = [], 0, False
        while i < len(toks):
            for n in (3, 2):
                part = toks[i:i + n]
                # at least one syllable that pinyin does not spell ("hsing", "chung", "tien"): romanised otherwise.
                # Syllables all in pinyin are read as written ("Chong Xing" is not "Zhongxing")
                if len(part) == n and all(len(t) <= 6 and t.isalpha() for t in part) and not all(
                        _PINYIN.match(t) for t in part):  # fmt: skip
                    found = self._sino_org.get("".join(sino(t) for t in part), set())
                    if len(found) == 1:
                        out.append(next(iter(found)))
                        i, changed = i + n, True
                        break
            else:
                out.append(toks[i])
                i += 1
        return " ".join(out) if changed else None

    def _slip_vocab(self) -> tuple[list[str], frozenset[str]]:
        if self._slip is None:
            forms, _, words, phrases = name_tables()[:4]
            table = {w for w in (*words, *words.values(), *(x for a, _ in phrases for x in a)) if len(w) >= SLIP_LEN}
            every = self._org_vocab | table
            self._slip = (sorted(every), frozenset(every | forms))
        return self._slip

    def _split_apart(self, name: str, aliases: tuple[str, ...]) -> list[str]:
        """Each name with a word that is two words of organisations' listed names written together ("BrightSemi"
        for "Bright Semi", "NovatekMicrosystems") written apart, where exactly one split makes two such words
        (an abbreviation of the table counts as its word); [] when none is."""
        words_table = name_tables()[2]
        known = self._org_words | set(words_table)
        out = []
        for q in (name, *aliases):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in q):
                continue
            parts: list[str] = []
            changed = False
            for w in joined_parts(q):
                if len(w) >= 6 and w not in self._by_token:
                    splits = [(w[:k], w[k:]) for k in range(3, len(w) - 2) if w[:k] in known and w[k:] in known]
                    if len(splits) == 1:
                        parts.extend(splits[0])
                        changed = True
                        continue
                parts.append(w)
            if changed:
                out.append(" ".join(parts))
        return out

    def _rejoined(self, name: str, aliases: tuple[str, ...]) -> list[str]:
        """Each name split apart at random places ("Ser gei Pet rov", "S e r g e i  P e t r o v", "Shenzhen Bri ght
        Semiconductor") written again with its fragments joined wherever the joined letters make a word of the
        list: the evader's spaces are undone, and the joined name is screened like any other (every check
        applies to it)."""
        out = []
        for q in (name, *aliases):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in q):  # not text: screen() says so, in one line
                continue
            parts = joined_parts(q)
            if len(parts) < 2 or len(parts) > MAX_FRAGMENTS:
                continue
            words, i = [], 0
            while i < len(parts):
                for j in range(min(len(parts), i + 16), i + 1, -1):  # the longest run that joins into a word
                    w = "".join(parts[i:j])
                    if len(w) >= JOINED_MIN and w in self._by_token:
                        words.append(w)
                        i = j
                        break
                else:
                    words.append(parts[i])
                    i += 1
            if len(words) < len(parts):
                out.append(" ".join(words))
        return out


# a syllable as pinyin may spell it (initial, then final): a loose check, enough to tell Wade-Giles from pinyin
_PINYIN = re.compile(r"(?:zh|ch|sh|[bpmfdtnlgkhjqxrzcsyw])?(?:iang|iong|uang|ueng|ang|eng|ong|ian|iao|uai|uan|ai|ei"
                     r"|ao|ou|an|en|er|ia|ie|iu|ing|in|ua|uo|ui|un|ue|a|o|e|i|u|v)$")
_ADJECTIVE_ENDS = ("skogo", "skaya", "skoye", "skie", "skii", "skiy", "skoe", "skoi", "sky", "ski")
_JOINED_ARTICLE = re.compile(r"\b(al|el)([a-z]{5,})\b")


def _article_apart(nq: str) -> str | None:
    """``nq`` with an Arabic article written together with the name it belongs to set apart ("alrashidi": "al
    rashidi"), a name of two words or more; None when there is none."""
    if " " not in nq or not _JOINED_ARTICLE.search(nq):
        return None
    return _JOINED_ARTICLE.sub(r"\1 \2", nq)


_NOTE = re.compile(r"\s*[(\[][^()\[\]]*[)\]]")


def _without_notes(name: str, aliases: tuple[str, ...]) -> list[str]:
    """The names with a note in brackets taken out ("Amur Research Centre (Khabarovsk)", "... [Branch 2]"): the
    name an evader or a clerk annotated, screened as the listed name it is."""
    out = []
    for n in (name, *aliases):
        if "(" in n or "[" in n:
            bare = _NOTE.sub(" ", n).strip()
            if bare and bare != n:
                out.append(bare)
    return out
