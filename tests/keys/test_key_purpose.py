"""One key, one purpose (issue 16): sealing, audit-log and export-rules keys are separate, every
signature carries its purpose's label, trust entries carry a purpose that is never widened silently,
and tracing secrets have a KEK of their own.  Each attack is tried and must fail with a typed error,
changing nothing."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

import weightwarden as ww
from tests.support.cli import PASSPHRASE, warden
from weightwarden.errors import KeyNotFoundError, KeyPurposeError, UntrustedSignerError
from weightwarden.keys import Ed25519Signer
from weightwarden.keys.provider import b64e, purpose_message
from weightwarden.keys.truststore import TrustStore
from weightwarden.sealed import SealedFile
from weightwarden.sealed import format as F


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resigned(src: Path, dst: Path, signer: Ed25519Signer, *, block_purpose: str, label: str) -> Path:
    """``src`` with its manifest signed by ``signer`` under ``label``; the block says ``block_purpose``."""
    with SealedFile(src) as sf:
        msg = F.signed_message(sf.preamble, sf.context.sha256, bytes(sf.digests))
        off = sf.layout.sig_off
    sig = signer._sign(purpose_message(label, msg))
    block = F.canon({"alg": "ed25519", "key_id": signer.key_id, "public_key": b64e(signer.public_key),
                     "purpose": block_purpose, "signature": b64e(sig)})  # fmt: skip
    dst.write_bytes(src.read_bytes()[:off] + struct.pack("<I", len(block)) + block)
    return dst


def test_the_keyring_holds_one_key_per_purpose(tmp_path: Path, keyring: ww.Keyring) -> None:
    sealing = keyring.signer()
    assert sealing.purpose == "sealing"
    with pytest.raises(KeyNotFoundError, match="audit-log"):
        keyring.signer(purpose="audit-log")  # not made until a log needs one
    log_key = keyring.signer(purpose="audit-log", create=True)
    assert log_key.purpose == "audit-log" and log_key.key_id != sealing.key_id
    again = ww.Keyring.unlock(keyring.home, PASSPHRASE)  # made once, and saved
    assert again.signer(purpose="audit-log").key_id == log_key.key_id
    assert again.signer().key_id == sealing.key_id
    with pytest.raises(KeyPurposeError, match="not a 'sealing' key"):
        again.signer(log_key.key_id, purpose="sealing")
    with pytest.raises(KeyPurposeError):
        again.signer(sealing.key_id, purpose="audit-log")
    assert again.trust.purpose(log_key.key_id) == "audit-log" and again.trust.purpose(sealing.key_id) == "sealing"
    kinds = {(k["kind"], k["purpose"]) for k in again.list_keys()}
    assert kinds == {("kek", "sealing"), ("signing", "sealing"), ("signing", "audit-log")}
    # the same message signed by each key verifies under its own label only
    m = b"one message"
    s1, s2 = sealing.sign(m), log_key.sign(m)
    from weightwarden.keys.provider import verify_purpose

    verify_purpose(sealing.public_key, "sealing", m, s1)
    verify_purpose(log_key.public_key, "audit-log", m, s2)
    with pytest.raises(KeyPurposeError):
        verify_purpose(log_key.public_key, "sealing", m, s2)


def test_a_manifest_signed_by_an_audit_log_key_is_refused(tmp_path: Path, st_file: Path,
                                                          keyring: ww.Keyring) -> None:  # fmt: skip
    """The broker's audit-log key (an online key) cannot make a checkpoint that verify, safe_open or
    load accept: neither with a block that says so, nor one that claims "sealing" over a signature
    made under the audit-log label, nor by being trusted for its own purpose."""
    good = tmp_path / "m.wws"
    ww.seal(st_file, good, keyring=keyring)
    log_key = keyring.signer(purpose="audit-log", create=True)
    forged = [
        _resigned(good, tmp_path / "a.wws", log_key, block_purpose="audit-log", label="audit-log"),
        _resigned(good, tmp_path / "b.wws", log_key, block_purpose="sealing", label="audit-log"),
    ]
    for path in forged:
        before = _digest(path)
        with pytest.raises(KeyPurposeError):
            ww.verify(path, keyring=keyring)
        with pytest.raises(KeyPurposeError):
            ww.safe_open(path, keyring=keyring)
        with pytest.raises(KeyPurposeError):
            ww.load(path, keyring=keyring)
        with pytest.raises(KeyPurposeError):
            ww.verify(path, trust=[log_key.public_key])  # even from a caller who names the key
        out = tmp_path / "plain.safetensors"
        with pytest.raises(KeyPurposeError):
            ww.unseal(path, out, keyring=keyring)
        assert not out.exists() and _digest(path) == before
    # the label is in the message: the block's claim alone does not pass
    ok = _resigned(good, tmp_path / "c.wws", keyring.signer(), block_purpose="sealing", label="sealing")
    ww.verify(ok, keyring=keyring)
    # and the writer will not sign with it at all (nothing written)
    with pytest.raises(KeyPurposeError):
        ww.seal(st_file, tmp_path / "d.wws", keyring=keyring, signer=log_key)
    with pytest.raises(KeyPurposeError):
        ww.seal(st_file.parent, tmp_path / "bundle", keyring=keyring, signer=log_key)
    assert not (tmp_path / "d.wws").exists() and not (tmp_path / "bundle").exists()
    assert not list(tmp_path.glob(".ww-tmp*"))


def test_a_trust_entry_purpose_is_not_widened_by_adding_the_key_again(tmp_path: Path) -> None:
    key = Ed25519Signer.generate("audit-log")
    ts = TrustStore(tmp_path / "trusted.json")
    kid = ts.add(key.public_key, "the broker's log", purpose="audit-log")
    ts.save()
    before = (tmp_path / "trusted.json").read_bytes()
    for purpose in ("sealing", "legacy-sealing", "export-rules"):
        with pytest.raises(KeyPurposeError, match="already trusted for 'audit-log'"):
            ts.add(key.public_key, "now it seals too", purpose=purpose)
    assert ts.purpose(kid) == "audit-log"
    ts.save()
    assert (tmp_path / "trusted.json").read_bytes() == before  # nothing changed
    ts.add(key.public_key, "relabelled", purpose="audit-log")  # same purpose: a new label is fine
    with pytest.raises(KeyPurposeError, match="not one of"):
        ts.add(key.public_key, "", purpose="anything")
    ts.remove(kid)  # explicit: remove, then trust for another purpose
    ts.add(key.public_key, "re-purposed on purpose", purpose="sealing")
    assert ts.purpose(kid) == "sealing"
    # an entry written before purposes existed reads as a sealing entry (not legacy-sealing)
    old_home = tmp_path / "old-home"
    old_home.mkdir()
    (old_home / "trusted.json").write_text(json.dumps({"signers": {kid: {"public_key": b64e(key.public_key),
                                                                          "label": "old"}}}))  # fmt: skip
    assert TrustStore.load(old_home).purpose(kid) == "sealing"


def test_tracing_secrets_have_a_kek_of_their_own(tmp_path: Path, st_file: Path, keyring: ww.Keyring) -> None:
    from weightwarden.trace.store import TraceStore, _context

    store = TraceStore(tmp_path / "trace")
    with pytest.raises(KeyPurposeError, match="tracing KEK"):
        store.enroll("m", keyring.provider(), code_length=64, cutoff=1e-3, alpha=0.01)
    assert not (tmp_path / "trace" / "models" / "m.json").exists()
    tracing = keyring.provider(purpose="tracing", create=True)
    assert tracing.key_id != keyring.provider().key_id
    rec = store.enroll("m", tracing, code_length=64, cutoff=1e-3, alpha=0.01)
    assert len(store.secret(rec, tracing)) == 32
    with pytest.raises(KeyPurposeError):
        store.secret(rec, keyring.provider())
    with pytest.raises(KeyPurposeError, match="'tracing' KEK"):
        keyring.provider().unwrap(rec.slot, _context("m"))  # the sealing provider cannot reach it
    sealed = tmp_path / "m.wws"
    ww.seal(st_file, sealed, keyring=keyring)
    with SealedFile(sealed) as sf:
        (_, slots), ctx = sf.key_slots(), sf.context.file_id
    with pytest.raises(KeyPurposeError, match="'sealing' KEK"):
        tracing.unwrap(slots[0], ctx)  # ... nor the tracing provider a file's data key
    with pytest.raises(KeyPurposeError):
        keyring.provider(tracing.key_id, purpose="sealing")
    with pytest.raises(UntrustedSignerError):
        ww.verify(sealed, trust=[Ed25519Signer.generate().public_key])


def test_cli_key_and_trust_purposes(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert warden(cli_env, "init").returncode == 0
    r = warden(cli_env, "key", "new", "--signing", "--purpose", "audit-log", "--json")
    assert r.returncode == 0, r.stderr
    log_kid = json.loads(r.stdout)["key_id"]
    assert json.loads(r.stdout)["purpose"] == "audit-log"
    r = warden(cli_env, "key", "export-public", "--purpose", "audit-log", "--json")
    assert json.loads(r.stdout)["key_id"] == log_kid and json.loads(r.stdout)["purpose"] == "audit-log"
    sealing = json.loads(warden(cli_env, "key", "export-public", "--json").stdout)
    assert sealing["purpose"] == "sealing" and sealing["key_id"] != log_kid
    r = warden(cli_env, "key", "export-public", log_kid, "--purpose", "sealing")
    assert r.returncode == 1 and "not a 'sealing' key" in r.stderr
    r = warden(cli_env, "key", "new", "--kind", "kek", "--purpose", "audit-log")
    assert r.returncode == 1 and "--purpose" in r.stderr
    r = warden(cli_env, "key", "new", "--kind", "kek", "--purpose", "tracing", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["purpose"] == "tracing"
    keys = json.loads(warden(cli_env, "key", "list", "--json").stdout)
    assert {(k["kind"], k["purpose"]) for k in keys} == {("kek", "sealing"), ("kek", "tracing"),
                                                          ("signing", "sealing"), ("signing", "audit-log")}  # fmt: skip
    trusted = Path(cli_env["WARDEN_HOME"]) / "trusted.json"
    before = trusted.read_bytes()
    r = warden(cli_env, "trust", "add", sealing["public_key"], "--purpose", "audit-log")
    assert r.returncode == 1 and "already trusted for 'sealing'" in r.stderr
    assert trusted.read_bytes() == before
    rows = json.loads(warden(cli_env, "trust", "list", "--json").stdout)
    assert {r["key_id"]: r["purpose"] for r in rows} == {sealing["key_id"]: "sealing", log_kid: "audit-log"}
    other = Ed25519Signer.generate("export-rules")
    r = warden(cli_env, "trust", "add", b64e(other.public_key), "--purpose", "export-rules", "--label", "[red]x")
    assert r.returncode == 0, r.stderr
    r = warden(cli_env, "trust", "list")
    assert "[red]x" in r.stdout and "export-rules" in r.stdout  # the label is printed as text, not markup
