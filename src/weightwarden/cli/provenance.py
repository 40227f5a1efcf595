"""Clone detection: `warden provenance ...` (compare, register, identify, list, remove) and `warden scan`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress

from ._common import AlphaOpt, HomeOpt, JsonOpt, Table, _emit, _pfmt, _ws, err, out

prov_app = typer.Typer(no_args_is_help=True, help="Is a model derived from one of ours? (p-values, registry)")
RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="registry folder [default: $WARDEN_HOME/provenance]", show_default=False),
]


def _evidence_table(c: Any) -> Table:
    t = Table("ref layer", "suspect layer", "p-value", "rho", "agree", "cos in", "cos out")
    for e in c.layers:
        t.add_row(str(e.reference_layer), str(e.suspect_layer), _pfmt(e.p_value, e.log_p / 2.302585),
                  f"{e.rho:.3f}", f"{e.agreement:.2f}", f"{e.cos_in:.3f}", f"{e.cos_out:.3f}")  # fmt: skip
    return t


def _verdict(j: dict[str, Any]) -> str:
    p = _pfmt(j["p_value"], j["log10_p_value"])
    shared = ", ".join(j["shared_ranges"]) or "none"
    return f"{j['decision'].upper()}: p = {p} (alpha {j['alpha']:g}); shared reference layers: {shared}"


@prov_app.command("compare")
def prov_compare(
    suspect: Annotated[Path, typer.Argument(help="suspect checkpoint: .safetensors, HF folder, sealed file/bundle")],
    reference: Annotated[Path, typer.Argument(help="reference checkpoint (ours)")],
    alpha: AlphaOpt = 1e-6,
    plot: Annotated[Path | None, typer.Option("--plot", help="also write a PNG figure here (needs matplotlib)")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Test "SUSPECT and REFERENCE were initialised independently"; print the p-value and per-layer evidence."""
    from ..provenance import compare

    ws = _ws(home)
    c = compare(suspect, reference, alpha=alpha, home=home, **ws.model_kw(reference) or ws.model_kw(suspect))
    j = c.to_json()
    if plot is not None:
        from ..plots import compare_plot

        compare_plot(c, plot)
    if as_json:
        _emit(j, True)
    else:
        out.print(_evidence_table(c))
        out.print(_verdict(j))


@prov_app.command("register")
def prov_register(
    model: Annotated[Path, typer.Argument(help="a protected checkpoint")],
    name: Annotated[str, typer.Option("--name", help="name to report it under")],
    replace: Annotated[bool, typer.Option("--replace", help="overwrite an entry of that name")] = False,
    parent: Annotated[
        str | None, typer.Option("--parent", help="its registered parent (checked by the test)", show_default=False)
    ] = None,
    no_lineage: Annotated[bool, typer.Option("--no-lineage", help="record no registered parent")] = False,
    reference: Annotated[
        bool, typer.Option("--reference", help="an independent model (not ours) that calibrates probes through an "
                           "API; never a candidate of identify or scan")
    ] = False,
    alpha: AlphaOpt = 1e-6,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a compact signature of MODEL in the registry (not its weights), with its registered parent."""
    ws = _ws(home)
    reg = ws.registry(registry)
    sig = reg.register(model, name, replace=replace, parent=parent, lineage=not no_lineage, alpha=alpha,
                       reference=reference, **ws.model_kw(model))  # fmt: skip
    up = reg.parent_of(name)
    role = "reference" if reference else "protected"
    _emit({"registered": name, "role": role, "layers": len(sig.blocks), "registered_parent": up,
           "registry_size": len(reg)}, as_json,
          f"registered {name} as {role} ({len(sig.blocks)} MLP blocks, parent: {up or 'none'}); "
          f"registry holds {len(reg)} model(s)")  # fmt: skip


@prov_app.command("identify")
def prov_identify(
    suspect: Annotated[Path, typer.Argument(help="suspect checkpoint")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="candidates given the exact test")] = 10,
    alpha: AlphaOpt = 1e-6,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rank registered models against SUSPECT, with p-values corrected for the registry's size."""
    ws = _ws(home)
    reg = ws.registry(registry)
    res = reg.identify(suspect, top_k=top_k, alpha=alpha, **ws.model_kw(suspect))
    j = res.to_json()
    if as_json:
        _emit(j, True)
        return
    t = Table("model", "decision", "p-value (corrected)", "shared layers", "similarity", "lineage")
    for m in j["matches"]:
        lin = m.get("lineage", {})
        beta = ""
        if "could_be_parent" in lin:
            kind = "could be parent" if lin["could_be_parent"] else "sibling-like"
            beta = f"{kind} (cos {lin['cos_angle_at_candidate']:.2f} from {lin['registered_parent']})"
        t.add_row(m["name"], m["decision"], _pfmt(m["p_value"], m["log10_p_value"]), ", ".join(m["shared_ranges"]),
                  f"{m['similarity']:.3f}", beta)  # fmt: skip
    out.print(t)
    out.print(f"derived from: {j['derived_from'] or 'none of the registered models'}")


@prov_app.command("list")
def prov_list(registry: RegistryOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Registered models."""
    facts = _ws(home).registry(registry).facts()
    t = Table("name", "role", "family", "layers", "d_model", "params", "registered parent")
    for f in facts:
        up = f.get("parent") or {}
        t.add_row(f["name"], f.get("role", "protected"), f["family"], str(f["layers"]), str(f["d_model"]),
                  str(f["params"]), up.get("name", ""))  # fmt: skip
    _emit({"models": facts}, as_json, t)


@prov_app.command("remove")
def prov_remove(name: str, registry: RegistryOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Forget a registered model."""
    _ws(home).registry(registry).remove(name)
    _emit({"ok": True, "removed": name}, as_json, f"removed {name}")


def scan_cmd(
    where: Annotated[
        list[str] | None, typer.Argument(help="folders of checkpoints, list files, or s3://bucket/prefix")
    ] = None,
    endpoints: Annotated[
        Path | None,
        typer.Option("--endpoints", help="probe the endpoints this file lists instead (JSON lines, JSON or TOML; "
                     "needs --model and 3+ --reference)", show_default=False),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="--endpoints: our model (a folder or its registered "
                                              "name)")] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option("--reference", metavar="PATH", help="--endpoints: an independent reference model folder or "
                     "registered name [default: the registry's references]"),
    ] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="--endpoints: candidate texts, one a line")] = None,
    mode: Annotated[str, typer.Option("--mode", help="--endpoints: logprobs | chat | text (an entry's own wins)")
                    ] = "logprobs",
    budget: Annotated[int, typer.Option("--budget", min=0, help="--endpoints: queries per endpoint, unless its "
                                        "entry gives one")] = 1000,
    items: Annotated[int, typer.Option("--items", min=1, help="--endpoints: prompts asked per endpoint")] = 32,
    samples: Annotated[int, typer.Option("--samples", min=1, help="--endpoints: text mode, samples per prompt")] = 2,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="an existing Ray cluster [default: a local one]")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="CPUs of the local Ray")] = None,
    allow_private_endpoints: Annotated[
        bool, typer.Option("--allow-private-endpoints", help="--endpoints: let the file name loopback, private or "
                           "link-local hosts (your own test servers); refused by default")
    ] = False,
    state: Annotated[
        Path | None,
        typer.Option("--state", help="resume file (--endpoints: folder) [default: under $WARDEN_HOME/scan]"),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1)] = 10,
    alpha: AlphaOpt = 1e-6,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report every checkpoint derived from a registered model, or (--endpoints) every endpoint serving a model
    derived from --model; rerun with the same state to resume."""
    from ..provenance import scan

    if (endpoints is None) == (not where):
        err.print("error: give folders, list files or s3:// prefixes to scan, or --endpoints FILE (not both)")
        raise typer.Exit(2)
    if endpoints is not None:
        from .probe import scan_endpoints_cli

        scan_endpoints_cli(endpoints, model, reference or [], prompts, mode=mode, budget=budget, items=items,
                           samples=samples, alpha=alpha, state=state, ray_address=ray_address, workers=workers,
                           home=home, as_json=as_json, allow_private=allow_private_endpoints,
                           registry=registry)  # fmt: skip
        return
    assert where is not None
    reg = _ws(home).registry(registry)
    bar: list[Any] = []
    with contextlib.ExitStack() as stack:

        def progress(done: int, total: int) -> None:
            if as_json or not err.is_terminal:
                return
            if not bar:
                p = stack.enter_context(Progress(transient=True, console=err))
                bar.append((p, p.add_task("scanning", total=total)))
            bar[0][0].update(bar[0][1], completed=done, total=total)

        rep = scan(where, reg.root, state=state, ray_address=ray_address, workers=workers, top_k=top_k, alpha=alpha,
                   on_progress=progress, home=home)  # fmt: skip
    j = rep.to_json()
    if as_json:
        _emit(j, True)
        return
    t = Table("item", "derived from", "p-value", "shared layers")
    for d in j["derived"]:
        t.add_row(d["item"], d["derived_from"], _pfmt(d["p_value"], d["log10_p_value"]),
                  ", ".join(d["shared_ranges"]))  # fmt: skip
    out.print(t)
    out.print(f"{j['items']} item(s), {len(j['derived'])} derived, {len(j['errors'])} error(s), "
              f"{j['resumed_from_state']} resumed from state")  # fmt: skip


