"""M-of-N custody of the keyring's root key: `warden custody ...` and the custody agent, `warden agent ...`."""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CustodyError
from ._common import HomeOpt, JsonOpt, _emit, _plain, _ws, err

custody_app = typer.Typer(no_args_is_help=True, help="M-of-N custodians of the keyring's root key.")
agent_app = typer.Typer(no_args_is_help=True, help="The custody agent (holds an unsealed keyring in memory).")


def _custodian_env(name: str) -> str:
    """The variable that holds a passphrase custodian's passphrase for automation."""
    return "WARDEN_CUSTODIAN_PASSPHRASE_" + "".join(ch if ch.isalnum() else "_" for ch in name).upper()


def _custodian_passphrase(name: str, given: Path | None = None) -> str | None:
    """A passphrase custodian's passphrase: ``given`` (a file or /dev/fd/N), the file named by
    WARDEN_CUSTODIAN_PASSPHRASE_FILE_<NAME>, WARDEN_CUSTODIAN_PASSPHRASE_<NAME> (automation), a prompt."""
    from .._harden import read_secret_file

    env = _custodian_env(name)
    path = given or os.environ.get(env.replace("_PASSPHRASE_", "_PASSPHRASE_FILE_", 1))
    if path:
        return read_secret_file(path, f"custodian {name}'s passphrase")
    pw = os.environ.get(env)
    if pw is None and sys.stdin.isatty():
        pw = getpass.getpass(f"Passphrase for custodian {name}: ")
    return pw


def _custodians(specs: list[str], ask: bool = True) -> tuple[list[Any], dict[str, str]]:
    from ..keys.custody import Custodian

    out, pws = [], {}
    for spec in specs:
        name, sep, recipient = spec.partition("=")
        if not sep:
            raise CustodyError(f"--custodian takes NAME=age1... or NAME=passphrase, not {spec[:40]!r}")
        out.append(Custodian(name, recipient))
        if recipient == "passphrase" and ask:
            pw = _custodian_passphrase(name)
            if pw is None:
                env = _custodian_env(name).replace("_PASSPHRASE_", "_PASSPHRASE_FILE_", 1)
                raise CustodyError(f"set {env} to a file holding custodian {name}'s passphrase")
            pws[name] = pw
    return out, pws


CustodianOpt = Annotated[
    list[str], typer.Option("--custodian", help="NAME=age1... (age public key) or NAME=passphrase")
]
ThresholdOpt = Annotated[int, typer.Option("--threshold", help="M: shares needed to unseal")]


@custody_app.command("init")
def custody_init(
    custodian: CustodianOpt,
    threshold: ThresholdOpt,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put the keyring under M-of-N custody (it is then unsealed by custodians, not a passphrase)."""
    custodians, pws = _custodians(custodian)
    kr = _ws(home).unlock_keyring()
    doc = kr.to_custody(custodians, threshold, pws)
    _emit(
        {"split_id": doc.split_id, "threshold": doc.threshold, "custodians": [c.name for c in custodians]},
        as_json,
        f"keyring under {doc.threshold}-of-{len(custodians)} custody; start the agent and unseal",
    )


def _open_share(home: Path, custodian: str, identity: Path | None, passphrase_file: Path | None = None) -> Any:
    """One custodian's share, opened on their terminal with their age identity or passphrase."""
    from ..keys.custody import CustodyDoc

    doc = CustodyDoc.load(home)
    entry = doc.custodian(custodian)
    if entry["recipient"] == "passphrase":
        return doc.open_share(custodian, passphrase=_custodian_passphrase(custodian, passphrase_file))
    if identity is None:
        raise CustodyError("--identity FILE (your age identity) is needed for your share")
    from ..keys.custody import identity_is_protected, read_identity

    raw = identity.read_bytes()
    pw = _custodian_passphrase(custodian, passphrase_file) if identity_is_protected(raw) else None
    return doc.open_share(custodian, identity=read_identity(raw, pw, where=str(identity)))


@custody_app.command("unseal")
def custody_unseal(
    custodian: Annotated[str, typer.Option("--custodian", help="your custodian name")],
    identity: Annotated[Path | None, typer.Option("--identity", help="your age identity file")] = None,
    share_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--share-passphrase-file",
            help="a file (or /dev/fd/N) with your share's passphrase "
            "[default: WARDEN_CUSTODIAN_PASSPHRASE_FILE_<NAME>, else a prompt]",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit one custodian's share to the agent (decrypted here, sent over the local socket)."""
    from ..keys.agent import AgentClient
    from ..keys.provider import b64e

    h = _ws(home).root
    share = _open_share(h, custodian, identity, share_passphrase_file)
    st = AgentClient(h).call("unseal", share=b64e(share.to_bytes()))
    msg = "unsealed" if not st["sealed"] else f"sealed: {st['progress']} of {st['threshold']} shares"
    _emit(st, as_json, msg)


@custody_app.command("status")
def custody_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Sealed or unsealed, and the unseal progress."""
    from ..keys.agent import AgentClient

    st = AgentClient(_ws(home).root).call("status")
    msg = "unsealed" if not st["sealed"] else "sealed" + (
        f": {st['progress']} of {st['threshold']} shares" if "progress" in st else ""
    )
    _emit(st, as_json, msg)


@custody_app.command("seal")
def custody_seal(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Make the agent forget the root key (seal the vault)."""
    from ..keys.agent import AgentClient

    _emit(AgentClient(_ws(home).root).call("seal"), as_json, "sealed")


@custody_app.command("keygen")
def custody_keygen(
    output: Annotated[Path, typer.Option("-o", "--output", help="your age identity file (kept by you, 0600)")],
    protect: Annotated[bool, typer.Option("--protect", help="encrypt the identity file under your passphrase")] = False,
    identity_passphrase_file: Annotated[
        Path | None, typer.Option("--identity-passphrase-file", help="--protect: the passphrase, from a file")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A custodian's age identity: prints the public key (age1...) to give for `custody init` or a reshare."""
    from .._atomic import atomic_write_bytes
    from .._harden import read_secret_file
    from ..keys.custody import new_identity

    pw = None
    if protect:
        if identity_passphrase_file is not None:
            pw = read_secret_file(identity_passphrase_file, "--identity-passphrase-file")
        elif sys.stdin.isatty():
            pw = getpass.getpass("Passphrase for the identity file: ")
            if getpass.getpass("Repeat passphrase: ") != pw:
                raise CustodyError("the passphrases differ")
        else:
            raise CustodyError("--protect: give the passphrase with --identity-passphrase-file FILE")
    data, pub = new_identity(pw)
    atomic_write_bytes(output, data, mode=0o600)
    _emit({"recipient": pub, "identity_file": str(output), "protected": protect}, as_json, pub)


# custody changes: requested, approved by M custodians (each signs that exact statement), executed
request_app = typer.Typer(no_args_is_help=True, help="Request a custody change; M custodians must then approve it.")
custody_app.add_typer(request_app, name="request")
TtlOpt = Annotated[float, typer.Option("--ttl", help="seconds the custodians have to approve it")]
OpArg = Annotated[str, typer.Argument(help="the operation id `warden custody request` printed")]


def _request(kind: str, params: dict[str, Any], ttl: float, home: Path | None, as_json: bool, **extra: Any) -> None:
    from ..keys.agent import AgentClient

    r = AgentClient(_ws(home).root).call("request", kind=kind, params=params, ttl_seconds=ttl, **extra)
    from ..keys.quorum import Statement

    op = _plain(r["op_id"])
    msg = [f"requested {op}: {_plain(r['summary'])}",
           *(f"    {_plain(d)}" for d in Statement.from_json(r["statement"]).details()),
           f"statement digest {_plain(r['digest'])}", f"each custodian: warden custody approve {op} --custodian NAME"]
    _emit(r, as_json, msg)


@request_app.command("reshare")
def request_reshare(
    custodian: CustodianOpt,
    threshold: ThresholdOpt,
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """New custodians and/or threshold for the same root key (keys and sealed files stay as they are).
    Each new custodian is an age public key (`warden custody keygen`): the custodians approve every one."""
    custodians, _ = _custodians(custodian, ask=False)  # the agent refuses NAME=passphrase, with what to do
    params = {"threshold": threshold, "custodians": [{"name": c.name, "recipient": c.recipient} for c in custodians]}
    _request("reshare", params, ttl, home, as_json)


@request_app.command("destroy")
def request_destroy(
    key_id: Annotated[str, typer.Argument(help="KEK id")],
    version: Annotated[int | None, typer.Option("--version", help="one old version (default: all: shred)")] = None,
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Destroy one old version of a KEK, or every version (crypto-shred its models)."""
    _request("destroy", {"key_id": key_id, "version": version}, ttl, home, as_json)


@request_app.command("export")
def request_export(
    key_id: Annotated[str, typer.Argument(help="KEK id or signing key id")],
    to: Annotated[str, typer.Option("--to", help="age X25519 recipient (age1...) the key is sealed to")],
    version: Annotated[int, typer.Option("--version", help="KEK version")] = 1,
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export key material, sealed with age to one recipient (escrow, migration)."""
    _request("export", {"key_id": key_id, "version": version, "recipient": to}, ttl, home, as_json)


@request_app.command("policy")
def request_policy(
    file: Annotated[Path, typer.Argument(help="the new key-use policy (TOML; docs/CUSTODY.md)")],
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the key-use policy (who may wrap, unwrap, sign or manage which key)."""
    from ..keys.policy import Policy

    _request("policy", {"policy": Policy.load_file(file).to_json()}, ttl, home, as_json)


@request_app.command("audit")
def request_audit(
    key_use: Annotated[str, typer.Option("--key-use", help="on or off: record every wrap, unwrap and sign")],
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn the recording of key use on or off (custody events and refusals are always recorded)."""
    if key_use not in ("on", "off"):
        raise CustodyError("--key-use takes on or off")
    _request("audit", {"key_use": key_use == "on"}, ttl, home, as_json)


@custody_app.command("pending")
def custody_pending(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Custody changes waiting for approval."""
    from ..keys.agent import AgentClient
    from ..keys.quorum import Statement

    sts = [Statement.from_json(x) for x in AgentClient(_ws(home).root).call("pending")["pending"]]
    lines = [ln for st in sts for ln in (f"{_plain(st.op_id)}: {_plain(st.describe())}",
                                          *(f"    {_plain(d)}" for d in st.details()))]  # fmt: skip
    _emit([st.to_json() for st in sts], as_json, lines or "no pending custody changes")


@custody_app.command("approve")
def custody_approve(
    op_id: OpArg,
    custodian: Annotated[str, typer.Option("--custodian", help="your custodian name")],
    identity: Annotated[Path | None, typer.Option("--identity", help="your age identity file")] = None,
    digest: Annotated[str | None, typer.Option("--digest", help="approve only a statement of this digest")] = None,
    policy_file: Annotated[
        Path | None, typer.Option("--policy-file", help="a policy change: approve only if it is exactly this file")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve one requested custody change: your share (opened here) signs that exact statement."""
    from datetime import UTC, datetime

    from ..keys.agent import approve, fetch_statement

    h = _ws(home).root
    st = fetch_statement(h, op_id)
    if digest is not None and digest != st.digest:
        raise CustodyError(f"the statement's digest is {st.digest}, not the --digest given: nothing approved")
    if policy_file is not None:
        st.check_policy_file(policy_file)
    err.print(f"approving {_plain(st.op_id)}: {_plain(st.describe())} (digest {st.digest})")
    for line in st.details():
        err.print(f"    {_plain(line)}")
    r = approve(h, st, _open_share(h, custodian, identity), now=datetime.now(UTC))
    _emit(r, as_json, f"{r['approvals']} of {r['threshold']} approvals for {_plain(op_id)}")


@custody_app.command("execute")
def custody_execute(
    op_id: OpArg,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="export: write the age-sealed key here")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry out a custody change once M custodians have approved it."""
    from ..keys.agent import AgentClient
    from ..keys.provider import b64d

    r = AgentClient(_ws(home).root).call("execute", op_id=op_id)
    res = r.get("result")
    if output is not None and isinstance(res, dict) and "sealed_key" in res:
        from .._atomic import atomic_write_bytes

        atomic_write_bytes(output, b64d(res["sealed_key"], "sealed key"), mode=0o600)
        res["sealed_key"] = str(output)
    _emit(r, as_json, f"executed {_plain(r['kind'])} {_plain(op_id)}, approved by {_plain(', '.join(r['approvers']))}")


@custody_app.command("policy")
def custody_policy(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The key-use policy in force (and whether key use is audited)."""
    from ..keys.agent import AgentClient

    r = AgentClient(_ws(home).root).call("policy")
    _emit(r, as_json, [_plain(ln) for ln in json.dumps(r, indent=2, sort_keys=True).splitlines()])


@custody_app.command("workload-token")
def custody_workload_token(
    name: Annotated[str, typer.Argument(help="workload name, as in the policy's [workloads]")], as_json: JsonOpt = False
) -> None:
    """A fresh secret token for a workload, and the digest the policy file holds for it."""
    import secrets as _secrets

    from ..keys.policy import token_digest

    tok = _secrets.token_urlsafe(32)
    dig = token_digest(tok)
    msg = [f"WARDEN_WORKLOAD={_plain(name)} WARDEN_WORKLOAD_TOKEN={tok}", f'policy: {_plain(name)} = "{dig}"']
    _emit({"workload": name, "token": tok, "digest": dig}, as_json, msg)


IdleOpt = Annotated[
    float, typer.Option("--idle-seal", help="seal again after this many seconds without key use (0: never)")
]


@agent_app.command("start")
def agent_start(idle_seal: IdleOpt = 3600.0, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Start the custody agent in the background (sealed)."""
    from ..keys import agent

    pid = agent.start(_ws(home).root, idle_seal=idle_seal)
    _emit({"pid": pid}, as_json, f"agent started (pid {pid}), sealed")


@agent_app.command("stop")
def agent_stop(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stop the agent (it forgets everything)."""
    from ..keys import agent

    agent.stop(_ws(home).root)
    _emit({"ok": True, "stopped": True}, as_json, "agent stopped")


@agent_app.command("run")
def agent_run(idle_seal: IdleOpt = 3600.0, home: HomeOpt = None) -> None:
    """Run the agent in the foreground (restarted first with only paths, locale, user and WARDEN_HOME)."""
    from .._harden import agent_env, reexec_with
    from ..keys import agent

    reexec_with(agent_env())
    agent.serve(_ws(home).root, idle_seal)


