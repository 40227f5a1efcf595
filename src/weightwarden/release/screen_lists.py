"""Screening lists: their entries, the formats read (US CSL as JSON or CSV, OpenSanctions FtM JSON lines),
the shipped fictitious sample and how it is recognised, and the list stored under a home."""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .screen_names import ScreeningError, normalize

__all__ = ["Entry", "is_sample", "parse_entries", "sample_path", "save_list", "stored_list"]


@dataclass(frozen=True)
class Entry:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    kind: str = ""
    countries: tuple[str, ...] = ()
    source: str = ""
    programs: tuple[str, ...] = ()


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


def is_sample(entries: list[Entry]) -> bool:
    """Whether a list is (or holds) the shipped fictitious sample, by content, not bytes (issue 17 red team: a
    BOM, CRLF or re-serialised JSON changed the digest): any entry marked as the sample, or the sample's
    canonical set of (id, name) pairs."""
    if any(_marks_sample(e) for e in entries):
        return True
    return _sample_pairs() <= {(e.id.strip().casefold(), normalize(e.name)) for e in entries}



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


def parse_entries(data: bytes) -> tuple[list[Entry], str, str]:
    """The entries of a screening list's bytes, its format and its SHA-256 (the format told by content)."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ScreeningError("the screening list is not UTF-8") from None
    head = text.lstrip()[:1]
    first = text.splitlines()[0].lower() if text.strip() else ""
    try:
        if head == "{" and '"schema"' in text[:2000] and '"properties"' in text[:4000]:
            return _ftm(text), "opensanctions-ftm", digest
        if head in ("{", "["):
            return _csl_json(text), "csl-json", digest
        if "name" in first and "source" in first:
            return _csl_csv(text), "csl-csv", digest
    except (TypeError, AttributeError, ValueError, csv.Error) as e:  # a hostile field of the wrong type
        raise ScreeningError(f"the screening list is malformed ({type(e).__name__})") from None
    raise ScreeningError("unknown screening-list format (expected CSL JSON or CSV, or OpenSanctions FtM)")


def sample_path() -> Any:
    """The shipped (fictitious) sample list, as an importlib resource (``resources.as_file`` gives a path)."""
    from importlib import resources

    return resources.files(__package__).joinpath("lists/sample_csl.json")


def stored_list(home: str | os.PathLike[str]) -> tuple[bytes, str] | None:
    """The list `warden screen update` loaded under ``home`` (its bytes and origin); None if there is none."""
    store = Path(home) / "screening"
    if not (store / "list.dat").exists():
        return None
    meta = json.loads((store / "list.json").read_text())
    return (store / "list.dat").read_bytes(), meta.get("origin", "")


def save_list(home: str | os.PathLike[str], data: bytes, origin: str, *, sha256: str, format: str, entries: int,
              now: Any = None) -> dict[str, Any]:  # fmt: skip
    """Store a parsed list's bytes and record under ``home`` (each file replaced atomically); the record."""
    from .._atomic import atomic_write_bytes

    store = Path(home) / "screening"
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(store / "list.dat", data, force=True)
    rec = {"origin": origin, "sha256": sha256, "format": format, "entries": entries,
           "loaded": (now or _dt.datetime.now(_dt.UTC)).isoformat(timespec="seconds")}  # fmt: skip
    atomic_write_bytes(store / "list.json", json.dumps(rec).encode(), force=True)
    return rec
