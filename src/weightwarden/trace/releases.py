"""`warden release` as a library call: the checks on the master, the recipient and the output before anything is
decided; what follows the checks (the gate, the marking, the copy) is :mod:`weightwarden.trace.copies`."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, cast

import numpy as np

from .. import audit, trail
from ..audit import AuditAction
from ..errors import OutputExistsError, RecipientKeyError, UnsupportedModelError, WardenError
from ..keys.provider import KeyProvider
from ..provenance.layout import detect_layout
from ..provenance.source import TensorSource
from ..release.gate import GateDecision, ReleaseDenied, ReleaseGate
from ..sealed.detect import is_sealed_path
from .copies import release_checked
from .head import DEFAULT_HEAD, find_head
from .mark import DEFAULT_ALPHA, marked_tensors
from .master import CopyGuard, entry_tensors, inventory_plain, inventory_sealed
from .recipients import open_store
from .store import ReleaseRecord, TraceError, shown

__all__ = ["DEFAULT_LENGTH", "ENROLLED", "release"]

ENROLLED = "enrolled"  # release(recipient_key=ENROLLED): seal to the key the recipient is enrolled with

DEFAULT_LENGTH = 4096  # symbols: ≥ (pi^2/2) c^2 ln(n/eps) = 2,240 for n = 1e6, c = 4, eps = 1e-6


def _refusal(provider: KeyProvider, model_id: str, err: Exception, now: datetime | None, **detail: Any) -> None:
    provider.audit.emit(audit.event(AuditAction.RELEASE_REFUSE, "denied", subject=model_id,
                                    detail={"error": type(err).__name__, "message": str(err)[:2000], **detail},
                                    now=now))  # fmt: skip


P = ParamSpec("P")


def _in_trail(fn: Callable[P, ReleaseRecord]) -> Callable[P, ReleaseRecord]:
    """Run a release as one operation of the trail (``home``'s, or the database ``db``): the gate's decision, the
    key use and the release (or its refusal) are one append, ending with the ``release:create`` event."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kw: P.kwargs) -> ReleaseRecord:
        home, db, now = cast(Path | None, kw.get("home")), cast(str | None, kw.get("db")), kw.get("now")
        with trail.operation(home, db) as t:
            rel = fn(*args, **kw)
            t.emit(audit.event(AuditAction.RELEASE_CREATE, subject=rel.model_id, now=cast(datetime | None, now),
                               detail={"recipient": rel.recipient, "code_id": rel.code_id, "gate": rel.gate,
                                       "rules_version": rel.rules_version, "output": rel.output,
                                       "path": str(args[2] if len(args) > 2 else kw["out"]),
                                       "exclude": list(rel.exclude), "excluded_files": list(rel.excluded_files),
                                       "sealed": kw.get("seal") is not None}))  # fmt: skip
        return rel

    return wrapper


@_in_trail
def release(
    model: str | os.PathLike[str],
    recipient: str,
    out: str | os.PathLike[str],
    *,
    provider: KeyProvider,
    country: str | None,
    aliases: tuple[str, ...] = (),
    gate: ReleaseGate | None = None,
    approval: Callable[[GateDecision], Any] | None = None,
    classify_kw: dict[str, Any] | None = None,
    model_id: str | None = None,
    home: Path | None = None,
    db: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    code_length: int = DEFAULT_LENGTH,
    force: bool = False,
    seal: tuple[KeyProvider, Any] | None = None,
    hide_header: bool = False,
    recipient_key: str | None = None,
    exclude: tuple[str, ...] = (),
    master_kw: dict[str, Any] | None = None,
    head_amp: float | None = None,
    now: datetime | None = None,
) -> ReleaseRecord:
    """Write a copy of ``model`` fingerprinted for ``recipient``, and record the release.

    ``model`` (the master) is a safetensors file, a model folder, a sealed file or a sealed bundle; a
    sealed master is decrypted into memory only (``master_kw``: ``keyring`` or ``providers`` and
    ``trust`` to open it; default: ``provider`` and the trust store under ``home``).  Every file of the
    master is walked (links refused) and recognised by content: safetensors files are marked, plain text
    is copied, and anything else (PyTorch pickle / zip, numpy, GGUF, HDF5, archives, compressed or raw
    binary files) refuses the release, naming each file, unless an ``exclude`` pattern leaves it out of
    the copy (recorded with the release); so does a tensor that copies a marked one
    (:class:`~weightwarden.trace.master.CopyGuard`).

    The export-control gate decides first (``gate``, default: the one configured under ``home``) for
    ``recipient`` in ``country``; anything but ``allow`` raises :class:`ReleaseDenied` and writes nothing,
    unless ``approval`` (the broker's check of an approved release request, two-person rule) accepts the
    decision: it is called with the decision whenever given, and raises :class:`ReleaseDenied` when the
    approved request does not cover it.  The decision is an audit event on the provider's sink, with
    the rule-set version; a refusal for bad input is a ``release:refuse`` event.

    Output: ``seal`` = (key provider, signer) seals the copy from memory (a bundle for a folder), with
    its data key wrapped by that provider, or, with ``recipient_key`` (an age X25519 public key,
    ``age1…``), to the recipient's key alone, so that only their identity opens it (``warden open
    --identity``); the signer signs it either way.  Without ``seal`` the copy is written in plaintext.

    ``head_amp``: the head mark's amplitude (trace/head.py; rms logit change, 0: none), fixed per model at its
    first release; None: as recorded (0 for a new model).  Only a master with an untied output head carries it.

    The recipient's name is canonicalised (:func:`~weightwarden.trace.store.recipient_name`): one
    identity, one codeword.  The recipient and the release are recorded in one transaction, with the
    copy moved into place inside it: a release refused or failing mid-way records nothing.  The gate's
    decision, the key use and the release (or its refusal) are one append to the trail (``home``'s, or
    the database ``db``)."""
    from ..keys.age import AgeRecipientProvider, check_recipient
    from ..sealed.walk import MARKABLE, UNRECOGNISED, excluded, refuse
    from .store import recipient_name

    model, out = Path(model), Path(out)
    model_id = model_id or model.stem
    exclude = tuple(exclude)
    store = open_store(home, db)
    reader: Any = None
    try:
        if os.path.lexists(out) and not force:
            raise OutputExistsError(f"{out} exists (use force / --force)")
        name = recipient_name(recipient)
        store._model_path(model_id)  # a bad id is refused before anything is decided
        if head_amp is not None and not (math.isfinite(head_amp) and 0.0 <= head_amp <= 1.0):
            raise TraceError(f"--head-mark {head_amp}: the head mark's amplitude is a number from 0 to 1 (e.g. 0.06)")
        if recipient_key == ENROLLED:
            known = store.directory(name)
            if not known or not known["pubkey"]:
                raise RecipientKeyError(
                    f"recipient '{shown(name.display)}' has no public key on file: enroll one with `warden recipient "
                    "add NAME --pubkey age1...` or pass --recipient-key age1... (--seal seals under our own key, "
                    "--plaintext writes a plaintext copy)"
                )
            recipient_key = known["pubkey"]
        if recipient_key is not None:
            recipient_key = check_recipient(recipient_key)
            if seal is None:
                raise ValueError("recipient_key needs seal=(provider, signer): the copy is signed by our key")
            known = store.directory(name)
            if known and known["pubkey"] and known["pubkey"] != recipient_key:
                raise RecipientKeyError(
                    f"--recipient-key differs from the key recipient '{shown(known['display'])}' "
                    "is enrolled with; use `warden recipient add NAME --pubkey KEY --replace`"
                )
        if not os.path.lexists(model):
            raise FileNotFoundError(2, "No such file or directory", str(model))
        sealed_master = is_sealed_path(model)
        if sealed_master:
            from ..api import safe_open
            from ..home import default_home
            from ..keys.truststore import TrustStore

            kw = dict(master_kw or {})
            if "keyring" not in kw:
                kw.setdefault("providers", [provider])
                kw.setdefault("trust", TrustStore.load(home or default_home()))
            master_kw = kw
            reader = safe_open(model, **kw)
            entries, problems = inventory_sealed(reader), list[str]()
        else:
            master_kw = {}
            entries, problems = inventory_plain(model)
        left_out = [e.rel for e in entries if excluded(e.rel, exclude)]
        entries = [e for e in entries if not excluded(e.rel, exclude)]
        left_out += [p.split(" (", 1)[0] for p in problems if excluded(p.split(" (", 1)[0], exclude)]
        problems = [p for p in problems if not excluded(p.split(" (", 1)[0], exclude)]
        for e in entries:
            if e.kind == UNRECOGNISED:
                problems.append(f"{e.rel} (neither marked weights nor plain text: it may hold weights)")
            elif e.kind is not None and e.kind not in MARKABLE:
                problems.append(f"{e.rel} ({e.kind}: a weight format that cannot be fingerprinted)")
        src_entries = [e for e in entries if e.in_source]
        if not src_entries:
            refuse(sorted(set(problems)), f"{model} cannot be released as it is (nothing was written)")
            raise UnsupportedModelError(f"{model}: no safetensors weights to fingerprint")
        with TensorSource(model, **master_kw) as src:
            layout = detect_layout(src.shapes)
            targets = {n for n, _ in marked_tensors(layout)}
            if head_amp is None:  # as the model's record says (none for a new model)
                head_amp = store.model(model_id).head if store._model_path(model_id).exists() else DEFAULT_HEAD
            head = _head(src, layout, head_amp)
            if head_amp and head is None:
                raise TraceError(f"--head-mark {head_amp:g}: {model} has no output head of its own (tied to the input "
                                 "embedding, or none): the head mark cannot be carried; release without --head-mark")
        if head is not None:
            targets.add(head[0])  # a tensor elsewhere that copies the unmarked head is refused too
        for e in entries:  # a safetensors file the master's layout does not cover: marked if it holds targets
            if e.kind == "safetensors" and not e.in_source:
                with TensorSource(e.path) as part:  # type: ignore[arg-type]
                    if not targets & set(part.names()):
                        problems.append(f"{e.rel} (safetensors outside the model's layout: nothing to mark in it)")
        weight_files = [(e.rel, entry_tensors(e)[0]) for e in entries if e.kind == "safetensors"]
        guard = CopyGuard(targets, weight_files)
        for rel, tensors in weight_files:
            problems += guard.problems(rel, tensors)
        del weight_files
        refuse(sorted(set(problems)), f"{model} cannot be released as it is (nothing was written; exclude a "
                                      "file with --exclude PATTERN, or remove it)")  # fmt: skip
    except (WardenError, OSError, ValueError) as e:
        if reader is not None:
            reader.close()
        _refusal(provider, model_id if isinstance(model_id, str) else "", e, now, recipient=shown(str(recipient)))
        raise
    try:
        return release_checked(
            model, out, recipient, name, entries, left_out, targets, layout, sealed_master, store, guard=guard,
            provider=provider,
            country=country, aliases=aliases, gate=gate, approval=approval, classify_kw={**master_kw,
            **(classify_kw or {})}, model_id=model_id, home=home, alpha=alpha, code_length=code_length, force=force,
            seal=(AgeRecipientProvider(recipient_key, provider.audit), seal[1]) if recipient_key and seal else seal,
            hide_header=hide_header, recipient_key=recipient_key, exclude=exclude, head=head, now=now,
        )  # fmt: skip
    except ReleaseDenied:
        raise  # the gate's decision is its own audit event
    except (WardenError, OSError, ValueError) as e:  # failed mid-way: nothing written, nothing recorded
        _refusal(provider, model_id, e, now, recipient=name.display, stage="after the gate")
        raise
    finally:
        if reader is not None:
            reader.close()


def _head(src: Any, layout: Any, amp: float) -> tuple[str, float, np.ndarray | None, np.ndarray] | None:
    """(head name, amplitude, final norm gain, the master's head) when the master has an untied output head to
    carry the head mark (trace/head.py), else None: no head, amplitude 0, or a head equal to the embedding (tied)."""
    if not amp:
        return None
    found = find_head(src.shapes, layout.d_model)
    if found is None:
        return None
    name, norm = found
    if (layout.embedding is not None and src.shapes[layout.embedding] == src.shapes[name]
            and np.array_equal(np.asarray(src.get(layout.embedding)), np.asarray(src.get(name)))):  # fmt: skip
        return None
    gain = np.asarray(src.get(norm), np.float64) if norm is not None else None
    return name, float(amp), gain, np.asarray(src.get(name), np.float64)
