"""Issue 17 (part A): releases from sealed masters to the recipient's own key; every weight-bearing file
marked or the release refused; one canonical identity per recipient, recorded only with a release that
succeeds.  Each security claim is shown by an attack that fails: typed error, nothing written, nothing
recorded, the refusal audited."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyrage
import pytest
from safetensors.numpy import load_file, save_file

import weightwarden as ww
from tests.support.cli import warden
from tests.support.models import llama_tensors, tiny_llama_dir
from tests.support.spm import sentencepiece_model
from weightwarden import audit, trail
from weightwarden.errors import (
    RecipientKeyError,
    RecipientNameError,
    UnmarkableFilesError,
    UntrustedSignerError,
    WrongKeyError,
)
from weightwarden.keys.age import AgeIdentityProvider, AgeRecipientProvider
from weightwarden.release.gate import ReleaseDenied
from weightwarden.trace import release, trace
from weightwarden.trace.store import TraceStore, recipient_name

LISTED = "Sergei Ivanovich Petrov"  # sample-000 on the (fictitious) sample list
W = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("rel") / "m")


def _store(tmp_path: Path) -> TraceStore:
    return TraceStore(tmp_path / "h" / "trace", f"sqlite:///{tmp_path / 'h' / 'broker' / 'broker.db'}")


def _sink(keyring: ww.Keyring) -> tuple[audit.MemorySink, object]:
    sink = audit.MemorySink()
    prov = keyring.provider(purpose="tracing", create=True)
    prov.audit = sink
    return sink, prov


# -- 1. from a sealed master, to the recipient's key --------------------------------------------------
def test_release_from_a_sealed_master_to_the_recipients_key(tmp_path: Path, model: Path, keyring: ww.Keyring,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import tempfile

    import weightwarden.trace.copies as tcopies

    master = tmp_path / "m.sealed"
    ww.seal(model, master, keyring=keyring)
    partner, stranger = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    pub = str(partner.to_public())

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("plaintext would be written to disk")

    monkeypatch.setattr(tcopies, "_write_safetensors", forbidden)
    monkeypatch.setattr(tempfile, "mkdtemp", forbidden)
    prov, signer = keyring.provider(), keyring.signer()
    tprov = keyring.provider(purpose="tracing", create=True)  # tracing secrets have a KEK of their own
    out = tmp_path / "for-acme"
    rel = release(master, "Acme Labs", out, provider=tprov, country="DE", home=tmp_path / "h", model_id="m",
                  seal=(prov, signer), recipient_key=pub, master_kw={"keyring": keyring})  # fmt: skip
    monkeypatch.undo()
    assert rel.output == "sealed-to-recipient" and rel.master == "sealed" and rel.recipient_key == pub
    plain = (model / "model.safetensors").read_bytes()
    for f in out.iterdir():  # no plaintext run of the master in any output file
        blob = f.read_bytes()
        assert not any(plain[i : i + 64] in blob for i in range(4096, len(plain) - 64, 4099))
    # our keyring cannot open the copy; another identity cannot; the partner's can, trusting our key only
    with pytest.raises(WrongKeyError):
        ww.load(out, keyring=keyring)
    with pytest.raises(WrongKeyError):
        ww.load(out, providers=[AgeIdentityProvider(str(stranger))], trust=[signer.public_key])
    mine = AgeIdentityProvider(str(partner))
    with pytest.raises(UntrustedSignerError):
        ww.load(out, providers=[mine], trust=[b"\x01" * 32])
    got = ww.load(out, providers=[mine], trust=[signer.public_key])
    o = load_file(str(model / "model.safetensors"))
    assert sorted(got) == sorted(o) and not np.array_equal(got[W], o[W])
    assert float(np.abs(got[W] - o[W]).max()) <= 0.011 * float(o[W].std())
    # the partner leaks a plaintext copy: the trace against the sealed master accuses them
    leak = tmp_path / "leak"
    ww.unseal(out, leak, providers=[mine], trust=[signer.public_key])
    assert (leak / "config.json").read_text() == (model / "config.json").read_text()
    rep = trace(leak, master, provider=tprov, home=tmp_path / "h", model_id="m", keyring=keyring)
    assert [a["recipient"] for a in rep.accused] == ["Acme Labs"]
    # a single sealed file master, released to a plaintext copy: the master is never written out
    one = tmp_path / "m.wws"
    ww.seal(model / "model.safetensors", one, keyring=keyring)
    rel2 = release(one, "Blue Harbor AI", tmp_path / "bh.safetensors", provider=tprov, country="FR",
                   home=tmp_path / "h", model_id="m", master_kw={"keyring": keyring})  # fmt: skip
    assert rel2.output == "plaintext" and rel2.index == 1
    rep = trace(tmp_path / "bh.safetensors", master, provider=tprov, home=tmp_path / "h", model_id="m",
                keyring=keyring)  # fmt: skip
    assert [a["recipient"] for a in rep.accused] == ["Blue Harbor AI"]
    recs = _store(tmp_path).releases("m")
    assert [(r["recipient"], r["output"], r["master"]) for r in recs] == [
        ("Acme Labs", "sealed-to-recipient", "sealed"), ("Blue Harbor AI", "plaintext", "sealed")]  # fmt: skip


def test_an_age_slot_is_bound_to_its_file() -> None:
    """A slot moved from another file to the same recipient does not open (the file id is inside the age
    payload); a slot for another recipient does not either."""
    me = pyrage.x25519.Identity.generate()
    dek = os.urandom(32)
    slot = AgeRecipientProvider(str(me.to_public())).wrap(dek, b"\x01" * 16)
    idp = AgeIdentityProvider(str(me))
    assert bytes(idp.unwrap(slot, b"\x01" * 16)) == dek
    with pytest.raises(WrongKeyError, match="another file"):
        idp.unwrap(slot, b"\x02" * 16)
    with pytest.raises(WrongKeyError):
        AgeIdentityProvider(str(pyrage.x25519.Identity.generate())).unwrap(slot, b"\x01" * 16)
    with pytest.raises(WrongKeyError):  # the public side cannot open anything
        AgeRecipientProvider(str(me.to_public())).unwrap(slot, b"\x01" * 16)
    with pytest.raises(RecipientKeyError, match="--recipient-key"):
        AgeRecipientProvider("age1notakey")


# -- 2. every weight-bearing file marked, or the release refused ---------------------------------
def _hostile_folder(model: Path, root: Path, keyring_file: Path) -> Path:
    import torch

    d = root / "hostile"
    shutil.copytree(model, d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [0.5] * 16}, protocol=2))  # a bare pickle twin
    torch.save({"w": torch.zeros(4)}, d / "twin.dat")  # a PyTorch zip checkpoint under an innocent name
    np.savez(d / "weights.npz", w=np.zeros(4, np.float32))
    (d / "original").mkdir()
    save_file({"layers.0.feed_forward.w1.weight": np.ones((4, 4), np.float32)},
              str(d / "original" / "consolidated.safetensors"))  # fmt: skip
    (d / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    os.symlink(keyring_file, d / "keyring.json")
    return d


OFFENDERS = ["pytorch_model.bin", "twin.dat", "weights.npz", "original/consolidated.safetensors", "model.gguf",
             "keyring.json"]  # fmt: skip


def test_unmarkable_files_refuse_the_release_naming_each(tmp_path: Path, model: Path, keyring: ww.Keyring) -> None:
    kfile = next(p for p in (tmp_path / "home").iterdir() if p.is_file())
    d = _hostile_folder(model, tmp_path, kfile)
    sink, prov = _sink(keyring)
    out = tmp_path / "copy"
    with pytest.raises(UnmarkableFilesError) as e:
        release(d, "Acme Labs", out, provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    for f in OFFENDERS:
        assert f in str(e.value), f
    assert "--exclude" in str(e.value) and len(e.value.files) == len(OFFENDERS)
    assert not os.path.lexists(out) and not [p for p in tmp_path.iterdir() if p.name.startswith((".ww-tmp", ".warden"))]
    assert _store(tmp_path).recipients("m") == []
    acts = [(x.action, x.outcome) for x in sink.events]
    assert (audit.AuditAction.RELEASE_REFUSE, "denied") in acts and audit.AuditAction.RELEASE_GATE not in dict(acts)
    # the same walk refuses to seal the folder: the link to the keyring is never read as content
    with pytest.raises(UnmarkableFilesError, match=r"keyring\.json"):
        ww.seal(d, tmp_path / "sealed", keyring=keyring)
    assert not os.path.lexists(tmp_path / "sealed")


def test_excluded_files_are_left_out_and_recorded(tmp_path: Path, model: Path, keyring: ww.Keyring) -> None:
    kfile = next(p for p in (tmp_path / "home").iterdir() if p.is_file())
    d = _hostile_folder(model, tmp_path, kfile)
    (d / "backup").mkdir()
    shutil.copy(model / "model.safetensors", d / "backup" / "model.safetensors")  # nested, but the model's tensors
    prov = keyring.provider(purpose="tracing", create=True)
    excl = ("*.bin", "twin.dat", "*.npz", "original/*", "*.gguf", "keyring.json")
    with pytest.raises(UnmarkableFilesError, match=r"model\.gguf") as e:  # one pattern short: still refused
        release(d, "Acme Labs", tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h", model_id="m",
                exclude=excl[:4] + excl[5:])  # fmt: skip
    assert e.value.files == ["model.gguf (gguf: a weight format that cannot be fingerprinted)"]
    rel = release(d, "Acme Labs", tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h", model_id="m",
                  exclude=excl)  # fmt: skip
    got = sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert got == ["backup/model.safetensors", "config.json", "model.safetensors"]
    o = load_file(str(model / "model.safetensors"))
    assert not np.array_equal(load_file(str(tmp_path / "c" / "backup" / "model.safetensors"))[W], o[W])  # marked
    assert rel.exclude == excl and set(rel.excluded_files) == set(OFFENDERS)
    (row,) = _store(tmp_path).releases("m")
    assert row["exclude"] == list(excl) and set(row["excluded_files"]) == set(OFFENDERS)


def test_a_sealed_bundle_master_with_a_pickle_member_is_refused(tmp_path: Path, model: Path,
                                                                keyring: ww.Keyring) -> None:  # fmt: skip
    d = tmp_path / "src"
    shutil.copytree(model, d)
    with zipfile.ZipFile(d / "consolidated.pth", "w") as z:  # a torch-style zip under a .pth name
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    ww.seal(d, tmp_path / "m.sealed", keyring=keyring)
    prov = keyring.provider(purpose="tracing", create=True)
    with pytest.raises(UnmarkableFilesError, match=r"consolidated\.pth"):
        release(tmp_path / "m.sealed", "Acme Labs", tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h",
                model_id="m", master_kw={"keyring": keyring})  # fmt: skip
    assert not os.path.lexists(tmp_path / "c") and _store(tmp_path).recipients("m") == []


# -- 3. one canonical identity per recipient ---------------------------------------------------------
# case, NBSP, full-width, spacing, Cyrillic look-alikes
FORMS = ["Acme Labs", "ACME LABS", "Acme\u00a0Labs", "\uff21\uff43\uff4d\uff45 \uff2c\uff41\uff42\uff53",
         "  acme   labs ", "\u0410\u0421\u041c\u0415 LABS"]  # fmt: skip


def test_one_name_one_identity_one_codeword(tmp_path: Path, model: Path, keyring: ww.Keyring) -> None:
    assert len({recipient_name(f).key for f in FORMS}) == 1
    prov = keyring.provider(purpose="tracing", create=True)
    codes = set()
    for i, f in enumerate(FORMS[:4]):
        rel = release(model, f, tmp_path / f"c{i}", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
        codes.add(rel.code_id)
    assert codes == {"tardos-v1/4096/0"}
    other = release(model, "Acme Robotics GmbH", tmp_path / "o", provider=prov, country="DE", home=tmp_path / "h",
                    model_id="m")  # fmt: skip
    assert other.index == 1
    assert _store(tmp_path).recipients("m") == ["Acme Labs", "Acme Robotics GmbH"]  # one row, shown as first named
    rep = trace(tmp_path / "c3", model, provider=prov, home=tmp_path / "h", model_id="m")
    assert [a["recipient"] for a in rep.accused] == ["Acme Labs"] and rep.recipients == 2


@pytest.mark.parametrize("bad", ["\u202eAcme Labs", "Acme\u200bLabs", "Acme\u2066Labs\u2069", "Acme\x00", "Acme\x1b[2J",
                                 " ", ""])  # fmt: skip
def test_names_with_control_format_or_bidi_characters_are_refused(tmp_path: Path, model: Path, keyring: ww.Keyring,
                                                                  bad: str) -> None:  # fmt: skip
    sink, prov = _sink(keyring)
    with pytest.raises(RecipientNameError, match="--to") as e:
        release(model, bad, tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert all(c.isprintable() for c in str(e.value))  # shown escaped
    assert not os.path.lexists(tmp_path / "c") and _store(tmp_path).recipients("m") == []
    assert [x.action for x in sink.events] == [audit.AuditAction.RELEASE_REFUSE]


# issue 17 red team, finding 2: invisible characters and stray combining marks made one partner several codewords
INVISIBLE = ["\u034f", "\ufe00", "\ufe0f", "\u180b", "\u17b4", "\u3164", "\uffa0", "\u115f", "\u2800"]


@pytest.mark.parametrize("bad", [f"Acme{c}Labs" for c in INVISIBLE] + [f"{c}Acme Labs" for c in INVISIBLE[:2]]
                         + ["Acme Lab\u0301s", "\u0301Acme Labs", "Acme La\u0301\u0301\u0301bs",
                            "Acme Labs \u0308"])  # fmt: skip
def test_names_with_invisible_characters_or_stray_marks_are_refused(tmp_path: Path, model: Path,
                                                                    keyring: ww.Keyring, bad: str) -> None:  # fmt: skip
    sink, prov = _sink(keyring)
    with pytest.raises(RecipientNameError, match="--to") as e:
        release(model, bad, tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert not any(c in str(e.value) for c in INVISIBLE)  # shown escaped
    assert not os.path.lexists(tmp_path / "c") and _store(tmp_path).recipients("m") == []
    assert [x.action for x in sink.events] == [audit.AuditAction.RELEASE_REFUSE]


def test_marks_that_compose_or_belong_to_a_script_are_names() -> None:
    from weightwarden.sealed.walk import shown

    # a decomposed accent composes under NFC: the same identity as the precomposed name
    assert recipient_name("Ren\u0065\u0301 Labs").key == recipient_name("Ren\u00e9 Labs").key
    assert recipient_name("\u0928\u092e\u0938\u094d\u0924\u0947 \u0932\u0948\u092c\u094d\u0938").display  # Devanagari
    # shown() escapes what prints as nothing
    for c in INVISIBLE:
        assert shown(f"a{c}b") == f"a\\u{ord(c):04x}b"
    assert shown("Acme Labs") == "Acme Labs"


def test_no_recipient_is_recorded_unless_the_release_succeeds(tmp_path: Path, model: Path, keyring: ww.Keyring,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import weightwarden.trace.copies as tcopies

    sink, prov = _sink(keyring)
    with pytest.raises(ReleaseDenied):
        release(model, LISTED, tmp_path / "x", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert _store(tmp_path).recipients("m") == [] and _store(tmp_path).releases("m") == []

    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tcopies, "_write_safetensors", boom)  # fails mid-way, after the gate allowed it
    with pytest.raises(OSError):
        release(model, "Acme Labs", tmp_path / "y", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    monkeypatch.undo()
    assert not os.path.lexists(tmp_path / "y") and _store(tmp_path).recipients("m") == []
    assert (sink.events[-1].action, sink.events[-1].outcome) == (audit.AuditAction.RELEASE_REFUSE, "denied")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".ww-tmp", ".warden"))]
    ok = release(model, "Acme Labs", tmp_path / "z", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert ok.index == 0 and _store(tmp_path).recipients("m") == ["Acme Labs"]


# -- the command line: enroll a key, release from a sealed master, the partner opens it --------------------
def test_cli_release_to_an_enrolled_key_and_the_partner_opens_it(cli_env: dict[str, str], model: Path,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    assert warden(cli_env, "init").returncode == 0
    res = warden(cli_env, "seal", str(model), "-o", str(tmp_path / "m.sealed"))
    assert res.returncode == 0, res.stderr
    partner = pyrage.x25519.Identity.generate()
    (tmp_path / "partner.key").write_text(f"# created: now\n{partner}\n")
    res = warden(cli_env, "release", str(tmp_path / "m.sealed"), "--to", "Acme Labs", "--country", "DE", "-o",
                 str(tmp_path / "nokey"))  # fmt: skip
    assert res.returncode == 1 and "--recipient-key" in res.stderr and "warden recipient add" in res.stderr
    assert not os.path.lexists(tmp_path / "nokey") and len(res.stderr.strip().splitlines()) == 1
    res = warden(cli_env, "recipient", "add", "Acme Labs", "--pubkey", str(partner.to_public()), "--json")
    assert res.returncode == 0, res.stderr
    res = warden(cli_env, "recipient", "add", "\u202eAcme", "--pubkey", str(partner.to_public()))
    assert res.returncode == 1 and "U+202E" in res.stderr and "\u202e" not in res.stderr
    res = warden(cli_env, "release", str(tmp_path / "m.sealed"), "--to", "ACME LABS", "--country", "DE", "-o",
                 str(tmp_path / "copy"), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)["release"]
    assert j["output"] == "sealed-to-recipient" and j["recipient"] == "ACME LABS" and j["master"] == "sealed"
    pub = warden(cli_env, "key", "export-public", "--json")
    our_key = json.loads(pub.stdout)["public_key"]
    partner_env = {**cli_env, "WARDEN_HOME": str(tmp_path / "partner-home"), "WARDEN_PASSPHRASE": "none"}
    res = warden(partner_env, "open", str(tmp_path / "copy"), "-o", str(tmp_path / "opened"), "--identity",
                 str(tmp_path / "partner.key"), "--trust-key", our_key)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert load_file(str(tmp_path / "opened" / "model.safetensors"))[W].shape == (64, 256)
    res = warden(cli_env, "open", str(tmp_path / "copy"), "-o", str(tmp_path / "ours"))  # our keyring: refused
    assert res.returncode == 1 and "WrongKeyError" in res.stderr and not os.path.lexists(tmp_path / "ours")
    bad = {**partner_env}
    res = warden(bad, "open", str(tmp_path / "copy"), "-o", str(tmp_path / "o2"), "--identity",
                 str(tmp_path / "partner.key"), "--trust-key", base64.b64encode(b"\x01" * 32).decode())  # fmt: skip
    assert res.returncode == 3 and "Untrusted" in res.stderr
    res = warden(cli_env, "trace", str(tmp_path / "opened"), "--model", str(tmp_path / "m.sealed"), "--json")
    assert res.returncode == 0, res.stderr
    assert [a["recipient"] for a in json.loads(res.stdout)["accused"]] == ["Acme Labs"]
    log = json.dumps(trail.events(cli_env["WARDEN_HOME"]))  # the tamper-evident trail
    assert '"recipient:add"' in log and '"release:refuse"' in log


def test_marking_in_place_equals_marking_a_copy() -> None:
    """A sealed master's members are marked in the memory they were decrypted into: same bytes as a copy."""
    from weightwarden.provenance.layout import detect_layout
    from weightwarden.trace.mark import embed_tensors

    rng = np.random.default_rng(1)
    sd = llama_tensors(rng, d=32, ff=96, layers=1, vocab=64)
    lay = detect_layout({k: v.shape for k, v in sd.items()})
    x, key = rng.random(512) < 0.5, rng.bytes(32)
    copies = embed_tensors(sd, lay, x, key, alpha=0.01)
    mine = {k: v.copy() for k, v in sd.items()}
    got = embed_tensors(mine, lay, x, key, alpha=0.01, inplace=True)
    assert set(got) == set(copies) and all(got[k] is mine[k] for k in got)
    assert all(np.array_equal(mine[k].view(np.uint32), copies[k].view(np.uint32)) for k in copies)
    with pytest.raises(ValueError, match="in place"):
        embed_tensors({k: v.T for k, v in sd.items()}, lay, x, key, inplace=True)


def test_a_key_other_than_the_enrolled_one_is_refused(tmp_path: Path, model: Path, keyring: ww.Keyring) -> None:
    from weightwarden.trace import add_recipient

    a, b = (str(pyrage.x25519.Identity.generate().to_public()) for _ in range(2))
    add_recipient("Acme Labs", a, home=tmp_path / "h")
    sink, prov = _sink(keyring)
    with pytest.raises(RecipientKeyError, match="--replace"):
        release(model, "acme labs", tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h", model_id="m",
                seal=(prov, keyring.signer()), recipient_key=b)  # fmt: skip
    assert not os.path.lexists(tmp_path / "c") and _store(tmp_path).recipients("m") == []
    assert [x.action for x in sink.events] == [audit.AuditAction.RELEASE_REFUSE]
    single = tmp_path / "only.bin"
    single.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(UnmarkableFilesError, match="pickle"):
        release(single, "Acme Labs", tmp_path / "d", provider=prov, country="DE", home=tmp_path / "h", model_id="m")


# -- issue 17, red team: formats the sniff did not know left unmarked; an allowlist now -------------------
def _red_team_files(model: Path) -> tuple[bytes, dict[str, bytes]]:
    import bz2
    import gzip
    import io
    import lzma

    st = (model / "model.safetensors").read_bytes()
    n = int.from_bytes(st[:8], "little")
    spaced = (n + 1).to_bytes(8, "little") + b" " + st[8:]  # safetensors accepts a leading space in the header
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("model.safetensors", st)
    tbuf = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=tbuf, mode="w") as t:
        info = tarfile.TarInfo("model.safetensors")
        info.size = len(st)
        t.addfile(info, io.BytesIO(st))
    raw = np.random.default_rng(9).standard_normal(4096).astype(np.float32).tobytes()
    return spaced, {
        "backup.tar": tbuf.getvalue(),
        "model.safetensors.gz": gzip.compress(st),
        "p0.pkl": pickle.dumps({"w": [0.5] * 16}, protocol=0),
        "p1.pkl": pickle.dumps({"w": [0.5] * 16}, protocol=1),
        "weights.bin": raw,
        "flax_model.msgpack": b"\x81\xa6params\xc5\x10\x00" + raw,
        "README.md": b"# A model card\n\nNothing to see here.\n" + zbuf.getvalue(),
        "keras.h5": bytes(512) + b"\x89HDF\r\n\x1a\n" + raw,  # HDF5 with a 512-byte user block
        "model.onnx": b"\x08\x07\x12\x07pytorch" + raw,
        "ggml.bin": b"lmgg" + raw,
        "w.xz": lzma.compress(st[:4096]),
        "w.zst": b"\x28\xb5\x2f\xfd" + raw[:64],
        "w.bz2": bz2.compress(st[:4096]),
        "w.7z": b"7z\xbc\xaf\x27\x1c\x00\x04" + raw[:64],
        "notes.txt": b"GGUF\x03 then a GGUF-looking body",  # text with a container signature inside it
    }


def test_every_unrecognised_file_refuses_the_release_naming_it(tmp_path: Path, model: Path,
                                                               keyring: ww.Keyring) -> None:  # fmt: skip
    d = tmp_path / "m"
    shutil.copytree(model, d)
    spaced, bad = _red_team_files(model)
    for rel, data in bad.items():
        (d / rel).write_bytes(data)
    (d / "other.txt").write_bytes(spaced)  # safetensors by its header, whatever its name: marked, not copied
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"héllo": 1}}}))  # text: copied, not refused
    (d / "empty.txt").write_bytes(b"")
    (d / "NOTES.md").write_text("We also publish GGUF and safetensors files.\n")
    (d / "tokenizer.model").write_bytes(sentencepiece_model(["the", "of", "modèle"]))  # parsed: copied
    sink, prov = _sink(keyring)
    out = tmp_path / "copy"
    with pytest.raises(UnmarkableFilesError) as e:
        release(d, "Acme Labs", out, provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    named = {f.split(" (", 1)[0] for f in e.value.files}
    assert named == set(bad), named ^ set(bad)
    assert "--exclude" in str(e.value)
    assert not os.path.lexists(out) and _store(tmp_path).recipients("m") == []
    acts = [(x.action, x.outcome) for x in sink.events]
    assert (audit.AuditAction.RELEASE_REFUSE, "denied") in acts and audit.AuditAction.RELEASE_GATE not in dict(acts)
    # excluding them all: the text files are copied byte for byte, the release goes through
    rel = release(d, "Acme Labs", out, provider=prov, country="DE", home=tmp_path / "h", model_id="m",
                  exclude=tuple(bad))  # fmt: skip
    assert set(rel.excluded_files) == set(bad)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["NOTES.md", "config.json", "empty.txt", "model.safetensors", "other.txt", "tokenizer.json",
                   "tokenizer.model"]
    assert (out / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    assert (out / "tokenizer.model").read_bytes() == (d / "tokenizer.model").read_bytes()
    o = load_file(str(model / "model.safetensors"))
    assert not np.array_equal(load_file(str(out / "other.txt"))[W], o[W])  # marked
    assert "other.txt" in _store(tmp_path).releases("m")[0]["marked_files"]


@pytest.mark.parametrize("disguise", ["tensor bytes", "tensor bytes after real pieces"])
def test_weights_named_tokenizer_model_are_refused(tmp_path: Path, model: Path, keyring: ww.Keyring,
                                                   disguise: str) -> None:  # fmt: skip
    """A SentencePiece model leaves as a non-weight file only where it parses as one: a weight tensor's bytes
    under its name, alone or after a real model's pieces, are refused by name."""
    d = tmp_path / "m"
    shutil.copytree(model, d)
    st = (model / "model.safetensors").read_bytes()
    tensor = st[8 + int.from_bytes(st[:8], "little"):]
    spm = sentencepiece_model(["the", "of"])
    (d / "tokenizer.model").write_bytes(tensor if disguise == "tensor bytes" else spm + tensor)
    _, prov = _sink(keyring)
    with pytest.raises(UnmarkableFilesError) as e:
        release(d, "Acme Labs", tmp_path / "copy", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert [f.split(" (", 1)[0] for f in e.value.files] == ["tokenizer.model"]
    assert not os.path.lexists(tmp_path / "copy")


def test_a_sealed_master_with_an_unrecognised_member_is_refused(tmp_path: Path, model: Path,
                                                                keyring: ww.Keyring) -> None:  # fmt: skip
    d = tmp_path / "src"
    shutil.copytree(model, d)
    (d / "weights.bin").write_bytes(np.ones(256, np.float32).tobytes())
    ww.seal(d, tmp_path / "m.sealed", keyring=keyring)
    prov = keyring.provider(purpose="tracing", create=True)
    with pytest.raises(UnmarkableFilesError, match=r"weights\.bin \(neither marked weights nor plain text"):
        release(tmp_path / "m.sealed", "Acme Labs", tmp_path / "c", provider=prov, country="DE", home=tmp_path / "h",
                model_id="m", master_kw={"keyring": keyring})  # fmt: skip
    assert not os.path.lexists(tmp_path / "c") and _store(tmp_path).recipients("m") == []


def _swap_after_the_gate(monkeypatch: pytest.MonkeyPatch, swap) -> None:
    """The red team's race: the gate runs between the walk and the copy; swap a file while it decides."""
    from weightwarden.release.gate import ReleaseGate

    decide = ReleaseGate.decide_model

    def racing(self, *a, **kw):
        out = decide(self, *a, **kw)
        swap()
        return out

    monkeypatch.setattr(ReleaseGate, "decide_model", racing)


@pytest.mark.parametrize("sealed", [False, True])
def test_a_file_swapped_for_weights_during_the_gate_is_refused(tmp_path: Path, model: Path, keyring: ww.Keyring,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               sealed: bool) -> None:  # fmt: skip
    d = tmp_path / "m"
    shutil.copytree(model, d)
    (d / "README.md").write_text("# model card\n")
    save_file({"x": np.random.default_rng(5).standard_normal((64, 256)).astype(np.float32)}, str(tmp_path / "w.st"))
    _swap_after_the_gate(monkeypatch, lambda: os.replace(tmp_path / "w.st", d / "README.md"))
    sink, prov = _sink(keyring)
    out = tmp_path / "copy"
    seal = (prov, keyring.signer()) if sealed else None
    with pytest.raises(UnmarkableFilesError, match=r"README\.md \(changed after it was checked: now safetensors"):
        release(d, "Acme Labs", out, provider=prov, country="DE", home=tmp_path / "h", model_id="m", seal=seal)
    assert not os.path.lexists(out) and not [p for p in tmp_path.iterdir() if p.name.startswith((".ww-tmp", ".warden"))]
    assert _store(tmp_path).recipients("m") == [] and _store(tmp_path).releases("m") == []
    acts = [(x.action, x.outcome) for x in sink.events]
    assert (audit.AuditAction.RELEASE_GATE, "ok") in acts and (audit.AuditAction.RELEASE_REFUSE, "denied") in acts


def test_a_folder_swapped_for_a_link_during_the_gate_is_refused(tmp_path: Path, model: Path, keyring: ww.Keyring,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    d = tmp_path / "m"
    shutil.copytree(model, d)
    (d / "docs").mkdir()
    (d / "docs" / "notes.txt").write_text("notes\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text('{"secret": "not for the recipient"}')  # text, but outside the tree

    def swap() -> None:
        shutil.rmtree(d / "docs")
        os.symlink(elsewhere, d / "docs")

    _swap_after_the_gate(monkeypatch, swap)
    _, prov = _sink(keyring)
    out = tmp_path / "copy"
    with pytest.raises(UnmarkableFilesError, match=r"docs/notes\.txt \(changed after it was checked: cannot be read"):
        release(d, "Acme Labs", out, provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert not os.path.lexists(out) and _store(tmp_path).releases("m") == []


# -- issue 17, red team: copies of marked tensors under other names --------------------------------------
def _with_extra(model: Path, root: Path, extra: dict[str, np.ndarray]) -> Path:
    d = root / "m"
    shutil.copytree(model, d)
    t = load_file(str(d / "model.safetensors"))
    save_file({**t, **extra}, str(d / "model.safetensors"))
    return d


def _refused_copy(d: Path, tmp_path: Path, keyring: ww.Keyring, *expect: str) -> UnmarkableFilesError:
    sink, prov = _sink(keyring)
    out = tmp_path / "copy"
    with pytest.raises(UnmarkableFilesError) as e:
        release(d, "Acme Labs", out, provider=prov, country="DE", home=tmp_path / "h", model_id="m",
                exclude=("*.bin",))  # fmt: skip
    for x in expect:
        assert x in str(e.value), (x, str(e.value))
    assert "remove the tensor" in str(e.value)
    assert not os.path.lexists(out) and _store(tmp_path).recipients("m") == []
    acts = [(x.action, x.outcome) for x in sink.events]
    assert (audit.AuditAction.RELEASE_REFUSE, "denied") in acts and audit.AuditAction.RELEASE_GATE not in dict(acts)
    return e.value


def test_a_copy_of_a_marked_tensor_under_another_name_is_refused(tmp_path: Path, model: Path,
                                                                 keyring: ww.Keyring) -> None:  # fmt: skip
    t = load_file(str(model / "model.safetensors"))
    up = "model.layers.0.mlp.up_proj.weight"
    d = _with_extra(model, tmp_path, {"lm_backup.l0_down": t[W].copy(), "lm_backup.l0_up_T": t[up].T.copy()})
    e = _refused_copy(d, tmp_path, keyring, "'lm_backup.l0_down'", "'lm_backup.l0_up_T'", f"'{W}'")
    assert len(e.files) == 2


def test_a_reshaped_copy_or_a_copy_under_a_known_name_is_refused_by_its_bytes(tmp_path: Path, model: Path,
                                                                              keyring: ww.Keyring) -> None:  # fmt: skip
    t = load_file(str(model / "model.safetensors"))
    g1 = "model.layers.1.mlp.gate_proj.weight"
    d = _with_extra(model, tmp_path, {"flat": t[W].reshape(-1).copy(),  # a shape no marked tensor has
                                      "model.layers.1.mlp.up_proj.weight": t[g1].copy()})  # a name the layout knows
    e = _refused_copy(d, tmp_path, keyring, "'flat' holds the same bytes as", f"'{W}'",
                      "'model.layers.1.mlp.up_proj.weight' holds the same bytes as", f"'{g1}'")
    assert len(e.files) == 2


def test_a_sub_folder_file_with_one_target_and_a_copy_of_another_is_refused(tmp_path: Path, model: Path,
                                                                            keyring: ww.Keyring) -> None:  # fmt: skip
    t = load_file(str(model / "model.safetensors"))
    d = tmp_path / "m"
    shutil.copytree(model, d)
    (d / "extra").mkdir()
    g0 = "model.layers.0.mlp.gate_proj.weight"
    save_file({g0: t[g0], "other.w": t["model.layers.1.mlp.down_proj.weight"]}, str(d / "extra" / "part.safetensors"))
    e = _refused_copy(d, tmp_path, keyring, "extra/part.safetensors (tensor 'other.w'")
    assert len(e.files) == 1
    # the legitimate model beside it, untouched, still releases: its up_proj shares gate_proj's shape
    prov = keyring.provider(purpose="tracing", create=True)
    rel = release(model, "Acme Labs", tmp_path / "ok", provider=prov, country="DE", home=tmp_path / "h",
                  model_id="m")  # fmt: skip
    assert rel.recipient == "Acme Labs"


def test_a_weight_file_swapped_for_one_with_a_copy_during_the_gate_is_refused(
    tmp_path: Path, model: Path, keyring: ww.Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "m"
    shutil.copytree(model, d)
    t = load_file(str(model / "model.safetensors"))
    save_file({**t, "lm_backup.l0_down": t[W].copy()}, str(tmp_path / "w.st"))
    _swap_after_the_gate(monkeypatch, lambda: os.replace(tmp_path / "w.st", d / "model.safetensors"))
    _, prov = _sink(keyring)
    with pytest.raises(UnmarkableFilesError, match=r"changed after it was checked.*'lm_backup\.l0_down'"):
        release(d, "Acme Labs", tmp_path / "copy", provider=prov, country="DE", home=tmp_path / "h", model_id="m")
    assert not os.path.lexists(tmp_path / "copy") and _store(tmp_path).releases("m") == []
