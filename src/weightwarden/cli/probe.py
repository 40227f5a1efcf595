"""`warden provenance probe URL`: is the model behind an endpoint derived from ours?  (issue 21)"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .._term import safe
from ..errors import ProbeError
from ._common import AlphaOpt, HomeOpt, JsonOpt, Table, _emit, _pfmt, _ws, err, out


def _prompts(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"--prompts {path}: cannot read it as UTF-8 text ({e}); give one prompt per line") from None
    texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise ProbeError(f"--prompts {path} holds no prompt: give one prompt per line")
    return texts


def _scorer(spec: str, ws: Any, kw: dict[str, Any]) -> Any:
    from ..provenance.endpoint import Endpoint
    from ..provenance.probe import EndpointScorer, HFScorer

    if spec.startswith(("http://", "https://")):
        return EndpointScorer(Endpoint(spec, **kw), name=spec)
    p = Path(spec)
    return HFScorer(p, name=p.name or spec, **ws.model_kw(p))


def probe_cmd(
    url: Annotated[str, typer.Argument(help="the suspect's OpenAI-compatible endpoint (http://host:port or http://host:port/v1)")],
    model: Annotated[Path, typer.Option("--model", help="our model: a transformers folder (plain or sealed)")],
    reference: Annotated[
        list[str],
        typer.Option("--reference", help="an independent reference model (folder or endpoint URL); 3 or more"),
    ],
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="candidate texts, one per line [default: sampled by the pool]")
    ] = None,
    alpha: AlphaOpt = 1e-6,
    budget: Annotated[int, typer.Option("--budget", min=0, help="most queries sent to the endpoint this run")] = 1000,
    rate: Annotated[float | None, typer.Option("--rate", help="most queries per second [default: no limit]")] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="answer cache, to resume [default: $WARDEN_HOME/probe/URL-HASH]",
                     show_default=False),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="logprobs | chat | text")] = "logprobs",
    items: Annotated[int, typer.Option("--items", min=1, help="prompts asked (text mode: x --samples)")] = 32,
    samples: Annotated[int, typer.Option("--samples", min=1, help="text mode: continuations per prompt")] = 2,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="the variable holding the endpoint's API key")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Test "the model behind URL is independent of ours" against independent reference models; print the
    p-value, the decision at --alpha, the queries used and per-prompt evidence."""
    from ..provenance.probe import MODES, probe

    if len(reference) < 3 or mode not in MODES:
        why = f"--mode must be one of {', '.join(MODES)}" if mode not in MODES else \
            f"give --reference at least 3 times (got {len(reference)}): the p-value is calibrated against them"
        err.print(f"error: {why}")  # fmt: skip
        raise typer.Exit(2)
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ProbeError(f"--api-key-env {api_key_env}: that variable is not set")
    ws = _ws(home)
    if cache is None:
        cache = ws.root / "probe" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    texts = _prompts(prompts)
    ref_kw = {"home": home, "api_key": key, "budget": budget, "rate": rate}
    ours = _scorer(str(model), ws, {})
    refs = [_scorer(r, ws, {**ref_kw, "cache": cache / f"ref{i}"}) for i, r in enumerate(reference)]
    rep = probe(url, ours, refs, mode=mode, prompts=texts, alpha=alpha, n_items=items, samples=samples, home=home,
                api_key=key, budget=budget, rate=rate, cache=cache)  # fmt: skip
    j = rep.to_json()
    if as_json:
        _emit(j, True)
        return
    t = Table("model", "role", "T")
    for n, v in j["statistic"]["ours"].items():
        t.add_row(n, "ours", f"{v:.4f}")
    for n, v in j["statistic"]["references"].items():
        t.add_row(n, "reference", f"{v:.4f}")
    out.print(t)
    served = safe(j["served_model"] or "?")
    out.print(f"{j['decision'].upper()}: p = {_pfmt(j['p_value'], j['log10_p_value'])} (alpha {alpha:g}; rank "
              f"p-value {j['rank_p_value']:.3g}, t = {j['t_statistic']:.2f}, df {j['df']}); endpoint model "
              f"{served}; {j['queries']['used']} queries sent, {j['queries']['cached']} from the cache")  # fmt: skip


def scan_endpoints_cli(endpoints: Path, model: Path | None, reference: list[str], prompts: Path | None, *,
                       mode: str, budget: int, items: int, samples: int, alpha: float, state: Path | None,
                       ray_address: str | None, workers: int | None, home: Any, as_json: bool
                       ) -> None:  # fmt: skip
    """`warden scan --endpoints FILE` (the options are `warden scan`'s): one row per endpoint."""
    from ..provenance.endpoint_scan import scan_endpoints

    if model is None or len(reference) < 3:
        err.print("error: --endpoints needs --model (our model's folder) and --reference at least 3 times")
        raise typer.Exit(2)
    rep = scan_endpoints(endpoints, model, reference, prompts=_prompts(prompts), state=state, mode=mode,
                         budget=budget, alpha=alpha, n_items=items, samples=samples, ray_address=ray_address,
                         workers=workers, home=home)  # fmt: skip
    j = rep.to_json()
    if as_json:
        _emit(j, True)
        return
    t = Table("endpoint", "url", "mode", "decision", "p-value", "queries", "error")
    for r in j["rows"]:
        q = r.get("queries") or {}
        p = _pfmt(r["p_value"], r["log10_p_value"]) if "p_value" in r else ""
        t.add_row(r["name"], r["url"], r["mode"], r.get("decision", "error" if "error" in r else ""), p,
                  f"{q.get('used', 0)} sent, {q.get('cached', 0)} cached" if q else "", r.get("error", ""))  # fmt: skip
    out.print(t)
    out.print(f"{j['endpoints']} endpoint(s), {len(j['derived'])} derived at alpha {alpha:g}, {j['errors']} error(s), "
              f"{j['resumed_from_state']} resumed from state, {j['queries_sent_this_run']} queries sent")  # fmt: skip
