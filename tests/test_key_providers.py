"""One contract for every key provider, run against the local keyring and a real SoftHSM2 token."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from weightwarden import audit
from weightwarden.errors import (
    KeyDestroyedError,
    KeyDisabledError,
    ProviderUnavailableError,
    WrongKeyError,
)
from weightwarden.sealed import SealedFile
from weightwarden.sealed import format as F
from weightwarden.sealed.rewrap import _apply, _plan, rewrap, shred

from .conftest import PASSPHRASE, TEST_KDF

SOFTHSM_LIB = next(
    (
        p
        for p in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
        if os.path.exists(p)
    ),
    None,
)
PIN, SO_PIN = "246810", "13579111"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """A SoftHSM2 token directory for the whole run; deleted at the end."""
    if SOFTHSM_LIB is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (`make test` installs the Debian package softhsm2)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the library when it first loads
    label = "ww-test"
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
    )
    yield label
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


_counter = iter(range(100_000))


def uniq(name: str) -> str:
    """Key names unique within the run (the token is shared by the tests)."""
    return f"{name}-{next(_counter)}"


@pytest.fixture(params=["local", "pkcs11"])
def kit(request, tmp_path):
    """(provider, signer, sink) for one backend, with an in-memory audit sink."""
    sink = audit.MemorySink()
    if request.param == "local":
        kr = ww.Keyring.create(tmp_path / "home", PASSPHRASE, kdf=TEST_KDF)
        kr.audit = sink
        p, s = kr.provider(kr.new_kek(uniq("model-a"))), kr.signer()
        p.keyring = kr
    else:
        from weightwarden.keys.pkcs11 import Pkcs11Provider, Pkcs11Session, Pkcs11Signer

        label = request.getfixturevalue("softhsm")
        session = Pkcs11Session(SOFTHSM_LIB, label, PIN)
        p = Pkcs11Provider(session, uniq("model-a"))
        p.create_key()
        s = Pkcs11Signer(session, uniq("signer"), create=True)
        request.addfinalizer(session.close)
    p.audit = s.audit = sink
    return p, s, sink


def _model(tmp_path: Path, name: str = "m", seed: int = 0) -> Path:
    src = tmp_path / f"{name}.safetensors"
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((64, 64)).astype(np.float32), "b": np.arange(5.0)}, str(src))
    return src


def _seal(tmp_path, p, s, name="m", seed=0) -> Path:
    out = tmp_path / f"{name}.wws"
    ww.seal(_model(tmp_path, name, seed), out, provider=p, signer=s)
    return out


def _load(path, p, s):
    return ww.load(path, providers=[p], trust=[s.public_key])


def test_wrap_unwrap_contract(kit):
    p, _, _ = kit
    dek = os.urandom(32)
    slot = p.wrap(dek, b"file-1")
    assert slot.version == 1 and slot.key_id == p.key_id
    assert bytes(p.unwrap(slot, b"file-1")) == dek
    with pytest.raises(WrongKeyError):
        p.unwrap(slot, b"file-2")  # the file id is bound
    bad = type(slot)(slot.provider, slot.key_id, slot.version, slot.alg, slot.wrapped[:-1] + b"\x00")
    with pytest.raises(WrongKeyError):
        p.unwrap(bad, b"file-1")
    with pytest.raises(ValueError):
        p.wrap(b"short", b"x")


def test_seal_and_load_through_provider(tmp_path, kit):
    p, s, _ = kit
    out = _seal(tmp_path, p, s)
    ww.verify(out, trust=[s.public_key])
    assert _load(out, p, s)["w"].shape == (64, 64)


def test_rotate_disable_enable(tmp_path, kit):
    p, s, _ = kit
    old = _seal(tmp_path, p, s, "old")
    assert p.rotate() == 2 and p.current_version() == 2
    assert p.wrap(os.urandom(32), b"x").version == 2
    new = _seal(tmp_path, p, s, "new")
    assert _load(old, p, s) and _load(new, p, s)
    with pytest.raises(KeyDisabledError):
        p.disable(2)  # not the current version
    p.disable(1)
    assert {v["version"]: v["state"] for v in p.versions()} == {1: "disabled", 2: "enabled"}
    with pytest.raises(KeyDisabledError):
        _load(old, p, s)
    assert _load(new, p, s)
    p.enable(1)
    assert _load(old, p, s)


def test_rewrap_keeps_ciphertext_and_retires_old_version(tmp_path, kit):
    p, s, sink = kit
    files = [_seal(tmp_path, p, s, f"f{i}", seed=i) for i in range(12)]
    before = {f: f.read_bytes() for f in files}
    ref = {f: _load(f, p, s)["w"].tobytes() for f in files}
    p.rotate()
    rep = rewrap(files, providers=[p], target=p, batch=5)
    assert (rep.rewrapped, rep.current, rep.files) == (12, 0, 12)
    for f in files:
        with SealedFile(f) as sf:
            assert [sl.version for sl in sf.key_slots()[1]] == [2]
            lo, hi = F.PREAMBLE_LEN, F.PREAMBLE_LEN + 2 * sf.layout.slot_size
        after = f.read_bytes()
        assert after[:lo] == before[f][:lo] and after[hi:] == before[f][hi:]  # ciphertext and manifest identical
        ww.verify(f, trust=[s.public_key])
    p.disable(1)
    p.destroy(1)
    assert all(_load(f, p, s)["w"].tobytes() == ref[f] for f in files)
    again = rewrap(files, providers=[p], target=p)
    assert (again.rewrapped, again.current) == (0, 12)
    rewrapped = [f for e in sink.events if e.action == "key:rewrap" for f in e.detail["files"]]
    assert sorted(rewrapped) == sorted(map(str, files))  # batches of 5: three events, every file named once


def test_rewrap_interrupted_between_phases_stays_readable_and_resumes(tmp_path, kit):
    p, s, _ = kit
    f = _seal(tmp_path, p, s)
    p.rotate()
    _apply([_plan(f, [p], p)], "write", durable=True)  # a crash right after the new area is durable
    p.disable(1)
    assert _load(f, p, s)  # readable with the new version alone
    p.enable(1)
    with SealedFile(f) as sf:
        areas = [F.decode_slot_area(a) for a in sf._slot_areas]
    assert sorted(a[1][0].version for a in areas if a) == [1, 2]  # and still with the old one
    rep = rewrap([f], providers=[p], target=p)
    assert rep.finished == 1
    with SealedFile(f) as sf:  # the old wrapped key is gone; only the new area remains
        assert [F.decode_slot_area(a)[1][0].version for a in sf._slot_areas if F.decode_slot_area(a)] == [2]


def test_shred_makes_every_copy_unreadable(tmp_path, kit):
    p, s, sink = kit
    a = _seal(tmp_path, p, s, "a")
    copy_dir = tmp_path / "elsewhere"
    copy_dir.mkdir()
    copy = copy_dir / "a-copy.wws"
    copy.write_bytes(a.read_bytes())
    if hasattr(p, "keyring"):
        other = p.keyring.provider(p.keyring.new_kek(uniq("model-b")))
    else:
        from weightwarden.keys.pkcs11 import Pkcs11Provider

        other = Pkcs11Provider(p._s, uniq("model-b"))
        other.create_key()
    b = tmp_path / "b.wws"
    ww.seal(_model(tmp_path, "b", 1), b, provider=other, signer=s)
    p.rotate()
    assert shred(p) == [1, 2]
    for f in (a, copy):
        with pytest.raises(KeyDestroyedError):
            _load(f, p, s)
    assert _load(b, other, s)
    assert "model:shred" in sink.actions()
    if hasattr(p, "keyring"):
        text = (p.keyring.home / "keyring.json").read_text()
        kr2 = ww.Keyring.unlock(p.keyring.home, PASSPHRASE)
        assert all("key" not in v for v in kr2._s["keks"][p.key_id]["versions"].values())
        assert text


def test_audit_records_who_what_why(tmp_path, kit):
    p, s, sink = kit
    with audit.context(actor="alice@lab", reason="quarterly rotation"):
        out = _seal(tmp_path, p, s)
        p.rotate()
        _load(out, p, s)
    acts = sink.actions()
    for a in ("key:wrap", "key:sign", "key:rotate", "key:unwrap"):
        assert a in acts
    ev = next(e for e in sink.events if e.action == "key:rotate")
    assert (ev.actor, ev.reason, ev.key_id, ev.key_version, ev.outcome) == (
        "alice@lab",
        "quarterly rotation",
        p.key_id,
        2,
        "ok",
    )
    unwrap = next(e for e in sink.events if e.action == "key:unwrap")
    assert unwrap.subject and unwrap.provider == p.name
    p.disable(1)
    with pytest.raises(KeyDisabledError):
        _load(out, p, s)
    assert any(e.action == "key:unwrap" and e.outcome == "denied" for e in sink.events)
    blob = repr([e.to_json() for e in sink.events])
    assert "wrapped" not in blob


def test_migrate_local_keys_into_the_hsm(tmp_path, softhsm, keyring):
    from weightwarden.keys.pkcs11 import Pkcs11Provider, Pkcs11Session

    f = tmp_path / "m.wws"
    ww.seal(_model(tmp_path), f, keyring=keyring)
    hsm = Pkcs11Provider(Pkcs11Session(SOFTHSM_LIB, softhsm, PIN), uniq("migrated"))
    hsm.create_key()
    rewrap([f], providers=[keyring.provider()], target=hsm)
    assert ww.load(f, providers=[hsm], trust=keyring.trust)["w"].shape == (64, 64)
    with pytest.raises(WrongKeyError):
        ww.load(f, keyring=keyring)  # the local key no longer opens it


def test_hsm_kek_cannot_be_read_out(softhsm):
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    from weightwarden.keys.pkcs11 import Pkcs11Provider, Pkcs11Session

    p = Pkcs11Provider(Pkcs11Session(SOFTHSM_LIB, softhsm, PIN), uniq("secret"))
    p.create_key()
    with pytest.raises(AttributeSensitive):
        p.read_key_value(1)
    obj = p._key(p.key_id, 1)
    assert obj[Attribute.SENSITIVE] is True and obj[Attribute.EXTRACTABLE] is False
    assert obj[Attribute.NEVER_EXTRACTABLE] is True


def test_hsm_bad_pin_missing_token_and_uri(softhsm, monkeypatch):
    from weightwarden.keys.pkcs11 import Pkcs11Session, from_uri, parse_uri

    label = softhsm
    with pytest.raises(ProviderUnavailableError, match="PIN"):
        Pkcs11Session(SOFTHSM_LIB, label, "000000")
    with pytest.raises(ProviderUnavailableError, match="no token"):
        Pkcs11Session(SOFTHSM_LIB, "no-such-token", PIN)
    kid = uniq("k1")
    uri = f"pkcs11:token={label};object={kid}?module-path={SOFTHSM_LIB}&pin-source=env:TEST_PIN"
    assert parse_uri(uri)["object"] == kid
    monkeypatch.delenv("TEST_PIN", raising=False)
    with pytest.raises(ProviderUnavailableError, match="TEST_PIN"):
        from_uri(uri)
    monkeypatch.setenv("TEST_PIN", PIN)
    p = from_uri(uri)
    p.create_key()
    assert p.wrap(os.urandom(32), b"c").provider == "pkcs11"
