"""The release decision: one gate that every copy leaving the house passes.

:meth:`ReleaseGate.decide` combines the model's classification under the signed rules
(:mod:`.rules`), the destination country, restricted-party screening of the end user
(:mod:`.screen`) and the license records on file, and returns ``allow``, ``needs-license``,
``needs-review`` or ``deny`` with every reason.  Reasons carry stable codes
(``regime:<id>:<outcome>``, ``screening:<entry id>``, ``destination:unknown``, ...): an
override approved in the broker (two-person rule) names the codes it overrode, and a later
decision with any code that was not overridden is refused again (:func:`check_override`).

Severity, lowest first: allow < needs-license < needs-review < deny; the decision is the most
severe of its reasons.  A regime outcome maps as: ``allowed`` and ``notify`` -> allow (a
notification duty is reported as a reason), ``license-required`` -> needs-license unless a
license record covers it, ``needs-review`` -> needs-review, ``presumption-of-denial`` -> deny
unless a license record covers it.  A screening hit -> deny.  No destination country ->
needs-review.  The gate fails closed: a rules file that does not verify, a screening list that
does not parse, or a model that cannot be classified never gives ``allow``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from ..errors import WardenError

__all__ = ["DECISIONS", "Destination", "GateDecision", "LicenseBook", "LicenseRecord", "Reason", "ReleaseDenied",
           "ReleaseGate", "ReleaseInputError", "UnknownCountry", "check_override"]  # fmt: skip

DECISIONS = ("allow", "needs-license", "needs-review", "deny")  # lowest severity first
SAMPLE_LIST = "screening:sample-list"  # screened against the fictitious sample: never overridable
_FROM_REGIME = {"allowed": "allow", "notify": "allow", "license-required": "needs-license",
                "needs-review": "needs-review", "presumption-of-denial": "deny"}  # fmt: skip


class ReleaseDenied(WardenError):
    """The export-control gate did not allow the release (and no approved override covers it)."""

    def __init__(self, message: str, decision: GateDecision | None = None):
        super().__init__(message)
        self.decision = decision


class ReleaseInputError(ReleaseDenied):
    """Bad input to the gate rather than its decision: a malformed recipient, country or license record
    (`warden` exits 1 for it, 4 for a denial)."""


class UnknownCountry(ReleaseInputError):
    """A destination country that is not an ISO 3166 country (code or English name)."""


@dataclass(frozen=True)
class Destination:
    """Who receives the copy: the end user as screened, its other names, and the country it goes to."""

    recipient: str
    country: str | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.recipient or len(self.recipient) > 256 or any(ord(c) < 32 for c in self.recipient):
            raise ReleaseInputError("a recipient is 1-256 printable characters")
        if self.country is not None:  # ISO 3166: alpha-2 checked, alpha-3 and names mapped (US, USA, United States)
            from .countries import resolve_country

            object.__setattr__(self, "country", resolve_country(self.country))


@dataclass(frozen=True)
class Reason:
    code: str  # stable: what an override names
    outcome: str  # one of DECISIONS
    text: str

    @property
    def blocking(self) -> bool:
        return self.outcome != "allow"


@dataclass(frozen=True)
class LicenseRecord:
    """An export license (or an authorisation of the same force) on file."""

    id: str
    regimes: tuple[str, ...]
    recipient: str
    countries: tuple[str, ...]
    models: tuple[str, ...]  # model ids, or "*"
    valid_from: date
    valid_until: date
    authority: str = ""
    reference: str = ""

    def covers(self, regime: str, model_id: str, dest: Destination, when: date) -> bool:
        from .screen import normalize

        return (regime in self.regimes and ("*" in self.models or model_id in self.models)
                and dest.country is not None and dest.country.upper() in self.countries
                and normalize(self.recipient) == normalize(dest.recipient)
                and self.valid_from <= when <= self.valid_until)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["valid_from"], d["valid_until"] = self.valid_from.isoformat(), self.valid_until.isoformat()
        return d

    @classmethod
    def from_json(cls, o: Any) -> LicenseRecord:
        try:
            from .countries import resolve_country

            rec = cls(str(o["id"]), tuple(map(str, o["regimes"])), str(o["recipient"]),
                      tuple(resolve_country(str(c)) for c in o["countries"]), tuple(map(str, o["models"])),
                      date.fromisoformat(o["valid_from"]), date.fromisoformat(o["valid_until"]),
                      str(o.get("authority", "")), str(o.get("reference", "")))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ReleaseInputError(f"a license record is malformed ({type(e).__name__}: {str(e)[:80]})") from None
        if not rec.id or not rec.regimes or not rec.countries or not rec.models or rec.valid_until < rec.valid_from:
            raise ReleaseInputError(f"license {rec.id!r}: needs regimes, countries, models and a valid period")
        return rec


@dataclass
class LicenseBook:
    """License records kept as one JSON file (``$WARDEN_HOME/release/licenses.json``), replaced atomically."""

    path: Path | None = None
    records: list[LicenseRecord] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LicenseBook:
        p = Path(path)
        if not p.exists():
            return cls(p)
        try:
            doc = json.loads(p.read_bytes())
            recs = [LicenseRecord.from_json(o) for o in doc["licenses"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise ReleaseInputError(f"the license records in {p} are unreadable: fix or remove that file") from None
        return cls(p, recs)

    def add(self, rec: LicenseRecord) -> None:
        from .._atomic import atomic_write_bytes

        if any(r.id == rec.id for r in self.records):
            raise ReleaseInputError(f"license {rec.id!r} is already on file")
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            doc = {"format": 1, "licenses": [r.to_json() for r in self.records]}
            atomic_write_bytes(self.path, json.dumps(doc, indent=1).encode(), force=True)

    def covering(self, regime: str, model_id: str, dest: Destination, when: date) -> LicenseRecord | None:
        return next((r for r in self.records if r.covers(regime, model_id, dest, when)), None)


def file_license(rec: LicenseRecord, home: str | os.PathLike[str] | None = None) -> LicenseBook:
    """File ``rec`` in ``home``'s license book (``release/licenses.json``); an event of its trail."""
    from .. import trail
    from ..audit import AuditAction
    from ..home import default_home

    book = LicenseBook.load(Path(home or default_home()) / "release" / "licenses.json")
    book.add(rec)
    trail.record(AuditAction.RELEASE_LICENSE, home=home, subject=rec.id, **rec.to_json())
    return book


@dataclass(frozen=True)
class GateDecision:
    decision: str
    model_id: str
    recipient: str
    country: str | None
    reasons: tuple[Reason, ...]
    rules_version: str
    rules_signed_by: str
    list_sha256: str
    as_of: str
    classification: dict[str, Any]

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"

    @property
    def blocking(self) -> frozenset[str]:
        """The codes of the reasons that keep this from ``allow``: what an override must name."""
        return frozenset(r.code for r in self.reasons if r.blocking)

    @property
    def digest(self) -> str:
        """SHA-256 over what was decided and why (not the date): what approvers sign."""
        core = {"decision": self.decision, "model": self.model_id, "recipient": self.recipient,
                "country": self.country, "blocking": sorted(self.blocking), "rules": self.rules_version,
                "list": self.list_sha256}  # fmt: skip
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision, "model": self.model_id, "recipient": self.recipient,
                "country": self.country, "reasons": [asdict(r) for r in self.reasons],
                "blocking": sorted(self.blocking), "rules_version": self.rules_version,
                "rules_signed_by": self.rules_signed_by, "list_sha256": self.list_sha256, "as_of": self.as_of,
                "classification": self.classification, "digest": self.digest}  # fmt: skip

    def explain(self) -> str:
        why = "; ".join(r.text for r in self.reasons if r.blocking) or "no reason against"
        return f"{self.decision}: {why}"


def check_override(decision: GateDecision, overridden: frozenset[str] | set[str]) -> None:
    """Raise :class:`ReleaseDenied` unless every blocking reason of ``decision`` is among the
    ``overridden`` codes (those an approved override named)."""
    if SAMPLE_LIST in decision.blocking:  # no approval makes a fictitious list a real one
        raise ReleaseDenied("screened against the shipped sample list: no override covers that (load a real "
                            "list with `warden screen update --file`)", decision)  # fmt: skip
    fixed = sorted(c for c in decision.blocking if c.startswith(("destination:embargoed:", "destination:restricted:")))
    if fixed:  # an embargo is not a judgement two people can make; a restricted destination needs a license
        raise ReleaseDenied(f"{', '.join(fixed)}: no override covers an embargoed or restricted destination (a "
                            "restricted one needs a license: `warden license add --regime destination`)", decision)
    new = decision.blocking - set(overridden)
    if new:
        raise ReleaseDenied(f"the approved override does not cover: {', '.join(sorted(new))}", decision)


class ReleaseGate:
    """The export-control gate over one rule set, one screening list and the license records."""

    def __init__(self, rules: Any, screening: Any, licenses: LicenseBook | None = None, *,
                 threshold: float | None = None, allow_sample_list: bool | None = None):  # fmt: skip
        from .screen import DEFAULT_THRESHOLD

        if rules is None or screening is None:
            raise ReleaseDenied("the gate needs a verified rule set and a screening list")
        self.rules, self.screening = rules, screening
        # the shipped sample list is fictitious: screening against it clears real parties (issue 17); the operator
        # allows it for a demonstration (--allow-sample-list, or WARDEN_ALLOW_SAMPLE_LIST=1)
        if allow_sample_list is None:
            allow_sample_list = os.environ.get("WARDEN_ALLOW_SAMPLE_LIST", "") == "1"
        self.allow_sample_list = allow_sample_list
        self.licenses = licenses or LicenseBook()
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    @classmethod
    def from_home(cls, home: str | os.PathLike[str] | None = None, *,
                  allow_sample_list: bool | None = None) -> ReleaseGate:  # fmt: skip
        """The gate as configured under ``home``: the shipped rules (or ``release/rules.toml`` signed by a
        key in ``release/rules-keys``), the list loaded by ``warden screen update`` (else the shipped sample),
        and ``release/licenses.json``."""
        from ..home import default_home
        from .rules import SHIPPED_RULES_KEY, default_rules, load_rules
        from .screen import ScreeningList

        h = Path(home) if home else default_home()
        own = h / "release" / "rules.toml"
        if own.exists():
            keys = [SHIPPED_RULES_KEY]
            kf = h / "release" / "rules-keys"
            if kf.exists():
                keys += [bytes.fromhex(x) for x in kf.read_text().split() if x.strip()]
            rules = load_rules(own, keys)
        else:
            rules = default_rules()
        from .rules_version import check_home

        check_home(h, rules)  # a rules file older than one already used here is refused (issue 17)
        return cls(rules, ScreeningList.from_home(h), LicenseBook.load(h / "release" / "licenses.json"),
                   allow_sample_list=allow_sample_list)  # fmt: skip

    def decide(
        self, classification: Any, dest: Destination, *, model_id: str, as_of: date | None = None
    ) -> GateDecision:
        """The decision for releasing a model of this ``classification`` to ``dest``.

        ``classification`` is a :class:`~.classify.Classification`, or ``None`` when the model could
        not be classified (the decision is then ``needs-review`` at best)."""
        when = as_of or date.today()
        reasons: list[Reason] = []
        summary: dict[str, Any] = {}
        if dest.country is None:
            reasons.append(Reason("destination:unknown", "needs-review", "the destination country is not known"))
        else:
            from .countries import country_name

            reasons.append(Reason(f"destination:{dest.country}", "allow",
                                  f"destination {dest.country} ({country_name(dest.country)})"))  # fmt: skip
            from .embargoes import destination_rule

            rule = destination_rule(dest.country)  # in code, under every rule set (issue 17)
            if rule is not None:
                code, outcome, text = rule
                lic = (self.licenses.covering("destination", model_id, dest, when)
                       if outcome == "needs-license" else None)  # fmt: skip
                if lic is not None:
                    reasons.append(Reason(f"license:{lic.id}", "allow", f"{text}; covered by license {lic.id} "
                                          f"({lic.authority} {lic.reference}, until {lic.valid_until})"))  # fmt: skip
                else:
                    reasons.append(Reason(code, outcome, text))
        if classification is None:
            reasons.append(Reason("classification:failed", "needs-review", "the model could not be classified"))
        else:
            comp = classification.compute
            summary = {"total_params": classification.total_params, "active_params": classification.active_params,
                       "compute_flop": comp.flop if comp else None, "compute_method": comp.method if comp else None,
                       "published": classification.published, "compute_source": classification.source,
                       "claimed_flop": classification.claimed.flop if classification.claimed else None,
                       "doubts": list(classification.doubts)}  # fmt: skip
            if (classification.moe or {}).get("experts_per_token_entered") is not None:  # an entered figure
                summary["entered_experts_per_token"] = classification.moe["experts_per_token_entered"]
            from .classify import evaluate_outcomes

            # what is only claimed (unsigned) can make an outcome stricter, never more lenient
            outs = evaluate_outcomes(self.rules, classification, as_of=when, country=dest.country)
            if classification.doubts:
                reasons.append(Reason("classification:implausible", "needs-review",
                                      "; ".join(classification.doubts)))  # fmt: skip
            for o in outs:
                outcome = _FROM_REGIME[o["outcome"]]
                text = f"{o['regime']}: {o['outcome']} ({'; '.join(o['reasons'])})"
                if outcome in ("needs-license", "deny"):
                    lic = self.licenses.covering(o["regime"], model_id, dest, when)
                    if lic is not None:
                        reasons.append(
                            Reason(
                                f"license:{lic.id}",
                                "allow",
                                f"{text}; covered by license {lic.id} "
                                f"({lic.authority} {lic.reference}, until {lic.valid_until})".strip(),
                            )
                        )
                        continue
                reasons.append(Reason(f"regime:{o['regime']}:{o['outcome']}", outcome, text))
        hits = self.screening.screen(dest.recipient, aliases=dest.aliases, country=dest.country,
                                     threshold=self.threshold)["hits"]  # fmt: skip
        for h in hits:
            e = h["entry"]
            reasons.append(Reason(f"screening:{e['id']}", "deny",
                                  f"{dest.recipient!r} matches {e['name']!r} on {e['source'] or 'the list'} "
                                  f"(score {h['score']}, matched {h['matched_name']!r})"))  # fmt: skip
        if getattr(self.screening, "is_sample", False) and not self.allow_sample_list:
            reasons.append(Reason(SAMPLE_LIST, "deny", "screened against the shipped SAMPLE list (fictitious parties),"
                                  " not a real one: load one with `warden screen update --file`, or pass "
                                  "--allow-sample-list for a demonstration"))  # fmt: skip
        elif getattr(self.screening, "is_sample", False):
            reasons.append(Reason(f"{SAMPLE_LIST}-allowed", "allow", "screened against the shipped SAMPLE list "
                                  "(fictitious parties), allowed for a demonstration"))  # fmt: skip
        if not hits:
            reasons.append(Reason("screening:clear", "allow", f"no match at threshold {self.threshold:g} among "
                                  f"{len(self.screening.entries)} listed parties"))  # fmt: skip
        decision = max((r.outcome for r in reasons), key=DECISIONS.index, default="allow")
        return GateDecision(decision, model_id, dest.recipient, dest.country.upper() if dest.country else None,
                            tuple(reasons), self.rules.version, self.rules.signed_by, self.screening.sha256,
                            when.isoformat(), summary)  # fmt: skip

    def decide_model(self, model: str | os.PathLike[str], dest: Destination, *, model_id: str,
                     as_of: date | None = None, **classify_kw: Any) -> GateDecision:  # fmt: skip
        """Classify ``model`` (a failure to classify gives ``needs-review``, never ``allow``), then decide."""
        from ..errors import FormatError, UnsupportedModelError
        from .classify import classify

        try:
            c = classify(model, rules=self.rules, as_of=as_of, country=dest.country, **classify_kw)
        except (UnsupportedModelError, FormatError, ValueError):
            c = None
        return self.decide(c, dest, model_id=model_id, as_of=as_of)
