# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
"""Build (once) and load the bench's world: master, recipients, ft-short leak. Cached in $WW_FT_WORLD.

Order (each prints its figures): world.py; diag.py 128; diag2.py 283 ls 16 ft (and 283 ls 64 ft, 283 cgls 160 ft);
oracle.py 283 (builds the fine-tuned master that nuis.py and mf.py read); nuis.py; mf.py; sim.py.
The symbol accuracies diag.py and diag2.py print count symbols without carriers as wrong (about 0.38 is chance);
the bench's --diagnose counts only symbols with carriers."""
import os, sys, copy, pickle
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]; sys.path[:0] = [str(ROOT), str(ROOT / "src")]
os.environ.setdefault("WARDEN_ALLOW_SAMPLE_LIST", "1")
W = Path(os.environ.get("WW_FT_WORLD", "/tmp/ww-ft-world"))

def build():
    import torch, transformers as T
    import weightwarden as ww
    from tests.support.cli import PASSPHRASE, TEST_KDF
    from tests.support.oai_server import Family
    from weightwarden.trace import release
    fam = Family(W / "fam", vocab=384, d=48, ff=128, layers=2, seq=64, batch=16, text_limit=200_000)
    mp = fam.save(fam.base(0, steps=120), "master")
    home = W / "home"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    prov = kr.provider(purpose="tracing", create=True)
    names = [f"r{i}" for i in range(8)]
    for r in names:
        release(mp, r, W / r, provider=prov, country="GB", home=home, model_id="m", code_length=1024)
    leak = T.AutoModelForCausalLM.from_pretrained(W / "r0").eval()
    fam.save(fam.finetune(leak, steps=15, lr=3e-4), "ft")
    (W / "text.txt").write_text(fam.text)
    print("built")

def load():
    import transformers as T
    import weightwarden as ww
    from tests.support.cli import PASSPHRASE
    from weightwarden.trace.recipients import open_store
    from weightwarden.trace.store import derive
    from weightwarden.trace.tardos import TardosCode
    from weightwarden.trace.endpoint import carriers
    from weightwarden.trace.scorer import HFGradientScorer
    home = W / "home"
    kr = ww.Keyring.unlock(home, PASSPHRASE)
    prov = kr.provider(purpose="tracing")
    store = open_store(home); rec = store.model("m"); secret = store.secret(rec, prov)
    ck, ek = derive(secret, "tardos-code"), derive(secret, "embed")
    code = TardosCode(ck, rec.code_length, rec.cutoff)
    mp = W / "fam" / "master"
    sc = HFGradientScorer(mp)
    car = carriers(sc.tensors(), ek, rec.code_length, rec.alpha)
    names = [f"r{i}" for i in range(8)]
    return dict(home=home, prov=prov, code=code, ek=ek, ell=rec.code_length, alpha=rec.alpha, master=mp,
                scorer=sc, car=car, names=names, text=(W / "text.txt").read_text(), W=W)

if __name__ == "__main__":
    build()
