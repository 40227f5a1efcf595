"""Export-control rules as data: signed TOML files of regimes (thresholds, dates, country groups,
outcomes), evaluated at a date.

A rules file MUST carry ``format = 1``, a ``version`` and ``[[regime]]`` tables; each regime MUST
have a unique ``id``, a ``metric`` (``training_compute``, ``total_params`` or ``active_params``), a
positive ``threshold``, an ``effective`` date and an ``outcome``; it MAY have a ``rescinded``
date, ``published_exempt``, ``country_groups`` and ``country_outcomes``.  Two regimes of one
jurisdiction on one metric MUST NOT be in force at the same time (overlap is refused).  Every
file is verified before use: a detached Ed25519 signature (``<file>.sig``, hex) by a trusted key of
purpose ``export-rules`` over its exact bytes under that purpose's label (``purpose_message``,
docs/FORMAT.md §1.4; :func:`sign_rules` writes one).  A signature made by a key of another purpose
(a sealing key, an audit-log key) is refused with :class:`RulesKeyPurposeError`.  The shipped rules
predate purpose labels: their unlabelled signature is accepted from the shipped rules key only, whose
purpose is pinned here.  Anything else fails closed with :class:`RulesError`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import KeyPurposeError, WardenError

__all__ = ["OUTCOMES", "SHIPPED_RULES_KEY", "Regime", "RuleSet", "RulesError", "RulesKeyPurposeError",
           "default_rules", "load_rules", "sign_rules"]  # fmt: skip

# The public half of the key that signs the shipped rules (its private half is not in this repository).
SHIPPED_RULES_KEY = bytes.fromhex("bbdc7b621b3a9e5b05e2cce35c7fe841456d8e51372c9123011fd7fa87db06fb")
OUTCOMES = ("allowed", "notify", "needs-review", "license-required", "presumption-of-denial")
METRICS = ("training_compute", "total_params", "active_params")
PURPOSE = "export-rules"


class RulesError(WardenError):
    """A rules file is unsigned, signed by an untrusted key, malformed, or has overlapping regimes."""


class RulesKeyPurposeError(KeyPurposeError, RulesError):
    """A rules file is signed by a key of another purpose than ``export-rules`` (e.g. a sealing key)."""


@dataclass(frozen=True)
class Regime:
    id: str
    name: str
    jurisdiction: str
    source: str
    metric: str
    threshold: float
    effective: date
    outcome: str
    rescinded: date | None = None
    published_exempt: bool = False
    country_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    country_outcomes: dict[str, str] = field(default_factory=dict)

    def in_force(self, when: date) -> bool:
        return self.effective <= when and (self.rescinded is None or when < self.rescinded)


@dataclass(frozen=True)
class RuleSet:
    version: str
    regimes: tuple[Regime, ...]
    signed_by: str
    sha256: str = ""  # of the file's bytes: one version, one file (issue 17)

    def evaluate(self, *, total_params: int, active_params: int, compute: Any, published: bool, as_of: date,
                 country: str | None) -> list[dict[str, Any]]:  # fmt: skip
        """One outcome per regime, each with its reasons."""
        out = []
        for r in self.regimes:
            row: dict[str, Any] = {"regime": r.id, "name": r.name, "jurisdiction": r.jurisdiction, "source": r.source}
            value = {"total_params": total_params, "active_params": active_params,
                     "training_compute": compute.flop if compute else None}[r.metric]  # fmt: skip
            if not r.in_force(as_of):
                row |= {"outcome": "allowed", "in_force": False,
                        "reasons": [f"not in force on {as_of} (effective {r.effective}"
                                    + (f", rescinded {r.rescinded})" if r.rescinded else ")")]}  # fmt: skip
            elif published and r.published_exempt:
                row |= {"outcome": "allowed", "in_force": True, "reasons": ["published weights are exempt"]}
            elif value is None:
                row |= {"outcome": "needs-review", "in_force": True,
                        "reasons": [f"{r.metric} unknown: declare compute, tokens or hardware"]}  # fmt: skip
            elif r.metric == "training_compute" and compute.method == "upper-bound" and value >= r.threshold:
                row |= {"outcome": "needs-review", "in_force": True,
                        "reasons": [f"training compute not declared; with {compute.basis['active_params']:.3g} active "
                                    f"parameters it could reach {compute.high:.2e} >= {r.threshold:.0e}: "
                                    "declare compute, tokens or hardware"]}  # fmt: skip
            elif r.metric == "training_compute" and compute.low < r.threshold <= compute.high:
                row |= {"outcome": "needs-review", "in_force": True,
                        "reasons": [f"the estimate {compute.flop:.2e} ({compute.method}, {compute.low:.2e}..."
                                    f"{compute.high:.2e}) straddles the threshold {r.threshold:.0e}"]}  # fmt: skip
            elif value >= r.threshold:
                outcome, why = r.outcome, f"{r.metric} {value:.3g} >= {r.threshold:.0e}"
                for g, members in r.country_groups.items():
                    if country and country.upper() in members and g in r.country_outcomes:
                        outcome, why = r.country_outcomes[g], why + f"; destination {country.upper()} is in {g}"
                row |= {"outcome": outcome, "in_force": True, "reasons": [why]}
            else:
                upper = r.metric == "training_compute" and compute.method == "upper-bound"
                bound = " (upper bound: 6·N·10^15 tokens)" if upper else ""
                row |= {"outcome": "allowed", "in_force": True,
                        "reasons": [f"{r.metric} {value:.3g}{bound} < {r.threshold:.0e}"]}  # fmt: skip
            out.append(row)
        return out


def _date(v: Any, what: str) -> date:
    if isinstance(v, date):
        return v
    try:
        return date.fromisoformat(str(v))
    except ValueError:
        raise RulesError(f"{what} is not a date") from None


def parse_rules(data: bytes, signed_by: str = "") -> RuleSet:
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise RulesError(f"rules file is not TOML ({type(e).__name__})") from None
    if doc.get("format") != 1 or not isinstance(doc.get("version"), str):
        raise RulesError("rules file needs format = 1 and a version")
    regimes = []
    for i, r in enumerate(doc.get("regime", [])):
        try:
            reg = Regime(
                id=str(r["id"]), name=str(r.get("name", r["id"])), jurisdiction=str(r["jurisdiction"]),
                source=str(r.get("source", "")), metric=str(r["metric"]), threshold=float(r["threshold"]),
                effective=_date(r["effective"], f"regime {i} effective"), outcome=str(r["outcome"]),
                rescinded=_date(r["rescinded"], f"regime {i} rescinded") if "rescinded" in r else None,
                published_exempt=bool(r.get("published_exempt", False)),
                country_groups={str(k): tuple(str(c).upper() for c in v)
                                for k, v in dict(r.get("country_groups", {})).items()},
                country_outcomes={str(k): str(v) for k, v in dict(r.get("country_outcomes", {})).items()},
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise RulesError(f"regime {i} is malformed ({type(e).__name__}: {str(e)[:60]})") from None
        if reg.metric not in METRICS or reg.threshold <= 0:
            raise RulesError(f"regime {reg.id}: metric must be one of {METRICS} with a positive threshold")
        if reg.outcome not in OUTCOMES or any(o not in OUTCOMES for o in reg.country_outcomes.values()):
            raise RulesError(f"regime {reg.id}: outcomes must be among {OUTCOMES}")
        if reg.rescinded is not None and reg.rescinded <= reg.effective:
            raise RulesError(f"regime {reg.id}: rescinded before it took effect")
        regimes.append(reg)
    ids = [r.id for r in regimes]
    if len(set(ids)) != len(ids):
        raise RulesError("two regimes share an id")
    for a in regimes:
        for b in regimes:
            if a is not b and (a.jurisdiction, a.metric) == (b.jurisdiction, b.metric):
                a_end, b_end = a.rescinded or date.max, b.rescinded or date.max
                if a.effective < b_end and b.effective < a_end:
                    raise RulesError(f"regimes {a.id} and {b.id} overlap (one jurisdiction, one metric, same time)")
    import hashlib

    return RuleSet(doc["version"], tuple(regimes), signed_by, hashlib.sha256(data).hexdigest())


def load_rules(path: str | os.PathLike[str], trusted: list[bytes] | None = None) -> RuleSet:
    """Read ``path`` and its ``.sig``; the signature must verify under one of ``trusted`` (default: the
    shipped rules key)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ..keys.provider import ed25519_key_id, verify_purpose

    try:
        data = open(path, "rb").read()
        sig = bytes.fromhex(open(f"{os.fspath(path)}.sig").read().strip())
    except FileNotFoundError as e:
        raise RulesError(f"{os.path.basename(e.filename or '')} is missing: rules must be signed") from None
    except ValueError:
        raise RulesError("the rules signature is not hex") from None
    for key in trusted or [SHIPPED_RULES_KEY]:
        try:
            verify_purpose(key, PURPOSE, data, sig, what="the rules signature", purpose_error=RulesKeyPurposeError)
        except RulesKeyPurposeError:
            raise
        except WardenError:
            if bytes(key) != SHIPPED_RULES_KEY:
                continue
            try:  # the shipped rules' signature predates purpose labels; that key signs rules only
                Ed25519PublicKey.from_public_bytes(key).verify(sig, data)
            except (InvalidSignature, ValueError):
                continue
        return parse_rules(data, ed25519_key_id(key))
    raise RulesError("the rules file is not signed by a trusted key")


def sign_rules(path: str | os.PathLike[str], signer: Any) -> Path:
    """Sign a rules file with ``signer`` (a :class:`~weightwarden.keys.provider.Signer` of purpose
    ``export-rules``; any other is refused before anything is written) into ``<path>.sig``."""
    from .._atomic import atomic_write_bytes

    signer.require(PURPOSE)
    data = open(path, "rb").read()
    parse_rules(data, signer.key_id)  # sign only what loads
    out = Path(f"{os.fspath(path)}.sig")
    atomic_write_bytes(out, signer.sign(data).hex().encode() + b"\n", force=True, mode=0o644)
    return out


def default_rules() -> RuleSet:
    with resources.as_file(resources.files(__package__).joinpath("rules/default.toml")) as p:
        return load_rules(p)
