"""Sealed checkpoints: `warden seal`, `open`, `verify`, `inspect`, `rewrap` and `shred`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..errors import WardenError
from ._common import (
    HomeOpt,
    JsonOpt,
    ProviderOpt,
    SignerOpt,
    Table,
    ThreadsOpt,
    _emit,
    _progress,
    _sealed_size,
    _size,
    _trust_keys,
    _ws,
    out,
)


def seal(
    src: Annotated[Path, typer.Argument(help="safetensors file, any file, or a model directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help="sealed file (or directory for a model dir)")],
    hide_header: Annotated[bool, typer.Option("--hide-header", help="encrypt names, shapes and metadata too")] = False,
    chunk_size: Annotated[int, typer.Option(help="plaintext bytes per AEAD chunk (power of two)")] = 1 << 20,
    key: Annotated[str | None, typer.Option("--key", help="KEK to wrap under (default: the keyring's)")] = None,
    provider: ProviderOpt = None,
    signer: SignerOpt = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal a checkpoint: encrypt, wrap its data key (keyring, HSM or KMS), sign its manifest."""
    ws = _ws(home)
    kr = ws.keyring
    wrap = (ws.providers(provider) or [None])[0]
    with _progress(_size(src), "sealing", not as_json) as prog:
        results = api.seal(
            src, output, keyring=kr, key=key, provider=wrap, signer=ws.signer(signer), hide_header=hide_header,
            chunk_size=chunk_size, force=force, progress=prog, home=home,
        )  # fmt: skip
    rows = [
        {"path": str(r.path), "file_id": r.file_id, "kind": r.kind, "bytes": r.data_len, "chunks": r.n_chunks,
         "signer": r.signer, "header_hidden": r.hidden}
        for r in results
    ]  # fmt: skip
    _emit({"sealed": rows}, as_json, f"sealed {len(rows)} file(s) into {output}, signed by {results[0].signer}")


def open_(
    src: Annotated[Path, typer.Argument(help="sealed file or bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the PLAINTEXT")],
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    provider: ProviderOpt = None,
    identity: Annotated[
        Path | None, typer.Option("--identity", help="a recipient's age identity file (a copy sealed to you)")
    ] = None,
    trust_key: Annotated[
        list[str] | None, typer.Option("--trust-key", help="the sender's public key (base64 or file); repeatable")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Decrypt a sealed checkpoint to a plaintext file: only when you must have one on disk.

    A released copy sealed to your age key opens with --identity FILE and the releaser's public key
    (--trust-key, or your trust store); no keyring is needed."""
    ws = _ws(home)
    if identity is not None:
        from ..keys.age import AgeIdentityProvider

        trust: Any = ws.trust(_trust_keys(trust_key))
        provs: list[Any] = [AgeIdentityProvider.from_file(identity)]
        with _progress(_sealed_size(src, as_json), "opening", not as_json) as prog:
            paths = api.unseal(src, output, providers=provs, trust=trust, force=force, progress=prog)
        _emit({"written": [str(p) for p in paths]}, as_json, f"wrote plaintext to {output}")
        return
    kr = ws.keyring
    provs = [*ws.providers(provider), kr.provider()]
    trust = ws.trust(_trust_keys(trust_key)) if trust_key else None
    with _progress(_sealed_size(src, as_json), "opening", not as_json) as prog:
        paths = api.unseal(src, output, keyring=kr, providers=provs, trust=trust, force=force, progress=prog,
                           threads=threads, home=home)
    _emit({"written": [str(p) for p in paths]}, as_json, f"wrote plaintext to {output}")


def verify(
    src: Annotated[Path, typer.Argument(help="sealed file or bundle")],
    deep: Annotated[bool, typer.Option("--deep", help="also decrypt and check every GCM tag (needs the key)")] = False,
    trust_key: Annotated[
        list[str] | None, typer.Option("--trust-key", help="trust only this public key (base64 or file); repeatable")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Check the signature and every chunk digest without any key; writes nothing.  --trust-key never
    takes an audit-log key (the broker's log key): it is refused."""
    ws = _ws(home)
    trust: Any = ws.trust(_trust_keys(trust_key))
    kr = ws.keyring if deep else None
    with _progress(_sealed_size(src, as_json), "verifying", not as_json) as prog:
        rep = api.verify(src, trust=trust, deep=deep, keyring=kr, progress=prog, threads=threads, home=home)
    _emit(rep.to_json(), as_json, f"OK: {rep.files} file(s), {rep.chunks} chunks, signed by {rep.signer}" + (
        ", every tag checked" if deep else ""))  # fmt: skip


def inspect(src: Annotated[Path, typer.Argument(help="sealed file or bundle")], as_json: JsonOpt = False) -> None:
    """Show what anyone can see without a key (names and metadata escaped: they are the file's text)."""
    info = api.inspect(src)
    if as_json:
        _emit(info, True)
        return
    for m in info.get("members", [info]):
        header = "hidden" if m["header_hidden"] else "visible"
        out.print(
            f"{m.get('name', '(hidden name)')}  {m['kind']}  {m['data_len']} bytes  "
            f"{m['n_chunks']} chunks  signer {m['signer']}  header {header}"
        )
        if m.get("metadata"):
            t = Table("metadata", "value")
            for k, v in list(m["metadata"].items())[:50]:
                t.add_row(k, v)
            out.print(t)
        if m.get("tensors"):
            t = Table("tensor", "dtype", "shape")
            for name, ti in list(m["tensors"].items())[:50]:
                t.add_row(name, ti["dtype"], str(ti["shape"]))
            out.print(t)
            if len(m["tensors"]) > 50:
                out.print(f"... {len(m['tensors']) - 50} more")


def rewrap(
    paths: Annotated[list[Path], typer.Argument(help="sealed files or bundle directories")],
    key: Annotated[str | None, typer.Option("--key", help="KEK to wrap under (default: the keyring's)")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="wrap under this provider URI instead (e.g. move keys into an HSM)")
    ] = None,
    provider: ProviderOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-wrap data keys under the KEK's current version; ciphertext stays byte-identical.
    Safe to interrupt and run again."""
    from ..sealed.members import sealed_files
    from ..sealed.rewrap import rewrap as do_rewrap

    ws = _ws(home)
    kr = ws.keyring
    files = sealed_files(paths)
    local = kr.provider(key)
    target = ws.providers([to])[0] if to else local
    sources = [*ws.providers(provider), local]
    with _progress(len(files), "rewrapping", not as_json, files=True) as prog:
        rep = do_rewrap(files, providers=sources, target=target, progress=prog)
    _emit(rep.__dict__, as_json, f"rewrapped {rep.rewrapped}, finished {rep.finished}, already current {rep.current}")


def shred(
    key_id: Annotated[str, typer.Argument(help="the model's KEK id")],
    yes: Annotated[bool, typer.Option("--yes", help="confirm: every copy sealed under it becomes unreadable")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Crypto-shred a model: destroy every version of its KEK."""
    from ..keys.provider import shred as do_shred

    if not yes:
        raise WardenError("shredding cannot be undone: add --yes")
    done = do_shred(_ws(home).keyring.provider(key_id))
    _emit({"key_id": key_id, "destroyed_versions": done}, as_json, f"shredded {key_id} (versions {done})")


