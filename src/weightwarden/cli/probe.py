"""`warden provenance probe URL`: is the model behind an endpoint derived from ours?  (issue 21)
`warden provenance order add|list`: training orders sealed in the home (the exact order test)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .._term import safe
from ..errors import ProbeError
from ._common import AlphaOpt, HomeOpt, JsonOpt, Table, _emit, _pfmt, _ws, err, out
from .provenance import RegistryOpt


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


def _api_key(env: str | None) -> str | None:
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ProbeError(f"--api-key-env {env}: that variable is not set")
    return key


def _looks_like_path(spec: str) -> bool:
    """A path, not a registered name: it holds a path separator or starts with '.' or '~'."""
    return any(sep and sep in spec for sep in ("/", os.sep, os.altsep)) or spec.startswith((".", "~"))


def _resolve(spec: str, ws: Any, registry: Path | None) -> Path:
    """A folder or a registered name: a registered name wins over a folder of that name in the working
    directory (write ``./NAME`` for the folder); an argument that looks like a path is always a path."""
    if _looks_like_path(spec):
        return Path(spec).expanduser()
    reg = ws.registry(registry)
    if spec in reg.names() or not Path(spec).exists():
        return Path(reg.model_path(spec))
    return Path(spec)


def _model(spec: str, ws: Any, registry: Path | None) -> tuple[Path, str]:
    """``--model``: a folder (its name names it), or the name of a model in the provenance registry (where it
    was registered from); a registered name wins unless ``spec`` looks like a path."""
    p = _resolve(spec, ws, registry)
    return p, (p.name or spec) if _looks_like_path(spec) else spec


def _references(given: list[str], ws: Any, registry: Path | None, default: bool) -> list[str]:
    """``--reference``: endpoint URLs, folders, or names of models in the registry (a registered name wins unless
    the argument looks like a path); none given (and ``default``): every model registered as a reference
    (``warden provenance register --reference``)."""
    if not given and default:
        reg = ws.registry(registry)
        return [str(reg.model_path(n)) for n in reg.references()]
    return [r if r.startswith(("http://", "https://")) else str(_resolve(r, ws, registry)) for r in given]


def _order(path: Path | None, name: str, ws: Any) -> Any:
    """The training order: ``--order FILE``, else the one registered under the model's name, else None."""
    from ..provenance.order import OrderStore, TrainingOrder

    if path is not None:
        return TrainingOrder.load(path)
    store = OrderStore(ws.root / "provenance" / "orders")
    try:
        if not store.has(name):
            return None
    except ProbeError:  # a folder name no order can have
        return None
    return store.get(name, ws.keyring.provider(purpose="tracing"))


def _order_probe(url: str, the_order: Any, reference: list[str], ws: Any, *, mode: str, alpha: float, items: int,
                 samples: int | None, cuts: int, budget: int, rate: float | None, cache: Path | None,
                 api_key_env: str | None, home: Any, as_json: bool, temperature: float = 1.0) -> None:  # fmt: skip
    from ..provenance.ordertest import ORDER_MODES, TEXT_SAMPLES, order_probe

    if mode not in ORDER_MODES:
        err.print(f"error: --mode must be one of {', '.join(ORDER_MODES)} with a training order")
        raise typer.Exit(2)
    key = _api_key(api_key_env)
    if cache is None:
        cache = ws.root / "probe" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16] / "order"
    ref_kw = {"home": home, "api_key": key, "budget": budget, "rate": rate}
    norms = [_scorer(r, ws, {**ref_kw, "cache": cache / f"ref{i}"}) for i, r in enumerate(reference)]
    rep = order_probe(url, the_order, normalisers=norms, mode=mode, alpha=alpha, n_items=items, home=home,
                      samples=samples or TEXT_SAMPLES, cuts=cuts, temperature=temperature, api_key=key,
                      budget=budget, rate=rate, cache=cache)  # fmt: skip
    j = rep.to_json()
    if as_json:
        _emit(j, True)
        return
    st = j["statistic"]
    served = safe(j["served_model"] or "?")
    out.print(f"{j['decision'].upper()}: p = {_pfmt(j['p_value'], j['log10_p_value'])} (alpha {alpha:g}; training-"
              f"order test, {j['p_method']}); U = {st['u']:g}, AUC {st['auc']:.3f} over the {j['order']['latest']} "
              f"latest and {j['order']['earliest']} earliest of {j['order']['examples']} examples; endpoint model "
              f"{served}; {j['queries']['used']} queries sent, {j['queries']['cached']} from the cache")  # fmt: skip


order_app = typer.Typer(no_args_is_help=True, help="Training orders sealed in the home (the exact order test)")


@order_app.command("add")
def order_add(
    name: Annotated[str, typer.Argument(help="the model's name: its folder's name, as `probe --model` gives it")],
    file: Annotated[Path, typer.Option("--file", help="the order file (TrainingOrder.save: the examples in the "
                                       "order they were seen)")],
    replace: Annotated[bool, typer.Option("--replace", help="replace an order registered under NAME")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal a training order in the home (AES-256-GCM, its key wrapped by the keyring's tracing KEK); shred the
    plain file afterwards."""
    from ..provenance.order import TrainingOrder, default_order_store

    the_order = TrainingOrder.load(file)
    ws = _ws(home)
    path = default_order_store(ws.root).add(name, the_order, ws.keyring.provider(purpose="tracing", create=True),
                                            replace=replace)  # fmt: skip
    n = len(the_order.examples)
    _emit({"name": name, "examples": n, "shuffled": the_order.shuffled, "sealed": str(path)}, as_json,
          f"sealed the training order of {safe(name)} ({n} examples) in {safe(str(path))}")


@order_app.command("list")
def order_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The names with a sealed training order (no key needed)."""
    from ..provenance.order import default_order_store

    names = default_order_store(_ws(home).root).names()
    _emit({"orders": names}, as_json, [safe(n) for n in names] or ["no training order"])


def _scorer(spec: str, ws: Any, kw: dict[str, Any]) -> Any:
    from ..provenance.endpoint import Endpoint
    from ..provenance.probe import EndpointScorer, HFScorer

    if spec.startswith(("http://", "https://")):
        return EndpointScorer(Endpoint(spec, **kw), name=spec)
    p = Path(spec)
    return HFScorer(p, name=p.name or spec, **ws.model_kw(p))


def probe_cmd(
    url: Annotated[str, typer.Argument(help="the suspect's OpenAI-compatible endpoint (http://host:port or http://host:port/v1)")],
    model: Annotated[str, typer.Option("--model", help="our model: a transformers folder (plain or sealed), or "
                                       "its name in the provenance registry")],
    reference: Annotated[
        list[str] | None,
        typer.Option("--reference", help="an independent reference model (folder, endpoint URL or registered "
                     "name); 3 or more without an order [default: the registry's references]; with one, optional "
                     "normalisers (never trained on that order)"),
    ] = None,
    order: Annotated[
        Path | None,
        typer.Option("--order", help="our model's training order (a file; else the order registered under the "
                     "--model's name): the exact training-order test", show_default=False),
    ] = None,
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
    items: Annotated[int, typer.Option("--items", min=1, help="prompts asked (with --order: examples asked; text "
                                       "mode: x --samples, and x --cuts with --order)")] = 32,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="text mode: continuations per prompt "
                                                "[default: 2; with --order: 8, at temperature 1]",
                                                show_default=False)] = None,
    cuts: Annotated[int, typer.Option("--cuts", min=1, help="text mode with --order: prompts per example (cut at "
                                      "word starts)")] = 8,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=2.0,
                                               help="text mode with --order: sampling temperature; 0 = one greedy "
                                               "continuation per cut (--samples ignored)")] = 1.0,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="the variable holding the endpoint's API key")
    ] = None,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Test "the model behind URL is independent of ours": with our training order (--order, or one registered
    under the model's name) by the exact training-order test, else against independent reference models; print
    the p-value, the decision at --alpha, the queries used and the evidence."""
    from ..provenance.probe import MODES, probe

    ws = _ws(home)
    model_path, model_name = _model(model, ws, registry)
    the_order = _order(order, model_name, ws)
    reference = _references(reference or [], ws, registry, default=the_order is None)
    if the_order is not None:
        _order_probe(url, the_order, reference, ws, mode=mode, alpha=alpha, items=items, samples=samples, cuts=cuts,
                     budget=budget, rate=rate, cache=cache, api_key_env=api_key_env, home=home,
                     as_json=as_json, temperature=temperature)  # fmt: skip
        return
    if len(reference) < 3 or mode not in MODES:
        why = f"--mode must be one of {', '.join(MODES)}" if mode not in MODES else \
            f"give --reference at least 3 times (got {len(reference)}): the p-value is calibrated against them; " \
            "or give our training order (--order FILE) for the exact test"
        err.print(f"error: {why}")  # fmt: skip
        raise typer.Exit(2)
    key = _api_key(api_key_env)
    if cache is None:
        cache = ws.root / "probe" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    texts = _prompts(prompts)
    ref_kw = {"home": home, "api_key": key, "budget": budget, "rate": rate}
    ours = _scorer(str(model_path), ws, {})
    refs = [_scorer(r, ws, {**ref_kw, "cache": cache / f"ref{i}"}) for i, r in enumerate(reference)]
    rep = probe(url, ours, refs, mode=mode, prompts=texts, alpha=alpha, n_items=items, samples=samples or 2, home=home,
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


def scan_endpoints_cli(endpoints: Path, model: str | None, reference: list[str], prompts: Path | None, *,
                       mode: str, budget: int, items: int, samples: int, alpha: float, state: Path | None,
                       ray_address: str | None, workers: int | None, home: Any, as_json: bool,
                       allow_private: bool = False, registry: Path | None = None) -> None:  # fmt: skip
    """`warden scan --endpoints FILE` (the options are `warden scan`'s): one row per endpoint."""
    from ..provenance.endpoint_scan import scan_endpoints

    ws = _ws(home)
    if model is not None:
        reference = _references(reference, ws, registry, default=True)
    if model is None or len(reference) < 3:
        err.print("error: --endpoints needs --model (our model's folder or registered name) and --reference at least "
                  "3 times (or 3 models registered with --reference)")  # fmt: skip
        raise typer.Exit(2)
    ours = _model(model, ws, registry)[0]
    rep = scan_endpoints(endpoints, ours, reference, prompts=_prompts(prompts), state=state, mode=mode,
                         budget=budget, alpha=alpha, n_items=items, samples=samples, ray_address=ray_address,
                         workers=workers, home=home, allow_private=allow_private)  # fmt: skip
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
