"""Destination countries are ISO 3166 (issue 17): an alpha-2 code is checked against the list of
countries, an alpha-3 code or an English name is mapped to its alpha-2 code, and anything else is
refused with :class:`~.gate.UnknownCountry` naming the input, never treated as a country outside
every list.  The table is rigour's (``rigour.territories``: ISO 3166-1 with Wikidata names); a
territory that no longer exists (SU, DD, YU) or is not a country (EU, ZZ, a city) is refused."""

from __future__ import annotations

from .._extras import require

__all__ = ["country_name", "resolve_country"]


def _unknown(text: str, flag: str, why: str) -> Exception:
    from .gate import UnknownCountry

    shown = ascii(text)[1:-1][:40]
    return UnknownCountry(f"{flag} {shown!r}: {why}; give an ISO 3166 alpha-2 code (DE), an alpha-3 code (DEU) "
                          "or an English country name (Germany)")  # fmt: skip


def resolve_country(text: str, *, flag: str = "--country") -> str:
    """The ISO 3166-1 alpha-2 code (upper case) of ``text``: a code of two or three letters, or a name."""
    get_territory, lookup_by_identifier, lookup_territory = require(
        "rigour.territories", "get_territory", "lookup_by_identifier", "lookup_territory", extra="release"
    )

    s = " ".join(str(text or "").split())
    if not s or len(s) > 64 or not all(c.isalpha() or c in " .'-()," for c in s):
        raise _unknown(s, flag, "not a country code or name")
    if len(s) == 2 and s.isalpha():
        t = get_territory(s.lower()) or lookup_territory(s)  # UK: reserved by ISO 3166 for GB
    elif len(s) == 3 and s.isalpha():
        t = lookup_by_identifier(s)
        if t is not None and (t.alpha3 or "").lower() != s.lower():
            t = None
    else:
        t = lookup_territory(s)
        # a city or place inside a country ("Tehran") is not the country
        if t is not None and s.casefold() in {p.casefold() for p in t.places}:
            t = None
        # a name that is part of two countries' names ("Korea", "Congo") is not one of them
        if t is not None and s.casefold() != t.name.casefold() and len(_named(s)) > 1:
            raise _unknown(s, flag, f"ambiguous ({', '.join(sorted(_named(s)))})")
    if t is None:
        raise _unknown(s, flag, "not an ISO 3166 country")
    if t.is_historical or len(t.code) != 2 or not (t.is_country or t.code.upper() in _ASSIGNED):
        raise _unknown(s, flag, f"{t.name} is not a current country")
    return t.code.upper()


# ISO 3166-1 officially assigned codes that rigour does not count as countries (HK, MO, PS, dependent
# territories); exceptionally reserved codes (AC, CP, DG, EU, ...) stay refused
_ASSIGNED = frozenset({"AQ", "AS", "BL", "BQ", "BV", "GF", "GP", "GU", "HK", "HM", "MF", "MO", "MP", "MQ", "NC",
                       "PF", "PM", "PR", "PS", "RE", "SJ", "TF", "TK", "UM", "VI", "YT"})  # fmt: skip


def _named(word: str) -> set[str]:
    import re

    get_territories = require("rigour.territories", "get_territories", extra="release")

    pat = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return {t.code.upper() for t in get_territories() if t.is_country and not t.is_historical and len(t.code) == 2
            and (pat.search(t.name) or pat.search(t.full_name))}  # fmt: skip


def country_name(code: str) -> str:
    get_territory = require("rigour.territories", "get_territory", extra="release")

    t = get_territory(code.lower())
    return t.name if t is not None else code
