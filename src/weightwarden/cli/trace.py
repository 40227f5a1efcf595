"""Tracing a leaked copy to its recipient: `warden trace`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import BrokerDbOpt, HomeOpt, JsonOpt, Table, _emit, _safe, _ws, out


def trace_cmd(
    suspect: Annotated[Path, typer.Argument(help="the leaked copy")],
    model: Annotated[Path, typer.Option("--model", help="the original it was released from")],
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="[default: the model's file or folder name]")
    ] = None,
    eps: Annotated[float, typer.Option("--eps", help="bound on accusing any innocent recipient")] = 1e-6,
    population: Annotated[
        int | None, typer.Option("--population", help="n for the bound [default: recipients]")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="the public checkpoint MODEL was fine-tuned from: undo a blend toward it"),
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="also write a PNG figure here (needs matplotlib)")] = None,
    db: BrokerDbOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the recipient(s) whose fingerprint SUSPECT carries, or say that no one can be accused."""
    from ..trace import trace

    ws = _ws(home, db=db)
    kr = ws.keyring
    rep = trace(suspect, model, provider=kr.provider(purpose="tracing"), model_id=model_id, home=home, db=db, eps=eps,
                population=population, base=base, **(ws.model_kw(suspect, kr) or ws.model_kw(model, kr)))  # fmt: skip
    j = rep.to_json()
    if plot is not None:
        from ..plots import trace_plot

        trace_plot(rep, plot)
    if as_json:
        _emit(j, True)
        return
    t = Table("recipient", "score", "accused", "false-accusation bound")
    acc = {a["recipient"]: a for a in rep.accused}
    for r in rep.ranking:
        a = acc.get(r["recipient"])
        t.add_row(_safe(r["recipient"]), f"{r['score']:.1f}", "yes" if a else "no",
                  f"{a['false_accusation_bound']:.2e}" if a else "")  # fmt: skip
    out.print(t)
    out.print(f"{j['decision']} (threshold {j['threshold']:.1f}, eps {eps:g}, {rep.recipients} recipients)")
