"""Destinations refused or restricted in code, whatever the signed rule set says (issue 17, red-team
finding 1).  The shipped rules are signed by a key outside the repository, and their only country
groups belong to a rescinded regime, so this small table is the floor under every rule set:

- ``EMBARGOED`` (comprehensively sanctioned): the gate gives ``deny`` with reason
  ``destination:embargoed:<CC>``; neither a license record nor a two-person override covers it.
- ``RESTRICTED`` (broad export restrictions on the destination): ``needs-license`` with reason
  ``destination:restricted:<CC>``; a license record naming regime ``destination``, the model, the
  recipient and that country covers it; a two-person override does not.

The occupied regions of Ukraine and Georgia are not countries and the resolver refuses them before
the gate (``UnknownCountry``); they are listed so that a destination that ever carries one is denied.
Sources and the review date are in ``SOURCES`` and ``docs/EXPORT.md``; change ``VERSION`` with the table."""

from __future__ import annotations

__all__ = ["EMBARGOED", "RESTRICTED", "SOURCES", "VERSION", "destination_rule"]

VERSION = "2026-12-01.1"

SOURCES = {
    "US-EAR-746": "US EAR 15 CFR part 746 (embargoes and special controls: Cuba, Iran, North Korea, Syria, "
    "Crimea / Donetsk / Luhansk; Russia and Belarus 746.8)",
    "US-OFAC": "US OFAC comprehensive sanctions programmes (31 CFR parts 510, 515, 542, 560, 589 and EO 14065)",
    "EU-833/2014": "EU Council Regulation 833/2014 (Russia) and 765/2006 (Belarus), as amended",
    "UN-1718": "UN Security Council resolution 1718 (2006) and successors (DPRK)",
}

EMBARGOED: dict[str, tuple[str, ...]] = {
    "CU": ("US-EAR-746", "US-OFAC"),
    "IR": ("US-EAR-746", "US-OFAC"),
    "KP": ("US-EAR-746", "US-OFAC", "UN-1718"),
    "SY": ("US-EAR-746", "US-OFAC"),
    "UA-CRI": ("US-EAR-746", "US-OFAC"),  # Crimea (occupied; the resolver refuses it)
    "UA-DPR": ("US-EAR-746", "US-OFAC"),  # Donetsk (occupied)
    "UA-LPR": ("US-EAR-746", "US-OFAC"),  # Luhansk (occupied)
}

RESTRICTED: dict[str, tuple[str, ...]] = {
    "RU": ("US-EAR-746", "EU-833/2014"),
    "BY": ("US-EAR-746", "EU-833/2014"),
}


def destination_rule(country: str) -> tuple[str, str, str] | None:
    """``(code, outcome, text)`` for an embargoed or restricted ``country`` (alpha-2), else ``None``."""
    cc = country.upper()
    if cc in EMBARGOED:
        src = ", ".join(SOURCES[s].split(" (")[0] for s in EMBARGOED[cc])
        text = f"destination {cc} is embargoed ({src}; table {VERSION}): no license or override covers it"
        return (f"destination:embargoed:{cc}", "deny", text)
    if cc in RESTRICTED:
        src = ", ".join(SOURCES[s].split(" (")[0] for s in RESTRICTED[cc])
        return (f"destination:restricted:{cc}", "needs-license",
                f"destination {cc} is restricted ({src}; table {VERSION}): file a license for regime "
                "'destination' naming this model, recipient and country")  # fmt: skip
    return None
