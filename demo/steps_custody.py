"""Acts 1 to 3: custody, the sealed checkpoint, its registration for provenance."""

from __future__ import annotations

import numpy as np
from rich.progress import Progress

from demo.common import BATCH, CUSTODIANS, STEPS, DemoBase, console


class CustodySteps(DemoBase):
    # -- 1. custody ---------------------------------------------------------------------------
    def custody(self) -> None:
        self.act("1. custody: the root key split among five custodians, three needed")
        # the broker's own home and log key come first, so that every step below, on the key host too, is in
        # its one trail: the key host reaches the broker's database (PostgreSQL in production) and holds the log
        # key's passphrase file, as the release workstation that writes to the broker's log does
        (self.root / "log-key.pass").write_text("demo log-key passphrase, use a real one\n")
        for env in (self.env, self.benv):
            env["WARDEN_LOG_KEY_PASSPHRASE_FILE"] = str(self.root / "log-key.pass")
        self.warden("broker", "init", broker=True)
        self.env["WARDEN_BROKER_DB"] = f"sqlite:///{self.bhome / 'broker' / 'broker.db'}"
        self.env["WARDEN_LOG_KEY"] = f"file:{self.bhome / 'broker' / 'log-key.json'}"
        self.warden("init")
        spec = [a for c in CUSTODIANS for a in ("--custodian", f"{c}=passphrase")]

        def init() -> tuple[bool, str]:
            j = self.wjson("custody", "init", "--threshold", "3", *spec)
            self.warden("agent", "start", "--idle-seal", "0")
            return j["threshold"] == 3 and len(j["custodians"]) == 5, f"split {j['split_id'][:12]}…, 3 of 5"

        self.check("custody initialised: 3-of-5 shares sealed to five custodians", init)

        def unseal() -> tuple[bool, str]:
            self.warden("custody", "unseal", "--custodian", "ada")
            self.warden("custody", "unseal", "--custodian", "alan")
            two = self.wjson("custody", "status")
            self.warden("custody", "unseal", "--custodian", "edsger")
            three = self.wjson("custody", "status")
            return two["sealed"] and not three[
                "sealed"
            ], f"after 2 shares: sealed ({two['progress']} of 3); after 3: unsealed"

        self.check("unsealed by three custodians (two are not enough)", unseal)

        def rekey() -> tuple[bool, str]:
            # a custody change: the unsealed agent alone will not do it; three current custodians approve the
            # exact statement (new shares for these age keys), then it runs once
            keys = {c: self.warden("custody", "keygen", "-o", f"{c}.agekey").stdout.strip() for c in CUSTODIANS}
            spec = [a for c in CUSTODIANS for a in ("--custodian", f"{c}={keys[c]}")]
            op = self.wjson("custody", "request", "reshare", "--threshold", "3", *spec)["op_id"]
            for c in ("ada", "alan"):
                self.warden("custody", "approve", op, "--custodian", c)
            early = self.warden("custody", "execute", op, expect=1)  # two approvals are not a quorum
            self.warden("custody", "approve", op, "--custodian", "edsger")
            done = self.wjson("custody", "execute", op)
            return ("QuorumError" in early.stderr and sorted(done["approvers"]) == ["ada", "alan", "edsger"]
                    and self.wjson("custody", "status")["split_id"] != ""), (
                "refused with 2 approvals; after a third, new 3-of-5 shares went to the five custodians' own age "
                f"keys (op {op[:8]}…, approved by {', '.join(sorted(done['approvers']))})")  # fmt: skip

        self.check("a custody change (re-share to new keys) needs a fresh quorum of that exact change", rekey)

    # -- 2. sealed checkpoint ---------------------------------------------------------------
    def seal(self) -> None:
        from demo import lm

        self.act("2. a checkpoint sealed, verified without the key, loaded into memory only")
        self.ids = lm.text_ids(__import__("inspect"))
        self.other = lm.text_ids(__import__("argparse"))
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("training a small Llama-shaped model (numpy)", total=STEPS)
            self.params = lm.train(lm.init(np.random.default_rng(0)), self.ids, STEPS, np.random.default_rng(1),
                                   batch=BATCH, on_step=lambda: prog.advance(task))  # fmt: skip
        self.base_loss = lm.loss(self.params, self.ids[:20000])
        self.model = lm.save(self.params, self.root / "demo-lm", training_tokens=STEPS * BATCH)
        self.check("model trained (loss well below uniform)",
                   lambda: (self.base_loss < np.log(lm.VOCAB) - 1.5,
                            f"{sum(v.size for v in self.params.values()):,} parameters, loss {self.base_loss:.2f} "
                            f"nats vs {np.log(lm.VOCAB):.2f} uniform"))  # fmt: skip
        self.sealed = self.root / "demo-lm.wws"

        def seal_verify() -> tuple[bool, str]:
            self.warden("seal", "demo-lm/model.safetensors", "-o", "demo-lm.wws", "--hide-header")
            blob = self.sealed.read_bytes()
            raw = (self.model / "model.safetensors").read_bytes()
            leaks = sum(raw[i : i + 32] in blob for i in range(4096, len(raw) - 32, 4099))
            v = self.wjson("verify", "demo-lm.wws")
            return leaks == 0 and b"gate_proj" not in blob and v["files"] == 1, (
                f"{len(blob):,} bytes, no plaintext window or tensor name; signature and "
                f"{v.get('chunks', '?')} chunk digests checked without the data key"
            )

        self.check("sealed (hidden header) and verified without the data key", seal_verify)

        def in_memory() -> tuple[bool, str]:
            import weightwarden as ww

            before = {p for p in self.root.rglob("*") if p.is_file()}
            t = ww.load(self.sealed, keyring=self.keyring())
            after = {p for p in self.root.rglob("*") if p.is_file()}
            same = lm.loss({k: np.asarray(v, np.float32) for k, v in t.items()}, self.ids[:20000])
            return same == self.base_loss and before == after, f"same loss {same:.4f}; no new file on disk"

        self.check("loaded into memory through the custody agent: same model, nothing written", in_memory)

    # -- 3. provenance ----------------------------------------------------------------------
    def register(self) -> None:
        self.act("3. the model registered for provenance")

        def register() -> tuple[bool, str]:
            j = self.wjson("provenance", "register", "demo-lm", "--name", "demo-lm")
            return j["registered"] == "demo-lm", f"{j['layers']} MLP blocks signed; the registry keeps no weights"

        self.check("registered (a signature of its weights, not the weights)", register)
