"""`warden`: a thin command line over the library API.  One command, one library call.

Every command that reports something takes ``--json``.  Any error prints one
line to stderr (naming the file, field or flag, and what to do) and exits with the code of its kind:
0 ok, 1 error, 2 usage, 3 verification failed, 4 denied (``_common.exit_code``; docs/CLI.md).

The services a command needs are built by its :class:`weightwarden.workspace.Workspace`; each module here
is one command group (``keys``, ``files``, ``custody``, ``provenance``, ``audit``, ``broker``, ``release``,
``trace``) and registers nothing itself: the registration below fixes the order `warden --help` shows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..audit import context as audit_context
from ..keys.provider import ed25519_key_id
from . import _common, audit, broker, custody, files, keys, probe, provenance, release, trace

app = typer.Typer(cls=_common.WardenGroup, add_completion=False, no_args_is_help=True,
                  help="Guard the weights of AI models.", epilog=_common.EPILOG,
                  context_settings={"show_default": True})  # fmt: skip


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("weightwarden")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree
            from .. import __version__ as v
        sys.stdout.write(f"warden {v}\n")
        raise typer.Exit(0)


@app.callback()
def _global(
    reason: Annotated[
        str, typer.Option("--reason", envvar="WARDEN_REASON", help="Why: recorded in the audit log.")
    ] = "",
    actor: Annotated[
        str | None, typer.Option("--actor", envvar="WARDEN_ACTOR", help="Who, if not the OS user.")
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            envvar="WARDEN_PASSPHRASE_FILE",
            show_default=False,
            help="Read the keyring passphrase from this file (or /dev/fd/N) instead of a prompt.",
        ),
    ] = None,
    _show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    _common._passphrase_file[:] = [passphrase_file] if passphrase_file is not None else []
    ctx = audit_context(actor=actor, reason=reason)
    ctx.__enter__()
    _common._audit_ctx.append(ctx)


# -- registration: commands first (in this order), then the groups ------------------------------
app.command()(keys.init)
app.command()(files.seal)
app.command("open")(files.open_)
app.command()(files.verify)
app.command()(files.inspect)
app.command()(files.rewrap)
app.command()(files.shred)
app.command("scan")(provenance.scan_cmd)
app.command("serve")(broker.serve_cmd)
app.command("pull")(broker.pull_cmd)
app.command("classify")(release.classify_cmd)
app.command("declare")(release.declare_cmd)
app.add_typer(release.screen_app, name="screen")
app.command("release")(release.release_cmd)
app.command("trace")(trace.trace_cmd)
app.add_typer(keys.key_app, name="key")
app.add_typer(keys.trust_app, name="trust")
app.add_typer(custody.custody_app, name="custody")
app.add_typer(custody.agent_app, name="agent")
app.add_typer(provenance.prov_app, name="provenance")
provenance.prov_app.command("probe")(probe.probe_cmd)
provenance.prov_app.add_typer(probe.order_app, name="order")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(broker.broker_app, name="broker")
app.add_typer(release.license_app, name="license")
app.add_typer(release.recipient_app, name="recipient")


def main(argv: list[str] | None = None) -> int:
    cmd = typer.main.get_command(app)
    try:
        rc = cmd.main(args=argv, prog_name="warden", standalone_mode=False)  # an Exit's code, or None
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        return _common.EXIT_ERROR
    except Exception as e:
        line = _common._error_line(e)
        if line is None:
            raise
        sys.stderr.write(line + "\n")
        return _common.exit_code(e)
    finally:
        while _common._audit_ctx:
            _common._audit_ctx.pop().__exit__(None, None, None)
    return rc if isinstance(rc, int) else _common.EXIT_OK


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


__all__ = ["app", "ed25519_key_id", "main"]
