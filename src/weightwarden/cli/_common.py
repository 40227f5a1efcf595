"""What every command group shares: the options, the consoles, `_emit`, the passphrase prompts, progress
bars, the workspace a command builds its services from, the mapping of errors to one line and to an exit
code (:func:`exit_code`, the one place), and the conventions every command's help follows (:class:`WardenGroup`)."""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from typer.core import TyperArgument, TyperGroup

from .. import api
from .._term import SafeConsole, SafeTable, safe
from ..errors import (
    AuditTamperedError,
    IntegrityError,
    KeyPurposeError,
    KeyringError,
    NoSuchTensorError,
    PolicyDeniedError,
    WardenError,
)
from ..keys.pubkey import parse_public_key
from ..sealed.bundle import SealedBundle
from ..workspace import Workspace

_audit_ctx: list[Any] = []
_passphrase_file: list[Path] = []  # --passphrase-file / WARDEN_PASSPHRASE_FILE (global)


class _Out(SafeConsole):
    """stdout.  When it is not a terminal (a pipe, a file, a test's capture) nothing is cut or wrapped to a
    width: a table is as wide as its cells, so key ids and other ids stay whole for `--key`, `shred`, grep."""

    def print(self, *objects: Any, **kw: Any) -> None:
        if self.is_terminal:
            return super().print(*objects, **kw)
        width, self._width = self._width, 1 << 16  # (a print's own width= is capped at the console's)
        try:
            super().print(*objects, **kw)
        finally:
            self._width = width


class Table(SafeTable):
    """Every table escapes its cells (text from files, requests, lists); on a terminal too narrow for it, a
    column folds its cells onto more lines rather than cutting them with `…` (an id is never shortened)."""

    def __init__(self, *headers: str, **kw: Any):
        super().__init__(**kw)
        for h in headers:
            self.add_column(h, overflow="fold")


out = _Out()  # no markup; every string printed is escaped (weightwarden/_term.py)
err = _Out(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report.")]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="WARDEN_HOME", help="Keyring directory.", show_default=False)
]
ProviderOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--provider", help="key provider URI: pkcs11:token=..;object=.. | awskms:///ARN | vault://MOUNT/keys/NAME"
    ),
]
SignerOpt = Annotated[
    str | None, typer.Option("--signer", help="sign with an Ed25519 key in an HSM: pkcs11:token=..;object=LABEL")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="threads that hash and decrypt (default: every core)")
]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="significance level of the decision")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="WARDEN_BROKER_STORE", help="sealed-weights folder or s3://bucket/prefix "
                 "[default: $WARDEN_HOME/broker/weights]", show_default=False),
]  # fmt: skip
# export-control facts about a model (warden classify, warden release, warden broker model)
TokensOpt = Annotated[float | None, typer.Option("--tokens", help="training tokens (compute = 6·N·D)")]
ComputeOpt = Annotated[float | None, typer.Option("--compute", help="declared training compute, FLOP")]
PublishedOpt = Annotated[bool, typer.Option("--published", help="the weights are published")]
ExpertsOpt = Annotated[int | None, typer.Option("--experts-per-token", min=1)]
AllowSampleOpt = Annotated[bool, typer.Option(
    "--allow-sample-list", help="let the gate screen against the shipped fictitious SAMPLE list (demonstrations)")]
DeclarationOpt = Annotated[Path | None, typer.Option(
    "--declaration", help="a signed training declaration (FILE and FILE.sig, by a key in release/compliance-keys)")]
BrokerDbOpt = Annotated[
    str | None,
    typer.Option("--db", envvar="WARDEN_BROKER_DB", help="SQLAlchemy URL of the broker's state and audit log "
                 "[default: sqlite:///$WARDEN_HOME/broker/broker.db]", show_default=False),
]  # fmt: skip
LogKeyOpt = Annotated[
    str | None,
    typer.Option("--log-key", envvar="WARDEN_LOG_KEY", help="the broker's own audit-log signing key: file:PATH "
                 "(encrypted, its own passphrase), pkcs11:token=..;object=LABEL or agent:LOGHOME [default: "
                 "file:$WARDEN_HOME/broker/log-key.json]", show_default=False),
]  # fmt: skip
LogKeyPassOpt = Annotated[
    Path | None,
    typer.Option("--log-key-passphrase-file", envvar="WARDEN_LOG_KEY_PASSPHRASE_FILE", show_default=False,
                 help="a file (or /dev/fd/N) holding the file log key's passphrase [default: a prompt]"),
]  # fmt: skip


def _emit(obj: Any, as_json: bool, human: str | Table | list[str] | None = None) -> None:
    """JSON, or the human text: a list is printed line by line (each line escaped on its own, so that only our
    own line breaks reach the terminal)."""
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    elif isinstance(human, list):
        for line in human:
            out.print(line)
    elif human is not None:
        out.print(human)


def _passphrase(confirm: bool = False) -> str:
    """The keyring passphrase: --passphrase-file (or WARDEN_PASSPHRASE_FILE), then WARDEN_PASSPHRASE
    (automation; long-lived processes never inherit it), then a prompt."""
    if _passphrase_file:
        from .._harden import read_secret_file

        return read_secret_file(_passphrase_file[0], "--passphrase-file")
    pw = os.environ.get("WARDEN_PASSPHRASE")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise KeyringError("give the keyring passphrase with --passphrase-file FILE (or WARDEN_PASSPHRASE_FILE)")
    pw = getpass.getpass("Keyring passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != pw:
        raise KeyringError("the passphrases differ")
    return pw


def _log_key_passphrase(pass_file: Path | None) -> Any:
    """The broker's file log key's passphrase: --log-key-passphrase-file, else a prompt."""

    def passphrase(confirm: bool) -> str:
        if pass_file is not None:
            from .._harden import read_secret_file

            return read_secret_file(pass_file, "--log-key-passphrase-file")
        if not sys.stdin.isatty():
            raise KeyringError("give the log key's passphrase with --log-key-passphrase-file FILE "
                               "(or WARDEN_LOG_KEY_PASSPHRASE_FILE)")  # fmt: skip
        pw = getpass.getpass("Log key passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != pw:
            raise KeyringError("the passphrases differ")
        return pw

    return passphrase


def _notice(text: str) -> None:
    sys.stderr.write(text + "\n")


def _ws(home: Path | None, *, db: str | None = None, store: str | None = None, audience: str | None = None,
        log_key: str | None = None, log_pass: Path | None = None) -> Workspace:  # fmt: skip
    """The workspace a command builds its services from: the home and the options it was given."""
    return Workspace(home, passphrase=_passphrase, log_key_passphrase=_log_key_passphrase(log_pass), db=db,
                     store=store, audience=audience, log_key=log_key, notice=_notice)  # fmt: skip


def _pubkey(pubkey: str | None, what: str) -> bytes:
    """An Ed25519 public key given as 64 hex digits, as base64, or as `warden key export-public` prints it."""
    if pubkey is None:
        raise WardenError(f"{what} needs the log's public key (--pubkey): the database's own cannot be trusted")
    return parse_public_key(pubkey, "--pubkey")


def _trust_keys(trust_key: list[str] | None) -> list[bytes] | None:
    """--trust-key values (base64, hex, or a file holding one) as manifest signers."""
    return [parse_public_key(k, "--trust-key", files=True) for k in trust_key] if trust_key else None


@contextlib.contextmanager
def _progress(total: int, what: str, enabled: bool, *, files: bool = False) -> Iterator[Any]:
    """A rich progress bar on stderr for operations that take over about a second
    (hidden for --json and non-terminals).  ``total`` counts bytes, or files."""
    if not enabled or total < (200 if files else 256 * 1024 * 1024) or not err.is_terminal:
        yield None
        return
    cols: tuple[Any, ...] = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    if not files:
        cols = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *cols, console=err, transient=True) as p:
        task = p.add_task(what, total=total)
        yield lambda n: p.advance(task, n)


def _sealed_size(path: Path, as_json: bool) -> int:
    """Plaintext bytes of a sealed file or bundle, for sizing a progress bar (0 when no bar is shown)."""
    if as_json or not err.is_terminal:
        return 0
    with api.open_sealed(path) as sealed:
        return sealed.data_len if isinstance(sealed, SealedBundle) else sealed.context.data_len


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _plain(text: Any) -> str:
    """Text from the agent or a file, on one line: non-printable characters shown as '?' (the consoles
    interpret no markup)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def _safe(text: str) -> str:
    """Text from files, lists or requests, escaped for the terminal (control characters, rich markup)."""
    from rich.markup import escape

    from ..sealed.walk import shown

    return escape(shown(str(text)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WardenError(f"cannot read {path.name} as JSON ({type(e).__name__})") from None


def _pfmt(p: float, log10_p: float) -> str:
    """A p-value for people: scientific while a float holds it, else its power of ten."""
    return f"{p:.2e}" if p else f"1e{log10_p:.0f}"


# -- exit codes: the one place that maps an error to one (docs/CLI.md, `warden --help`) ----------------------
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_DENIED = 0, 1, 2, 3, 4
EXIT_CODES = (
    (EXIT_OK, "ok"),
    (EXIT_ERROR, "error: bad input, I/O, a refused operation"),
    (EXIT_USAGE, "usage: an unknown command or option, a missing or malformed argument"),
    (EXIT_VERIFY, "verification failed: a tampered file, an untrusted or bad signature, an audit log or proof "
                  "that does not check out"),
    (EXIT_DENIED, "denied: a screening hit, a gate or key-use policy denial, the broker's refusal, a release "
                  "the gate refused"),
)  # fmt: skip
EPILOG = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES) + "."


def _loaded(module: str, name: str) -> type | None:
    """A class of a module that is loaded (an error can only be of a class whose module ran)."""
    m = sys.modules.get(f"weightwarden.{module}")
    return getattr(m, name, None) if m is not None else None


def exit_code(e: BaseException) -> int:
    """The exit code of a command that ended with ``e`` (the table above)."""
    code = getattr(e, "exit_code", None)
    if isinstance(code, int) and not isinstance(e, WardenError):  # typer.Exit, the framework's usage errors
        return code
    if isinstance(e, AuditTamperedError):  # (a head signed by a non-audit key included)
        return EXIT_VERIFY
    if isinstance(e, KeyPurposeError):  # a key offered for another purpose than its own: the input
        return EXIT_ERROR
    if isinstance(e, IntegrityError):  # digests, tags, signatures, untrusted signers
        return EXIT_VERIFY
    if isinstance(e, PolicyDeniedError):
        return EXIT_DENIED
    denied = _loaded("release.gate", "ReleaseDenied")
    if denied is not None and isinstance(e, denied):
        bad_input = _loaded("release.gate", "ReleaseInputError")
        return EXIT_ERROR if bad_input is not None and isinstance(e, bad_input) else EXIT_DENIED
    forbidden = _loaded("broker.errors", "Forbidden"), _loaded("broker.errors", "Unauthorized")
    if any(c is not None and isinstance(e, c) for c in forbidden):
        return EXIT_DENIED
    http = _loaded("broker.client", "BrokerHTTPError")
    if http is not None and isinstance(e, http) and getattr(e, "status", None) in (401, 403):
        return EXIT_DENIED
    return EXIT_ERROR


_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a folder in the path is a file: check the path",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EEXIST: "remove it, or choose another path",
    errno.ENOSPC: "free some disk space and run it again",
    errno.EROFS: "write somewhere writable",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def _os_line(e: OSError) -> str:
    """An I/O error as the file it concerns, what went wrong and what to do."""
    what = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    what = what[:1].lower() + what[1:]
    hint = _OS_HINTS.get(e.errno or 0)
    tail = f" ({type(e).__name__})" + (f": {hint}" if hint else "")
    if e.filename is not None:
        where = safe(os.fsdecode(e.filename))
        if e.filename2 is not None:
            where += f" -> {safe(os.fsdecode(e.filename2))}"
        return f"error: {where}: {safe(what)}{tail}"
    return f"error: {safe(what)}{tail}"


def _error_line(e: BaseException) -> str | None:
    """The one line an error prints (None: not ours to report)."""
    if isinstance(e, NoSuchTensorError):
        return f"error: no such tensor or file: {safe(e)}"
    if isinstance(e, WardenError):
        return f"error: {type(e).__name__}: {safe(e)}"
    if isinstance(e, OSError):
        return _os_line(e)
    fmt = getattr(e, "format_message", None)  # usage errors from the CLI framework
    if fmt is not None and hasattr(e, "exit_code"):
        return f"error: {safe(fmt())}"
    return None


# -- help conventions: real metavars, shown defaults, help text that is text -------------------------------
_METAVARS = {  # options whose value is not named well by the option itself
    "provider": "URI", "signer": "URI", "signer_uri": "URI", "log_key": "URI", "db": "URL", "url": "URL",
    "store": "PATH|URL", "origin": "URL", "pubkey": "KEY", "trust_key": "KEY", "rules_key": "KEY",
    "recipient_key": "AGE_KEY", "country": "CODE", "alias": "NAME", "actor": "NAME", "by": "NAME",
    "as_of": "DATE", "valid_from": "DATE", "valid_until": "DATE", "custodian": "NAME=RECIPIENT",
    "key_use": "on|off", "digest": "HEX", "log_id": "HEX", "key": "KEY_ID", "ray_address": "ADDRESS",
    "rp_id": "HOST", "request": "ID", "model_id": "ID", "exclude": "PATTERN", "parent": "NAME",
}  # fmt: skip


def _kind(param: Any) -> str:
    """What a value of this parameter is, by its type: PATH, N, NUMBER or TEXT."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None:
        return "TEXT"
    if desc.is_path or desc.is_file:
        return "PATH"
    ann = desc.annotation
    ann = (get_args(ann) or (ann,))[0] if get_origin(ann) is list else ann
    return {int: "N", float: "NUMBER"}.get(ann, "TEXT")


class _Argument(TyperArgument):
    """An argument shown as its name (SRC, NAME) with the kind of value it takes (PATH, TEXT, N)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return _kind(self)


def _conventions(cmd: Any) -> None:
    """Real metavars instead of the types' `<bool>`, `<list[str]>`; rich markup in help texts kept as text
    (so that a `[default: ...]` written in a help is shown, not swallowed as a style tag)."""
    from rich.markup import escape

    for attr in ("help", "epilog", "short_help"):
        if isinstance(getattr(cmd, attr, None), str):
            setattr(cmd, attr, escape(getattr(cmd, attr)))
    ctx = typer.Context(cmd)
    for p in [*cmd.params, cmd.get_help_option(ctx)]:
        if p is None:
            continue
        if isinstance(getattr(p, "help", None), str):
            p.help = escape(p.help)
        if p.metavar is not None:
            continue
        if isinstance(p, TyperArgument):
            p.__class__ = _Argument
            p.metavar = (p.name or "value").upper() + ("..." if p.nargs != 1 else "")
        elif getattr(p, "is_flag", False) or getattr(p, "count", False):
            p.metavar = ""  # a flag takes no value
        else:
            kind = _kind(p)
            p.metavar = _METAVARS.get(p.name or "") if kind == "TEXT" else kind
            p.metavar = p.metavar or (p.name or "value").upper()
    for sub in getattr(cmd, "commands", {}).values():
        if type(sub) is TyperGroup:
            sub.__class__ = _HelpGroup
        _conventions(sub)


class _HelpGroup(TyperGroup):
    """A group given no command prints its help and succeeds (`warden`, `warden key`): exit 0, no `error:`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            typer.echo(ctx.get_help())
            raise typer.Exit(EXIT_OK)
        return super().parse_args(ctx, args)


class WardenGroup(_HelpGroup):
    """`warden` itself: applies the help conventions to every command once, and turns an error a command
    raises into its one line on stderr and its exit code (for `main` and for a test's CliRunner alike)."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        _conventions(self)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if getattr(e, "exit_code", None) is not None and not isinstance(e, WardenError):
                raise  # the framework's usage errors: its own exit code (2)
            line = _error_line(e)
            if line is None:
                raise
            sys.stderr.write(line + "\n")
            raise typer.Exit(exit_code(e)) from None
        finally:
            while _audit_ctx:
                _audit_ctx.pop().__exit__(None, None, None)


class DefaultGroup(_HelpGroup):
    """A group whose ``default`` command takes a first word that names none of its commands
    (`warden screen NAME` is `warden screen check NAME`)."""

    default = "check"

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return self.default, self.commands[self.default], args
        return super().resolve_command(ctx, args)
