"""One contract for every key provider, run against the local keyring and a real SoftHSM2 token."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from tests.support.cli import PASSPHRASE, TEST_KDF
from tests.support.hsm import PIN, SOFTHSM_LIB
from weightwarden import audit
from weightwarden.errors import (
    KeyDestroyedError,
    KeyDisabledError,
    KeyNotFoundError,
    ProviderUnavailableError,
    WrongKeyError,
)
from weightwarden.keys.provider import shred
from weightwarden.sealed import SealedFile
from weightwarden.sealed import format as F
from weightwarden.sealed.rewrap import _apply, _plan, rewrap

_counter = iter(range(100_000))


def uniq(name: str) -> str:
    """Key names unique within the run (the token is shared by the tests)."""
    return f"{name}-{next(_counter)}"


@pytest.fixture(scope="session")
def kms_endpoint():
    """A KMS endpoint: WARDEN_TEST_KMS_ENDPOINT if set, else a local moto server (an AWS API
    emulator on 127.0.0.1) started for this run."""
    import socket
    import sys
    import time

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")
    if os.environ.get("WARDEN_TEST_KMS_ENDPOINT"):
        yield os.environ["WARDEN_TEST_KMS_ENDPOINT"]
        return
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.skip("no KMS endpoint: set WARDEN_TEST_KMS_ENDPOINT, or install moto[server] (the dev extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def _kms_provider(endpoint: str):
    import boto3

    from weightwarden.keys.awskms import AwsKmsProvider

    client = boto3.client("kms", endpoint_url=endpoint, region_name="eu-west-1")
    arn = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    return AwsKmsProvider(arn, client=client)


@pytest.fixture(scope="session")
def vault_server(tmp_path_factory):
    """(address, token) of a Vault-API server: VAULT_ADDR and VAULT_TOKEN if both are set, else a real
    OpenBao dev server started for this run (transit enabled) and stopped at the end."""
    if os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"):
        yield os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"]
        return
    from tests.support.services import BAO_TOKEN, openbao

    with openbao(tmp_path_factory.mktemp("openbao")) as url:
        yield url, BAO_TOKEN


def _vault_provider(server):
    import hvac

    from weightwarden.keys.vault import VaultTransitProvider

    client = hvac.Client(url=server[0], token=server[1])
    if "transit/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("transit")
    name = uniq("ww-contract")
    client.secrets.transit.create_key(name=name, key_type="aes256-gcm96")
    return VaultTransitProvider(name, client=client)


VERSIONED = {"local", "pkcs11", "vault"}


def need_versions(p) -> None:
    if p.name not in VERSIONED:
        pytest.skip(f"{p.name} keeps key versions behind one key id; per-version lifecycle does not apply")


@pytest.fixture(params=["local", "pkcs11", "awskms", "vault"])
def kit(request, tmp_path):
    """(provider, signer, sink) for one backend, with an in-memory audit sink."""
    sink = audit.MemorySink()
    if request.param == "awskms":
        kr = ww.Keyring.create(tmp_path / "home", PASSPHRASE, kdf=TEST_KDF)
        p, s = _kms_provider(request.getfixturevalue("kms_endpoint")), kr.signer()
    elif request.param == "vault":
        kr = ww.Keyring.create(tmp_path / "home", PASSPHRASE, kdf=TEST_KDF)
        p, s = _vault_provider(request.getfixturevalue("vault_server")), kr.signer()
    elif request.param == "local":
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
    assert slot.version == 1 and slot.key_id == p.key_id and slot.provider == p.name
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
    need_versions(p)
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
    need_versions(p)
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
    need_versions(p)
    f = _seal(tmp_path, p, s)
    p.rotate()
    plan = _plan(f, [p], p)
    _apply([plan], "write", durable=True)  # a crash right after the new area is durable
    plan.close()
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
    other = _second_key(p)
    b = tmp_path / "b.wws"
    ww.seal(_model(tmp_path, "b", 1), b, provider=other, signer=s)
    if p.name in VERSIONED:
        p.rotate()
    assert shred(p) == ([1, 2] if p.name in VERSIONED else [1])
    gone = (KeyDestroyedError, KeyNotFoundError) if p.name == "vault" else KeyDestroyedError  # Vault deletes the key
    if p.name == "awskms" and not os.environ.get("WARDEN_TEST_KMS_ENDPOINT"):
        # the moto emulator still decrypts under a key pending deletion (real KMS refuses with
        # KMSInvalidStateException, mapped to KeyDestroyedError); check what the service reports
        assert p.versions() == [{"version": 1, "state": "destroyed"}]
    else:
        for f in (a, copy):
            with pytest.raises(gone):
                _load(f, p, s)
    assert _load(b, other, s)
    assert "model:shred" in sink.actions()
    if hasattr(p, "keyring"):  # the keyring as saved on disk no longer holds any version's key bytes
        kr2 = ww.Keyring.unlock(p.keyring.home, PASSPHRASE)
        assert all("key" not in v for v in kr2._s["keks"][p.key_id]["versions"].values())


def _second_key(p):
    """Another key on the same backend as ``p``."""
    if hasattr(p, "keyring"):
        return p.keyring.provider(p.keyring.new_kek(uniq("model-b")))
    if p.name == "pkcs11":
        from weightwarden.keys.pkcs11 import Pkcs11Provider

        other = Pkcs11Provider(p._s, uniq("model-b"))
        other.create_key()
        return other
    if p.name == "awskms":
        from weightwarden.keys.awskms import AwsKmsProvider

        return AwsKmsProvider(p._kms.create_key()["KeyMetadata"]["Arn"], client=p._kms)
    from weightwarden.keys.vault import VaultTransitProvider

    name = uniq("model-b")
    p._v.secrets.transit.create_key(name=name, key_type="aes256-gcm96")
    return VaultTransitProvider(name, client=p._v)


def test_audit_records_who_what_why(tmp_path, kit):
    p, s, sink = kit
    need_versions(p)
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


def test_hsm_disabled_elsewhere_is_refused_by_the_token(softhsm):
    """A version disabled by another provider while this one still holds its cached handle: the token
    answers CKR_KEY_FUNCTION_NOT_PERMITTED, which python-pkcs11 raises as its base PKCS11Error; the
    provider reports KeyDisabledError (not an AttributeError about a missing exception class)."""
    from weightwarden.keys.pkcs11 import Pkcs11Provider, Pkcs11Session

    session = Pkcs11Session(SOFTHSM_LIB, softhsm, PIN)
    a = Pkcs11Provider(session, uniq("elsewhere"))
    a.create_key()
    slot = a.wrap(os.urandom(32), b"ctx")
    assert len(a.unwrap(slot, b"ctx")) == 32  # a's cache now says version 1 is usable
    b = Pkcs11Provider(session, a.key_id)
    assert b.rotate() == 2
    b.disable(1)
    with pytest.raises(KeyDisabledError):
        a.unwrap(slot, b"ctx")  # within a's cache TTL: the token itself refuses
    assert {v["version"]: v["state"] for v in a.versions()} == {1: "disabled", 2: "enabled"}


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


def test_provider_uris(monkeypatch):
    from weightwarden.keys.awskms import AwsKmsProvider
    from weightwarden.keys.registry import provider_from_uri as from_uri
    from weightwarden.keys.vault import VaultTransitProvider

    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for uri in (f"awskms:///{arn}", f"aws-kms://{arn}"):
        p = from_uri(uri)
        assert isinstance(p, AwsKmsProvider) and p.key_id == arn
    v = from_uri("vault://transit/keys/model-a")
    assert isinstance(v, VaultTransitProvider) and (v.key_id, v._mount) == ("model-a", "transit")
    for bad in ("awskms:///not-an-arn", "vault://transit/model-a", "gcpkms://x", "pkcs11:object=x"):
        with pytest.raises((ValueError, ProviderUnavailableError)):
            from_uri(bad)


def test_cli_seal_into_hsm_and_migrate(tmp_path, softhsm, st_file, cli_env):
    from tests.support.cli import warden
    from weightwarden.keys.pkcs11 import Pkcs11Provider, Pkcs11Session

    kid = uniq("cli-hsm")
    Pkcs11Provider(Pkcs11Session(SOFTHSM_LIB, softhsm, PIN), kid).create_key()
    env = dict(cli_env, WARDEN_PKCS11_PIN=PIN, SOFTHSM2_CONF=os.environ["SOFTHSM2_CONF"])
    uri = f"pkcs11:token={softhsm};object={kid}?module-path={SOFTHSM_LIB}"
    assert warden(env, "init").returncode == 0
    r = warden(env, "seal", str(st_file), "-o", str(tmp_path / "h.wws"), "--provider", uri, "--json")
    assert r.returncode == 0, r.stderr
    assert ww.inspect(tmp_path / "h.wws")["key_slots"][0]["provider"] == "pkcs11"
    assert warden(env, "open", str(tmp_path / "h.wws"), "-o", str(tmp_path / "x")).returncode == 1
    r = warden(env, "open", str(tmp_path / "h.wws"), "-o", str(tmp_path / "x"), "--provider", uri)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x").read_bytes() == st_file.read_bytes()
    r = warden(env, "seal", str(st_file), "-o", str(tmp_path / "l.wws"))
    r = warden(env, "rewrap", str(tmp_path / "l.wws"), "--to", uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rewrapped"] == 1, r.stderr
    assert ww.inspect(tmp_path / "l.wws")["key_slots"][0]["provider"] == "pkcs11"
    # the signing key in the HSM too
    from weightwarden.keys.pkcs11 import Pkcs11Signer

    label = uniq("cli-signer")
    Pkcs11Signer(Pkcs11Session(SOFTHSM_LIB, softhsm, PIN), label, create=True)
    suri = f"pkcs11:token={softhsm};object={label}?module-path={SOFTHSM_LIB}"
    r = warden(env, "seal", str(st_file), "-o", str(tmp_path / "s.wws"), "--provider", uri, "--signer", suri)
    assert r.returncode == 0, r.stderr
    assert warden(env, "verify", str(tmp_path / "s.wws")).returncode == 3  # not trusted yet: verification failed
    pub = json.loads(warden(env, "key", "export-public", "--signer", suri, "--json").stdout)["public_key"]
    assert warden(env, "trust", "add", pub, "--label", "hsm").returncode == 0
    assert warden(env, "verify", str(tmp_path / "s.wws")).returncode == 0


def test_hsm_signer_has_one_purpose(tmp_path, softhsm, st_file, monkeypatch):
    """A token's signing key carries the purpose it was made with (in its CKA_ID): an audit-log key in the
    HSM signs tree heads, and cannot seal, nor be taken for a sealing key; a pair made before purposes
    existed is a sealing key."""
    from weightwarden.errors import HeadKeyPurposeError, KeyPurposeError
    from weightwarden.keys.pkcs11 import Pkcs11Session, Pkcs11Signer, signer_from_uri
    from weightwarden.merkle import AuditLog

    monkeypatch.setenv("WARDEN_PKCS11_PIN", PIN)
    session = Pkcs11Session(SOFTHSM_LIB, softhsm, PIN)
    try:
        label = uniq("log-key")
        log_key = Pkcs11Signer(session, label, create=True, purpose="audit-log")
        assert log_key.purpose == "audit-log"
        with pytest.raises(KeyPurposeError, match="not a 'sealing' key"):
            Pkcs11Signer(session, label, purpose="sealing")
        uri = f"pkcs11:token={softhsm};object={label}?module-path={SOFTHSM_LIB}&purpose=sealing"
        with pytest.raises(KeyPurposeError):
            signer_from_uri(uri)
        assert Pkcs11Signer(session, label).purpose == "audit-log"  # unasked, it says what it is
        p = ww.keys.StaticKeyProvider({("k", 1): b"\x01" * 32})
        with pytest.raises(KeyPurposeError, match="'sealing' key"):
            ww.seal(st_file, tmp_path / "x.wws", provider=p, signer=log_key)
        assert not (tmp_path / "x.wws").exists() and not list(tmp_path.glob(".ww-tmp*"))  # nothing written
        log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", log_key)
        log.append([audit.event(audit.AuditAction.KEY_SIGN)])
        assert log.verify()["events"] == 1
        old = uniq("pre-purpose")  # made as before: CKA_ID = label
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        with session.lock:
            session.session.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")}, local=True
            ).generate_keypair(store=True, label=old, id=old.encode())
        legacy = Pkcs11Signer(session, old)
        assert legacy.purpose == "sealing"
        with pytest.raises(KeyPurposeError):
            AuditLog(f"sqlite:///{tmp_path / 'b.db'}", legacy)
        forged = log.head()
        from weightwarden.merkle import SignedHead

        sig = legacy.sign_unaudited(SignedHead.message(forged.log_id, forged.size, forged.root, forged.at))
        with pytest.raises(HeadKeyPurposeError):
            SignedHead(forged.size, forged.root, forged.at, legacy.key_id, sig, forged.log_id).check(legacy.public_key)
        log.close()
    finally:
        session.close()


REWRAP_SCRIPT = """
import sys, weightwarden as ww
from pathlib import Path
from weightwarden.sealed.rewrap import rewrap
kr = ww.Keyring.unlock(sys.argv[1], sys.argv[2])
p = kr.provider(sys.argv[3])
files = sorted(Path(sys.argv[4]).glob("*.wws"))
print("ready", flush=True)
rewrap(files, providers=[p], target=p, batch=50)
"""


def test_rewrap_of_1000_files_killed_midway_stays_readable_and_resumes(tmp_path, keyring):
    import signal
    import sys
    import time

    from weightwarden.sealed import seal_file

    kid = keyring.new_kek(uniq("bulk"))
    keyring.save()
    p, s = keyring.provider(kid), keyring.signer()
    src = tmp_path / "config.json"
    src.write_text('{"hidden_size": 8}')
    d = tmp_path / "files"
    d.mkdir()
    files = [d / f"f{i:04d}.wws" for i in range(1000)]
    for f in files:
        seal_file(src, f, provider=p, signer=s, durable=False)
    p.rotate()
    rng = np.random.default_rng(7)
    proc = subprocess.Popen(
        [sys.executable, "-c", REWRAP_SCRIPT, str(keyring.home), PASSPHRASE, kid, str(d)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(float(rng.uniform(0.05, 0.25)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kr = ww.Keyring.unlock(keyring.home, PASSPHRASE)  # the rotation was saved by the parent
    p = kr.provider(kid)
    versions = []
    for f in files:  # every file opens, with the old or the new version
        with SealedFile(f) as sf:
            versions.append(sf.key_slots()[1][0].version)
            r = sf.unlock([p])
            assert r.read_all().tobytes() == src.read_bytes()
    assert set(versions) <= {1, 2}
    rep = rewrap(files, providers=[p], target=p)
    assert rep.rewrapped == versions.count(1) and rep.finished + rep.current == versions.count(2)
    p.disable(1)
    for f in files[::37]:
        with SealedFile(f) as sf:
            assert sum(F.decode_slot_area(a) is not None for a in sf._slot_areas) == 1  # old area erased
            sf.unlock([p])


def test_kms_provider_down(tmp_path):
    import socket

    import boto3

    from weightwarden.keys.awskms import AwsKmsProvider

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    client = boto3.client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="eu-west-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=__import__("botocore.config").config.Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    p = AwsKmsProvider("arn:aws:kms:eu-west-1:111122223333:key/00000000-0000-0000-0000-000000000000", client=client)
    with pytest.raises(ProviderUnavailableError, match="unreachable"):
        p.wrap(os.urandom(32), b"file")


def test_vault_uri_through_the_cli_on_a_real_server(tmp_path, cli_env, vault_server):
    """`--provider vault://transit/keys/NAME` seals, opens and rewraps against a real OpenBao server;
    a key that is not there is a typed error and writes nothing."""
    import hvac

    from tests.support.cli import warden

    url, token = vault_server
    name = uniq("cli-model")
    hvac.Client(url=url, token=token).secrets.transit.create_key(name=name, key_type="aes256-gcm96")
    env = cli_env | {"VAULT_ADDR": url, "VAULT_TOKEN": token}
    src = _model(tmp_path)
    assert warden(env, "init").returncode == 0
    out = tmp_path / "v.wws"
    r = warden(env, "seal", str(src), "-o", str(out), "--provider", f"vault://transit/keys/{name}", "--json")
    assert r.returncode == 0, r.stderr
    with SealedFile(out) as sf:
        assert [(sl.provider, sl.key_id) for sl in sf.key_slots()[1]] == [("vault", name)]
    r = warden(env, "open", str(out), "-o", str(tmp_path / "back.safetensors"), "--provider",
               f"vault://transit/keys/{name}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    r = warden(env, "seal", str(src), "-o", str(tmp_path / "no.wws"), "--provider", "vault://transit/keys/missing")
    assert r.returncode == 1 and "KeyNotFoundError" in r.stderr and not (tmp_path / "no.wws").exists()


def test_vault_never_recreates_a_shredded_key(vault_server):
    """Transit's encrypt would create a missing key: after a shred, a wrap must fail, not make a new key."""
    import hvac

    from weightwarden.keys.vault import VaultTransitProvider

    client = hvac.Client(url=vault_server[0], token=vault_server[1])
    p = _vault_provider(vault_server)
    slot = p.wrap(os.urandom(32), b"file-1")
    assert shred(p) == [1]
    with pytest.raises(KeyNotFoundError):
        p.wrap(os.urandom(32), b"file-2")
    with pytest.raises(KeyDestroyedError):
        p.unwrap(slot, b"file-1")
    try:
        keys = client.secrets.transit.list_keys(mount_point="transit")["data"]["keys"]
    except hvac.exceptions.InvalidPath:  # Vault answers a LIST with no key at all with 404
        keys = []
    assert p.key_id not in keys
    with pytest.raises(KeyNotFoundError):
        VaultTransitProvider("never-made", client=client).wrap(os.urandom(32), b"x")
