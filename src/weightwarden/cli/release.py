"""Export control and releases: `warden classify`, `declare`, `screen`, `release`, and the licenses
(`warden license ...`) and recipients (`warden recipient ...`) the gate and releases consult."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import WardenError
from ..keys.pubkey import parse_public_key
from ._common import (
    EXIT_DENIED,
    AllowSampleOpt,
    BrokerDbOpt,
    ComputeOpt,
    DeclarationOpt,
    DefaultGroup,
    ExpertsOpt,
    HomeOpt,
    JsonOpt,
    LogKeyOpt,
    LogKeyPassOpt,
    PublishedOpt,
    StoreOpt,
    Table,
    TokensOpt,
    _emit,
    _safe,
    _ws,
    err,
    out,
)

license_app = typer.Typer(no_args_is_help=True, help="Export licenses on file (the release gate consults them)")
recipient_app = typer.Typer(no_args_is_help=True, help="Release recipients and the public keys copies are sealed to")
screen_app = typer.Typer(
    cls=DefaultGroup, no_args_is_help=True,
    help="Restricted-party screening: `check NAME` (`warden screen NAME` for short, when NAME is no subcommand's "
         "name) and `update --file F`.",
)  # fmt: skip


def classify_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint: .safetensors, HF folder, sealed file or bundle")],
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    chip_hours: Annotated[float | None, typer.Option("--chip-hours")] = None,
    peak_flops: Annotated[float | None, typer.Option("--peak-flops", help="peak dense FLOP/s per chip")] = None,
    utilization: Annotated[float | None, typer.Option("--utilization", help="0..1 [default 0.4]")] = None,
    published: PublishedOpt = False,
    experts_per_token: ExpertsOpt = None,
    country: Annotated[str | None, typer.Option("--country", help="destination (ISO 3166 alpha-2)")] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="evaluate the rules at this date (YYYY-MM-DD)")] = None,
    rules: Annotated[Path | None, typer.Option("--rules", help="a signed rules file (FILE + FILE.sig)")] = None,
    rules_key: Annotated[str | None, typer.Option("--rules-key", help="Ed25519 key (hex) that signs --rules")] = None,
    declaration: DeclarationOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Parameters, training compute and the outcome under each export-control regime."""
    import datetime as _dt

    from ..release import classify, load_rules
    from ..release.rules import SHIPPED_RULES_KEY

    when = None
    if as_of:
        try:
            when = _dt.date.fromisoformat(as_of)
        except ValueError:
            raise typer.BadParameter("--as-of is YYYY-MM-DD") from None
    rs = None
    if rules:
        keys = [SHIPPED_RULES_KEY] + ([parse_public_key(rules_key, "--rules-key")] if rules_key else [])
        rs = load_rules(rules, keys)
    ws = _ws(home)
    c = classify(model, rules=rs, as_of=when, country=country, tokens=tokens, declared_flop=compute,
                 chip_hours=chip_hours, peak_flops=peak_flops, utilization=utilization, published=published,
                 experts_per_token=experts_per_token, home=home, **ws.declaration_kw(declaration),
                 **ws.model_kw(model))  # fmt: skip
    j = c.to_json()
    if as_json:
        _emit(j, True)
        return
    comp = c.compute
    flop = f"{comp.flop:.2e} FLOP ({comp.method}, {comp.low:.1e}..{comp.high:.1e})" if comp else "unknown"
    out.print(f"{c.model}: {c.total_params:,} parameters ({c.active_params:,} active); training compute {flop}"
              + (f" [{c.source}]" if c.source else ""))  # fmt: skip
    if c.claimed:
        out.print(f"claimed, unsigned (config.json): {c.claimed.flop:.2e} FLOP: can only make an outcome stricter")
    from rich.markup import escape

    for doubt in c.doubts:
        out.print(f"needs review: {escape(ascii(doubt)[1:-1])}")
    t = Table("regime", "outcome", "reasons")
    for o in c.outcomes:
        t.add_row(o["regime"], o["outcome"], "; ".join(o["reasons"]))
    out.print(t)
    out.print(f"rules {c.rules_version}, as of {c.as_of}" + (f", destination {c.country}" if c.country else ""))


def declare_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint: .safetensors, HF folder, sealed file or bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the declaration (FILE; FILE.sig beside it)")],
    by: Annotated[str, typer.Option("--by", help="who declares (name, role)")],
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a training declaration for MODEL's weights with this keyring's compliance key (made when missing;
    trust its public key, `warden key export-public --purpose compliance`, in release/compliance-keys wherever
    declarations are checked)."""
    from ..release.declaration import declare

    ws = _ws(home)
    signer = ws.keyring.signer(purpose="compliance", create=True)
    d = declare(model, output, signer=signer, declared_by=by, compute_flop=compute, tokens=tokens,
                **ws.model_kw(model))  # fmt: skip
    from rich.markup import escape

    _emit(d.to_json(), as_json, f"declaration {escape(str(output))} for weights {d.model_sha256} signed by "
          f"{d.signed_by}")  # fmt: skip


@screen_app.command("check")
def screen_check(
    name: Annotated[str, typer.Argument(help="a person or organisation")],
    alias: Annotated[list[str] | None, typer.Option("--alias", help="another name of the same party (repeat)")] = None,
    country: Annotated[str | None, typer.Option("--country", help="its country (ISO 3166 alpha-2)")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0, max=100, help="score of a hit")] = 86.0,
    file: Annotated[
        Path | None, typer.Option("--file", help="screen against this list instead (CSL JSON/CSV, OpenSanctions FtM)")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Screen NAME against the restricted-party list; a hit (MATCH) exits 4."""
    from ..release.screen import screen

    if country is not None:  # ISO 3166: USA, United States -> US; an unknown country is refused
        from ..release.countries import resolve_country

        country = resolve_country(country)
    r, sample = screen(name, aliases=tuple(alias or ()), country=country, threshold=threshold, file=file, home=home)
    if sample:
        err.print("note: screening against the shipped SAMPLE list (fictitious); load a real one with "
                  "`warden screen update --file`")  # fmt: skip
    if as_json:
        _emit(r, True)
    else:
        t = Table("score", "entry", "matched name", "source", "countries")
        for h in r["hits"]:
            t.add_row(f"{h['score']:.1f}", h["entry"]["name"], h["matched_name"], h["entry"]["source"],
                      ",".join(h["entry"]["countries"]))  # fmt: skip
        out.print(t)
        out.print(f"{r['decision'].upper()} (threshold {threshold:g}; list {r['list']['origin']}, "
                  f"{r['list']['entries']} entries" + (f"; country {country}" if country else "") + ")")  # fmt: skip
    if r["hits"]:
        raise typer.Exit(EXIT_DENIED)


@screen_app.command("update")
def screen_update(
    file: Annotated[Path, typer.Option("--file", help="the list as downloaded (CSL JSON/CSV, OpenSanctions FtM)")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load a newer restricted-party list into the home (its origin, date and SHA-256 are recorded)."""
    from ..release.screen import update_list

    rec = update_list(file, home)
    _emit(rec, as_json, f"screening list {rec['origin']}: {rec['entries']} entries, sha256 {rec['sha256']}")


def release_cmd(
    model: Annotated[Path, typer.Argument(help="the master: .safetensors file, model folder, sealed file or bundle")],
    to: Annotated[str, typer.Option("--to", help="the recipient (end user) this copy is for")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the fingerprinted copy")],
    country: Annotated[
        str | None, typer.Option("--country", help="destination country (ISO 3166 alpha-2); without it: review")
    ] = None,
    alias: Annotated[list[str] | None, typer.Option("--alias", help="another name of the recipient (repeat)")] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="[default: the model's file or folder name]")
    ] = None,
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    published: PublishedOpt = False,
    experts_per_token: ExpertsOpt = None,
    declaration: DeclarationOpt = None,
    request: Annotated[
        str | None, typer.Option("--request", help="the broker's approved release request (two-person rule)")
    ] = None,
    db: BrokerDbOpt = None,
    store: StoreOpt = None,
    recipient_key: Annotated[
        str | None,
        typer.Option(
            "--recipient-key",
            help="seal the copy to this age public key (age1...) [default: the key the recipient is enrolled with]",
            show_default=False,
        ),
    ] = None,
    seal_out: Annotated[bool, typer.Option("--seal", help="seal the copy under our own key instead")] = False,
    plaintext: Annotated[bool, typer.Option("--plaintext", help="write the copy in plaintext instead")] = False,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="leave files matching this pattern out (repeat; recorded)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    head_mark: Annotated[
        float | None,
        typer.Option(
            "--head-mark",
            min=0.0,
            max=1.0,
            help="also mark the output head at this rms logit change, e.g. 0.06 (fixed per model at its first "
            "release; docs/TRACING.md, 'The head mark') [default: as recorded, none for a new model]",
            show_default=False,
        ),
    ] = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    allow_sample_list: AllowSampleOpt = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a copy of MODEL carrying a secret fingerprint of RECIPIENT, and record the release.

    The export-control gate decides first; anything but `allow` is refused unless --request names a
    release request the broker's approvers approved (which covers exactly the reasons they saw).
    The copy is sealed to the recipient's age key (--recipient-key, or the one `warden recipient add`
    enrolled), signed by our key; --seal seals it under our own key, --plaintext writes it in plaintext.
    With --request and a sealed copy, the copy is handed to the broker, which streams it to the requester."""
    from ..release.gate import ReleaseDenied
    from ..trace import ENROLLED, release

    if sum((recipient_key is not None, seal_out, plaintext)) > 1:
        raise WardenError("--recipient-key, --seal and --plaintext are exclusive: pick one output")
    ws = _ws(home, db=db, store=store, log_key=log_key, log_pass=log_key_passphrase_file)
    kr = ws.keyring
    ckw = {"tokens": tokens, "declared_flop": compute, "published": published, "experts_per_token": experts_per_token,
           **ws.declaration_kw(declaration)}  # fmt: skip
    sealing = not plaintext
    with contextlib.ExitStack() as stack:
        approval: Any = None
        b = None
        if request:
            b = stack.enter_context(ws.broker())

            def approval(d: Any) -> Any:
                return b.consume_release(request, d, actor=ws.actor())

        kw = {"provider": kr.provider(purpose="tracing", create=True), "country": country,
              "aliases": tuple(alias or ()), "approval": approval, "classify_kw": ckw, "model_id": model_id,
              "home": home, "db": db, "exclude": tuple(exclude or ()), "master_kw": ws.model_kw(model, kr),
              "seal": (kr.provider(), kr.signer()) if sealing else None,
              "recipient_key": None if seal_out or plaintext else (recipient_key or ENROLLED)}  # fmt: skip
        if allow_sample_list:
            kw["gate"] = ws.release_gate(allow_sample_list=True)
        try:
            rel = release(model, to, output, force=force, head_amp=head_mark, **kw)
        except ReleaseDenied as e:
            if as_json and e.decision is not None:
                _emit({"released": False, "gate": e.decision.to_json()}, True)
            elif e.decision is not None:
                t = Table("reason", "outcome", "detail")
                for r in e.decision.reasons:
                    t.add_row(_safe(r.code), _safe(r.outcome), _safe(r.text))
                err.print(t)
            raise
        if b is not None and sealing:
            b.attach_release(request, output, actor=ws.actor())
    _emit({"released": True, "release": rel.to_json(), "output": str(output)}, as_json,
          f"released {_safe(rel.model_id)} to {_safe(rel.recipient)} in {rel.country or '??'} (code {rel.code_id}; "
          f"gate: {rel.gate}, rules {rel.rules_version}; {rel.output}) at {_safe(str(output))}")  # fmt: skip




@recipient_app.command("add")
def recipient_add(
    name: Annotated[str, typer.Argument(help="the recipient, as `warden release --to` names them")],
    pubkey: Annotated[str, typer.Option("--pubkey", help="their age X25519 public key (age1...)")],
    replace: Annotated[bool, typer.Option("--replace", help="replace the key they are enrolled with")] = False,
    db: BrokerDbOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enroll a recipient with their public key: their copies are sealed to it, and only they open them."""
    from ..trace import add_recipient

    r = add_recipient(name, pubkey, home=home, db=db, replace=replace)
    _emit(r, as_json, f"recipient {_safe(r['recipient'])} enrolled with {r['pubkey']}")


@recipient_app.command("list")
def recipient_list(db: BrokerDbOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Enrolled recipients: name, canonical identity, public key."""
    from ..trace import recipients

    rows = recipients(home=home, db=db)
    if as_json:
        _emit(rows, True)
        return
    t = Table("recipient", "identity", "public key", "added")
    for r in rows:
        t.add_row(_safe(r["recipient"]), _safe(r["identity"]), r["pubkey"] or "", r["added"])
    out.print(t)


@license_app.command("add")
def license_add(
    license_id: Annotated[str, typer.Argument(help="the license number")],
    regime: Annotated[list[str], typer.Option("--regime", help="a regime id it covers (repeat)")],
    recipient: Annotated[str, typer.Option("--recipient", help="the licensed end user")],
    country: Annotated[list[str], typer.Option("--country", help="a licensed destination (repeat)")],
    model: Annotated[list[str], typer.Option("--model", help="a model id it covers, or * (repeat)")],
    valid_from: Annotated[str, typer.Option("--from", help="YYYY-MM-DD")],
    valid_until: Annotated[str, typer.Option("--until", help="YYYY-MM-DD")],
    authority: Annotated[str, typer.Option("--authority", help="who issued it (e.g. BIS)")] = "",
    reference: Annotated[str, typer.Option("--reference", help="a document reference")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """File an export license; the gate allows what it covers (regime, model, recipient, country, dates)."""
    from ..release.gate import LicenseRecord, file_license

    rec = LicenseRecord.from_json({"id": license_id, "regimes": regime, "recipient": recipient, "countries": country,
                                   "models": model, "valid_from": valid_from, "valid_until": valid_until,
                                   "authority": authority, "reference": reference})  # fmt: skip
    book = file_license(rec, home)
    _emit(rec.to_json(), as_json, f"license {license_id} filed ({len(book.records)} on file)")


@license_app.command("list")
def license_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The license records on file."""
    book = _ws(home).licenses()
    rows = [r.to_json() for r in book.records]
    if as_json:
        _emit(rows, True)
        return
    t = Table("id", "regimes", "recipient", "countries", "models", "valid")
    for r in rows:
        t.add_row(r["id"], ",".join(r["regimes"]), r["recipient"], ",".join(r["countries"]), ",".join(r["models"]),
                  f"{r['valid_from']}..{r['valid_until']}")  # fmt: skip
    out.print(t)


