"""The access broker: `warden broker ...` (its log key, accounts, models, enrolment), `warden serve` and
`warden pull`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .._extras import require
from ..errors import WardenError
from ._common import (
    AllowSampleOpt,
    BrokerDbOpt,
    ComputeOpt,
    DeclarationOpt,
    ExpertsOpt,
    HomeOpt,
    JsonOpt,
    LogKeyOpt,
    LogKeyPassOpt,
    PublishedOpt,
    StoreOpt,
    TokensOpt,
    _emit,
    _pubkey,
    _read_json,
    _trust_keys,
    _ws,
)

broker_app = typer.Typer(no_args_is_help=True, help="Administer the access broker (accounts, models)")


@broker_app.command("init")
def broker_init(log_key: LogKeyOpt = None, log_key_passphrase_file: LogKeyPassOpt = None, home: HomeOpt = None,
                trust_from: Annotated[Path | None, typer.Option(
                    "--trust-from", help="copy the trust store (public keys only) from this home or trusted.json",
                    show_default=False)] = None,
                as_json: JsonOpt = False) -> None:  # fmt: skip
    """Create the broker's log key if there is none, and print its public key (pin it for `audit verify`).
    With --trust-from KEYHOME, give this (the broker's own) home the key host's trust store first."""
    ws = _ws(home, log_key=log_key, log_pass=log_key_passphrase_file)
    copied = None
    if trust_from is not None:
        from ..broker.home import copy_trust

        copied = copy_trust(trust_from, ws.root)
    signer, created = ws.log_signer()
    _emit({"public_key": signer.public_key.hex(), "key_id": signer.key_id, "created": created,
           "trusted_copied": copied}, as_json, signer.public_key.hex())  # fmt: skip


@broker_app.command("account")
def broker_account(
    account: Annotated[str, typer.Argument(help="account id")],
    pubkey: Annotated[str, typer.Option("--pubkey", help="the account's Ed25519 public key (hex or base64)")],
    kind: Annotated[str, typer.Option("--kind", help="service | workload | human")] = "service",
    role: Annotated[list[str] | None, typer.Option("--role", help="a role (repeat)")] = None,
    team: Annotated[list[str] | None, typer.Option("--team", help="a team (repeat)")] = None,
    db: BrokerDbOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add or replace an account (its key, roles and teams)."""
    ws = _ws(home, db=db, log_key=log_key, log_pass=log_key_passphrase_file)
    with ws.broker() as b:
        b.add_account(account, kind, _pubkey(pubkey, "an account"), set(role or []), set(team or []),
                      actor=ws.actor())  # fmt: skip
    _emit({"ok": True, "account": account, "kind": kind, "roles": sorted(role or []), "teams": sorted(team or [])},
          as_json, f"account {account}: {kind}, roles {sorted(role or [])}, teams {sorted(team or [])}")  # fmt: skip


@broker_app.command("suspend")
def broker_suspend(
    account: str,
    reason: Annotated[str, typer.Option("--reason")] = "",
    db: BrokerDbOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Suspend an account: every token it holds is refused from now on."""
    ws = _ws(home, db=db, log_key=log_key, log_pass=log_key_passphrase_file)
    with ws.broker() as b:
        b.suspend(account, actor=ws.actor(), reason=reason)
    _emit({"ok": True, "suspended": account}, as_json, f"suspended {account}")


@broker_app.command("model")
def broker_model(
    name: str,
    sealed: Annotated[Path, typer.Argument(help="a sealed file (.wws)")],
    team: Annotated[str, typer.Option("--team", help="the team that owns it")],
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    published: PublishedOpt = False,
    experts_per_token: ExpertsOpt = None,
    classification: Annotated[
        Path | None,
        typer.Option(
            "--classification",
            help="the JSON of `warden classify MODEL --json`, run where the keys are (needed for a hidden header)",
            show_default=False,
        ),
    ] = None,
    declaration: DeclarationOpt = None,
    db: BrokerDbOpt = None,
    store: StoreOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Admit a sealed model (its digests and signature are checked; plaintext is refused) and record
    its export-control classification, on which the gate decides releases of it.  No key is used:
    the tensor shapes come from the visible header, or from --classification."""
    from ..release import classify
    from ..release.classify import Classification

    ws = _ws(home, db=db, store=store, log_key=log_key, log_pass=log_key_passphrase_file)
    if classification is not None:
        try:
            c = Classification.from_json(_read_json(classification))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise WardenError(f"--classification {classification.name} is not the JSON of `warden classify "
                              "--json`") from None  # fmt: skip
    else:
        c = classify(sealed, tokens=tokens, declared_flop=compute, published=published,
                     experts_per_token=experts_per_token, keyless=True,
                     **ws.declaration_kw(declaration))  # fmt: skip
    with ws.broker() as b:
        size = b.add_model(name, team, sealed, trust=ws.trust_store(), actor=ws.actor(),
                           classification=c)  # fmt: skip
    _emit({"ok": True, "model": name, "team": team, "bytes": size, "classification": c.to_json()}, as_json,
          f"model {name} ({size} bytes) admitted for team {team}; {c.total_params:,} parameters"
          + (f", training compute {c.compute.flop:.2e} FLOP ({c.compute.method})" if c.compute else ""))  # fmt: skip


def serve_cmd(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8443,
    audience: Annotated[
        str, typer.Option("--audience", help="the aud claim tokens must carry")
    ] = "weightwarden-broker",
    rp_id: Annotated[str, typer.Option("--rp-id", help="WebAuthn relying party id (the console's host)")] = "localhost",
    origin: Annotated[
        list[str] | None, typer.Option("--origin", help="the console's origin [default: http://localhost:PORT]")
    ] = None,
    egress_rate: Annotated[
        float | None, typer.Option("--egress-rate", help="bytes/s each principal may stream [default: 50e6]")
    ] = None,
    egress_burst: Annotated[
        float | None, typer.Option("--egress-burst", help="bytes a principal may stream at once [default: 20e9]")
    ] = None,
    uds: Annotated[
        Path | None, typer.Option("--uds", help="listen on this Unix socket instead of --host/--port (mode --uds-mode)")
    ] = None,
    uds_mode: Annotated[
        str, typer.Option("--uds-mode", help="the socket's permissions, owner and group bits only (octal)")
    ] = "600",
    allow_sample_list: AllowSampleOpt = False,
    db: BrokerDbOpt = None,
    store: StoreOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run the access broker and its web console (FastAPI on uvicorn).  Put TLS in front of it.

    It holds sealed bytes, public keys and its own log key, never the keyring: start it in a home of its
    own (`warden broker init --trust-from KEYHOME`), with --log-key (and --log-key-passphrase-file); it
    restarts itself with an allowlisted environment (no PIN, token or passphrase it does not need)."""
    from .._harden import broker_env, harden_process, lock_pages, reexec_with
    from ..broker.home import check_own_home

    reexec_with(broker_env(log_key))  # first: /proc/<pid>/environ shows only what the broker needs
    ws = _ws(home, db=db, store=store, audience=audience, log_key=log_key, log_pass=log_key_passphrase_file)
    check_own_home(ws.root)  # never beside a keyring or an agent socket
    listen: dict[str, Any] = {"host": host, "port": port}
    sock = None
    if uds is not None:
        from ..broker.unixsock import bind_unix

        try:
            mode = int(uds_mode, 8)
        except ValueError:
            msg = f"{uds_mode!r} is not an octal mode such as 600"
            raise typer.BadParameter(msg, param_hint="--uds-mode") from None
        sock = bind_unix(uds, mode=mode)  # a taken path: one line, exit 1, nothing started
        listen = {"fd": sock.fileno()}
        sys.stderr.write(f"listening on unix:{uds} (mode {mode:o})\n")
    uvicorn = require("uvicorn", extra="server")

    from ..broker.app import create_app
    from ..broker.passkeys import Passkeys

    hard = harden_process(lock_memory=False)
    pp = None
    if egress_rate is not None or egress_burst is not None:
        pp = (egress_rate if egress_rate is not None else 50e6, egress_burst if egress_burst is not None else 20e9)
    b = ws.broker(gate=True, per_principal=pp, allow_sample_list=allow_sample_list or None)
    pk = Passkeys(b, rp_id=rp_id, origins=tuple(origin or [f"http://localhost:{port}"]))
    # the log key is loaded: lock the pages mapped now (it is among them), not the streams' later mappings
    hard["memory_locked"], notice = lock_pages(future=False)
    hard["notices"] += [notice] if notice else []
    sys.setswitchinterval(0.001)  # short GIL slices: a policy decision never waits a 5 ms slice behind a stream
    for n in hard["notices"]:
        sys.stderr.write(f"notice: {n}\n")
    sys.stderr.write(f"process: dumpable {hard['dumpable']}, core file limit {hard['core_limit']}, "
                     f"memory locked {hard['memory_locked']}\n")  # fmt: skip
    sys.stderr.write(f"audit log public key (pin it): {b.log.public_key.hex()}\n")
    sys.stderr.write(f"audit log id (pin it with the key): {b.log.log_id.hex()}\n")
    sys.stderr.flush()
    try:
        from ..broker.zerocopy import ZeroCopyH11Protocol  # weight streams leave by sendfile

        uvicorn.run(create_app(b, pk), **listen, log_level="warning", server_header=False,
                    http=ZeroCopyH11Protocol)  # fmt: skip
    finally:
        b.close()
        if sock is not None and uds is not None:
            sock.close()
            with contextlib.suppress(OSError):
                uds.unlink()


@broker_app.command("enroll")
def broker_enroll(
    account: str,
    rp_id: Annotated[str, typer.Option("--rp-id")] = "localhost",
    db: BrokerDbOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A one-time code (15 minutes) with which a person registers a passkey in the console."""
    from ..broker.passkeys import Passkeys

    ws = _ws(home, db=db, log_key=log_key, log_pass=log_key_passphrase_file)
    with ws.broker() as b:
        code = Passkeys(b, rp_id=rp_id).enroll_code(account, actor=ws.actor())
    if as_json:
        _emit({"account": account, "code": code}, True)
    else:
        sys.stdout.write(code + "\n")


def pull_cmd(
    model: Annotated[str, typer.Argument(help="the model's name at the broker")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where the sealed file goes")],
    url: Annotated[str, typer.Option("--broker", envvar="WARDEN_BROKER_URL", help="the broker's base URL")],
    account: Annotated[str, typer.Option("--account", envvar="WARDEN_ACCOUNT", help="your account id")],
    key: Annotated[
        Path, typer.Option("--key", envvar="WARDEN_ACCOUNT_KEY", help="your account's Ed25519 key (PEM, raw or hex)")
    ],
    request: Annotated[str | None, typer.Option("--request", help="an approved copy request's id")] = None,
    audience: Annotated[str, typer.Option("--audience")] = "weightwarden-broker",
    trust_key: Annotated[
        list[str] | None, typer.Option("--trust-key", help="trust only this signer (base64 or file); repeatable")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite OUTPUT")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download sealed weights from the broker, resuming OUTPUT.part after a cut, and verify them
    (signature, every chunk digest) before they are put in place."""
    from ..broker.client import BrokerClient, load_account_key

    trust: Any = _ws(home).trust(_trust_keys(trust_key))
    with BrokerClient(url, account, load_account_key(key), audience=audience) as c:
        res = c.pull(model, output, request_id=request, trust=trust, force=force)
    from rich.markup import escape

    resumed = f", resumed at {res.resumed_from}" if res.resumed_from else ""
    _emit(res.to_json(), as_json, escape(f"OK: {res.path} ({res.bytes} bytes{resumed}), signed by {res.signer}"))
