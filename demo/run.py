"""`make demo` (``python demo/run.py``): the whole life of a checkpoint, end to end, on embedded defaults.

Local keyring under 3-of-5 custody, SQLite, a local Ray, the shipped sample screening list and a
small Llama-shaped model trained here in numpy.  Every step runs the real `warden` command (shown
as it runs) or the library call behind it, and checks its result; the run exits non-zero if any
result is wrong.  Six acts:

1. custody initialised with 3 of 5 custodians, then unsealed by three of them; a re-share to the
   custodians' own age keys runs only after three of them approve that exact change;
2. a checkpoint sealed, verified without the key, loaded into memory with no plaintext on disk;
3. the model registered for provenance;
4. the broker started in a home of its own (the trust store's public keys, its log key, its
   database: no keyring, no agent socket, no passphrase); a release to a partner requested,
   decided by the export-control gate, approved by two approvers, fingerprinted from the sealed
   master, sealed to the partner's own key and streamed within its egress budget (the partner
   opens it with its key; ours cannot); a release to a listed party refused with its reasons;
5. the partner's copy leaks after fine-tuning and int4 quantisation: `warden trace` names the
   partner, `warden scan` finds the derived copy and clears two independent models; the partner's
   copy served by a rival's OpenAI-compatible API (as is, then int8): `trace_endpoint` names the
   partner from the API's answers alone, and accuses no one behind an independent model's API;
6. `warden audit verify` proves the log intact, then catches one edited row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the demo package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.table import Table

from demo.common import DemoFailure, console
from demo.steps_broker import BrokerSteps
from demo.steps_custody import CustodySteps
from demo.steps_leak import LeakSteps


class Demo(CustodySteps, BrokerSteps, LeakSteps):
    """The six acts, in order (each a mixin of :class:`demo.common.DemoBase`)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python demo/run.py", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--figures", type=Path, help="write the trace and provenance figures here (PNG)")
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401

        plot = True
    except ImportError:  # the plot extra is not installed: the demo runs without the figure
        plot = False
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="warden-demo-") as tmp:
        root = a.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        figures = (a.figures or root / "figures").resolve()
        if plot:
            figures.mkdir(parents=True, exist_ok=True)
        demo = Demo(root.resolve(), plot, figures)
        try:
            for act in (demo.custody, demo.seal, demo.register, demo.broker, demo.leak, demo.audit):
                try:
                    act()
                except DemoFailure as e:
                    demo.checks.append((act.__name__, False, str(e)))
                    console.print(f"[red]✘ {act.__name__}: {e}[/red]")
                    break
        finally:
            demo.close()
    table = Table("step", "result", "detail", title=f"summary ({time.perf_counter() - t0:.0f} s)")
    for name, ok, detail in demo.checks:
        table.add_row(name, "[green]ok[/green]" if ok else "[red]FAILED[/red]", detail)
    console.print(table)
    failed = [c for c in demo.checks if not c[1]]
    console.print("[bold green]all checks passed[/bold green]" if not failed
                  else f"[bold red]{len(failed)} failed[/bold red]")  # fmt: skip
    return 1 if failed or len(demo.checks) < 22 else 0  # every check ran


if __name__ == "__main__":
    sys.exit(main())
