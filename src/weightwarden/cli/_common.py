"""What every command group shares: the options, the consoles, `_emit`, the passphrase prompts, progress
bars, the workspace a command builds its services from, and the mapping of errors to one line."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import api
from .._term import SafeConsole, safe
from .._term import SafeTable as Table  # every table escapes its cells (text from files, requests, lists)
from ..errors import KeyringError, NoSuchTensorError, WardenError
from ..keys.pubkey import parse_public_key
from ..sealed.bundle import SealedBundle
from ..workspace import Workspace

_audit_ctx: list[Any] = []
_passphrase_file: list[Path] = []  # --passphrase-file / WARDEN_PASSPHRASE_FILE (global)

out = SafeConsole()  # no markup; every string printed is escaped (weightwarden/_term.py)
err = SafeConsole(stderr=True)

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


def _error_line(e: BaseException) -> str | None:
    """The one line an error prints (None: not ours to report)."""
    if isinstance(e, NoSuchTensorError):
        return f"error: no such tensor or file: {safe(e)}"
    if isinstance(e, WardenError):
        return f"error: {type(e).__name__}: {safe(e)}"
    if isinstance(e, OSError):
        return f"error: {type(e).__name__}: {safe(e.strerror or e)} ({safe(e.filename)})"
    fmt = getattr(e, "format_message", None)  # usage errors from the CLI framework
    if fmt is not None and hasattr(e, "exit_code"):
        return f"error: {safe(fmt())}"
    return None
