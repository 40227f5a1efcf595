"""Tracing a leaked copy to its recipient: `warden trace`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import BrokerDbOpt, HomeOpt, JsonOpt, Table, _emit, _safe, _ws, err, out


def trace_cmd(
    suspect: Annotated[
        Path | None, typer.Argument(help="the leaked copy (or give --endpoint)", show_default=False)
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="the original it was released from", show_default=False)
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="trace the copy an OpenAI-compatible endpoint serves (URL), not a file",
            show_default=False,
        ),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="[default: the model's file or folder name]")
    ] = None,
    eps: Annotated[float, typer.Option("--eps", help="bound on accusing any innocent recipient")] = 1e-6,
    population: Annotated[
        int | None, typer.Option("--population", help="n for the bound [default: recipients]")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="the public checkpoint MODEL was fine-tuned from: undo a blend toward it "
                     "(weights), or fit a projection of the head onto its head's columns (--endpoint)"),
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="also write a PNG figure here (needs matplotlib)")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="--endpoint: texts to echo, one per line [default: sampled by the master]"),
    ] = None,
    queries: Annotated[int, typer.Option("--queries", min=1, help="--endpoint: prompts asked (one query each)")] = 48,
    budget: Annotated[int, typer.Option("--budget", min=0, help="--endpoint: most queries sent this run")] = 1000,
    top: Annotated[
        int, typer.Option("--top", min=1, max=20, help="--endpoint: alternatives asked per token (the server's cap)")
    ] = 20,
    rate: Annotated[float | None, typer.Option("--rate", help="--endpoint: most queries per second")] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="--endpoint: answer cache, to resume [default: $WARDEN_HOME/trace/URL-HASH]",
            show_default=False,
        ),
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="--endpoint: the variable holding its API key")
    ] = None,
    db: BrokerDbOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the recipient(s) whose fingerprint SUSPECT (or the model --endpoint serves) carries, or say that no
    one can be accused."""
    from ..trace import trace

    if (suspect is None) == (endpoint is None) or model is None:
        err.print("error: give exactly one of SUSPECT and --endpoint URL, and --model MASTER")
        raise typer.Exit(2)
    ws = _ws(home, db=db)
    kr = ws.keyring
    if endpoint is not None:
        rep = _via_endpoint(ws, endpoint, model, model_id=model_id, db=db, home=home, eps=eps, population=population,
                            prompts=prompts, queries=queries, budget=budget, rate=rate, cache=cache,
                            api_key_env=api_key_env, top=top, base=base)  # fmt: skip
    else:
        assert suspect is not None
        rep = trace(suspect, model, provider=kr.provider(purpose="tracing"), model_id=model_id, home=home, db=db,
                    eps=eps, population=population, base=base,
                    **(ws.model_kw(suspect, kr) or ws.model_kw(model, kr)))  # fmt: skip
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
    if rep.endpoint is not None:
        e = rep.endpoint
        out.print(f"endpoint model {_safe(str(e['served_model']))}: {e['queries']} queries sent, {e['cached']} from "
                  "the cache")  # fmt: skip


def _via_endpoint(ws: Any, url: str, model: Path, *, model_id: str | None, db: str | None, home: Path | None,
                  eps: float, population: int | None, prompts: Path | None, queries: int, budget: int,
                  rate: float | None, cache: Path | None, api_key_env: str | None, top: int = 20,
                  base: Path | None = None) -> Any:  # fmt: skip
    from ..errors import ProbeError
    from ..trace.endpoint import trace_endpoint
    from .probe import _prompts

    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ProbeError(f"--api-key-env {api_key_env}: that variable is not set")
    if cache is None:
        cache = ws.root / "trace" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    kr = ws.keyring
    return trace_endpoint(url, model, provider=kr.provider(purpose="tracing"), keyring=ws.model_kw(model, kr).get(
                          "keyring"), model_id=model_id, home=home, db=db, eps=eps, population=population,
                          prompts=_prompts(prompts), n_prompts=queries, api_key=key, budget=budget, rate=rate,
                          cache=cache, top=top, base=base)  # fmt: skip
