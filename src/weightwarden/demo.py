"""`make demo`: the whole life of a checkpoint, end to end, on embedded defaults.

Local keyring under 3-of-5 custody, SQLite, a local Ray, the shipped sample screening list and a
small Llama-shaped model trained here in numpy.  Every step runs the real `warden` command (shown
as it runs) or the library call behind it, and checks its result; the run exits non-zero if any
result is wrong.  Six acts:

1. custody initialised with 3 of 5 custodians, then unsealed by three of them; a re-share to the
   custodians' own age keys runs only after three of them approve that exact change;
2. a checkpoint sealed, verified without the key, loaded into memory with no plaintext on disk;
3. the model registered for provenance;
4. the broker started in a home of its own (the trust store's public keys, its log key, its
   database: no keyring, no agent socket, no passphrase); a release to a partner requested,
   decided by the export-control gate, approved by two approvers, fingerprinted from the sealed
   master, sealed to the partner's own key and streamed within its egress budget (the partner
   opens it with its key; ours cannot); a release to a listed party refused with its reasons;
5. the partner's copy leaks after fine-tuning and int4 quantisation: `warden trace` names the
   partner, `warden scan` finds the derived copy and clears two independent models;
6. `warden audit verify` proves the log intact, then catches one edited row.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from weightwarden._extras import require
from weightwarden.errors import MissingExtraError

console = Console()
PARTNER = "Northwind Research Ltd"
LISTED = "Sergei I. Petrov"  # "Sergei Ivanovich Petrov" on the shipped (fictitious) sample list
CUSTODIANS = ("ada", "grace", "alan", "barbara", "edsger")
STEPS, BATCH = 250, 256  # base model training: 64,000 tokens seen


class DemoFailure(Exception):
    pass


class Demo:
    def __init__(self, root: Path, plot: bool, figures: Path):
        self.root = root
        self.home = root / "home"
        self.plot = plot
        self.figures = figures
        self.checks: list[tuple[str, bool, str]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
        self.env |= {"WARDEN_HOME": str(self.home), "WARDEN_PASSPHRASE": "demo passphrase, use a real one",
                     "COLUMNS": "140", "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
        for c in CUSTODIANS:
            self.env[f"WARDEN_CUSTODIAN_PASSPHRASE_{c.upper()}"] = f"{c}'s own passphrase"
        self.server: subprocess.Popen[bytes] | None = None
        # the broker host: a home of its own, an environment with no keyring passphrase or custodian's variable
        self.bhome = root / "broker-home"
        self.benv = {k: v for k, v in self.env.items() if not k.startswith(("WARDEN_PASSPHRASE", "WARDEN_CUSTODIAN"))}
        self.benv["WARDEN_HOME"] = str(self.bhome)

    # -- plumbing ---------------------------------------------------------------------------
    def warden(self, *args: str, expect: int | None = 0, timeout: float = 300,
               broker: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``warden ARGS`` on the key host, or (``broker``) on the broker host, in the broker's own home."""
        shown = " ".join(shlex.quote(a.replace(str(self.root) + "/", "")) for a in args)
        console.print(f"  [dim]{'broker-host' if broker else 'key-host'}$ warden {shown}[/dim]")
        r = subprocess.run([sys.executable, "-m", "weightwarden", *args], env=self.benv if broker else self.env,
                           capture_output=True, text=True, timeout=timeout, cwd=self.root)  # fmt: skip
        if expect is not None and r.returncode != expect:
            raise DemoFailure(f"`warden {args[0]}` exited {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
        return r

    def wjson(self, *args: str, broker: bool = False) -> Any:
        return json.loads(self.warden(*args, "--json", broker=broker).stdout)

    def check(self, name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # a step that raises has failed; the demo goes on to report the rest
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        self.checks.append((name, ok, f"{detail} ({time.perf_counter() - t:.1f}s)"))
        console.print(("[green]✔[/green] " if ok else "[red]✘[/red] ") + name + f"  [dim]{detail}[/dim]")
        return ok

    def act(self, title: str) -> None:
        console.rule(f"[bold]{title}")

    def keyring(self) -> Any:
        from weightwarden.keys.agent import AgentKeyring

        return AgentKeyring(self.home)

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
        from weightwarden import _demo_lm as lm

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

    # -- 4. broker, export gate, two-person rule, egress --------------------------------------
    def broker(self) -> None:
        httpx = require("httpx", extra="client")
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from weightwarden.broker.tokens import mint
        from weightwarden.keys.provider import ed25519_key_id

        self.act("4. the broker: export gate, two approvers, a fingerprinted copy, egress budgets")

        def own_home() -> tuple[bool, str]:
            self.wjson("broker", "init", "--trust-from", str(self.home), broker=True)
            refused = self.warden("serve", "--port", str(_free_port()), expect=1, timeout=60)  # the key host's home
            held = sorted(p.relative_to(self.bhome).as_posix() for p in self.bhome.rglob("*")
                          if p.is_file() and not p.name.startswith("broker.db"))  # fmt: skip
            ok = ("BrokerHomeError" in refused.stderr and held == ["broker/log-key.json", "broker/log-key.pub",
                                                                   "trusted.json"])  # fmt: skip
            return ok, f"broker-home holds {', '.join(held)}; serve beside the keyring refused (BrokerHomeError)"

        self.check("the broker in a home of its own: public keys and its log key, no keyring", own_home)
        keys = {}
        people = [
            ("riley", "human", "releaser"),
            ("ana", "human", "approver"),
            ("bo", "human", "approver"),
            ("inference-7", "workload", "inference-loader"),
        ]
        for name, kind, role in people:
            k = Ed25519PrivateKey.generate()
            pub = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            keys[name] = (k, ed25519_key_id(pub))
            self.warden("broker", "account", name, "--pubkey", pub.hex(), "--kind", kind, "--role", role,
                        "--team", "research", broker=True)  # fmt: skip
        tokens = str(STEPS * BATCH)
        # the broker holds no keyring, only its own log key: the hidden header is classified here, on the key side
        cls = self.warden("classify", "demo-lm.wws", "--tokens", tokens, "--json")
        (self.root / "demo-lm.classification.json").write_text(cls.stdout)
        self.warden("broker", "model", "demo-lm", "demo-lm.wws", "--team", "research", "--tokens", tokens,
                    "--classification", "demo-lm.classification.json", broker=True)  # fmt: skip
        port = _free_port()
        log = open(self.root / "serve.log", "wb")
        self.server = subprocess.Popen([sys.executable, "-m", "weightwarden", "serve", "--port", str(port),
                                        "--egress-rate", "1000", "--egress-burst", "3000000", "--allow-sample-list"],
                                       env=self.benv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)  # fmt: skip
        console.print(f"  [dim]broker-host$ warden serve --port {port} --egress-rate 1000 --egress-burst 3000000 "
                      "--allow-sample-list &"
                      "[/dim]")  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise DemoFailure("the broker did not start: " + (self.root / "serve.log").read_text()[-400:])
        self.pubkey = next(ln.split(": ")[-1].strip() for ln in (self.root / "serve.log").read_text().splitlines()
                           if "audit log public key" in ln)  # fmt: skip
        self.log_id = next(ln.split(": ")[-1].strip() for ln in (self.root / "serve.log").read_text().splitlines()
                           if "audit log id" in ln)  # fmt: skip

        def call(who: str, method: str, path: str, **kw: Any) -> httpx.Response:
            k, kid = keys[who]
            tok = mint(who, k, kid, "weightwarden-broker", method, path)
            return httpx.request(method, base + path, headers={"authorization": f"Bearer {tok}"}, timeout=60, **kw)

        def gate_table(g: dict[str, Any]) -> None:
            t = Table("reason", "outcome", "detail", title=f"export-control gate: {g['decision'].upper()} "
                      f"(rules {g['rules_version']})", title_justify="left")  # fmt: skip
            for r in g["reasons"]:
                t.add_row(r["code"], r["outcome"], r["text"][:110])
            console.print(t)

        rid = ""

        def request() -> tuple[bool, str]:
            nonlocal rid
            r = call("riley", "POST", "/v1/requests", json={"model": "demo-lm", "action": "release",
                     "recipient": PARTNER, "country": "GB", "reason": "evaluation partnership"})  # fmt: skip
            req = r.json()
            rid = req.get("id", "")
            gate_table(req["gate"])
            return r.status_code == 201 and req["gate"]["decision"] == "allow", (
                f"classified ({req['gate']['classification']['total_params']:,} parameters, "
                f"{req['gate']['classification']['compute_flop']:.1e} FLOP), partner screened clear: allow"
            )

        self.check(f"release to {PARTNER} (GB) requested: classified and screened by the gate", request)

        def approve() -> tuple[bool, str]:
            self_ok = call("riley", "GET", f"/v1/requests/{rid}").json()
            for who in ("ana", "bo"):
                msg = bytes.fromhex(call(who, "GET", f"/v1/requests/{rid}").json()["message_to_sign"])
                r = call(who, "POST", f"/v1/requests/{rid}/approvals", json={"signature": keys[who][0].sign(msg).hex()})
            own = call("riley", "POST", f"/v1/requests/{rid}/approvals", json={"signature": "0" * 128})
            st = r.json()
            return (
                self_ok["status"] == "pending" and st["status"] == "approved" and own.status_code in (403, 409),
                f"signed by {', '.join(st['approvals'])}; the requester's own approval refused ({own.status_code})",
            )

        self.check("approved by two approvers (two-person rule; signatures over the gate's decision)", approve)

        def release() -> tuple[bool, str]:
            import pyrage
            from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

            partner = pyrage.x25519.Identity.generate()  # the partner's own key pair: we only see the public half
            (self.root / "northwind.key").write_text(f"{partner}\n")
            os.chmod(self.root / "northwind.key", 0o600)
            self.warden("recipient", "add", PARTNER, "--pubkey", str(partner.to_public()))
            # consumed through the broker's database and log; the copy goes into the broker's store
            self.warden("release", "demo-lm.wws", "--model-id", "demo-lm", "--to", PARTNER, "--country", "GB",
                        "--request", rid, "-o", "for-northwind.wws", "--store", str(self.bhome / "broker" / "weights"),
                        "--log-key", f"file:{self.bhome / 'broker' / 'log-key.json'}",
                        "--log-key-passphrase-file", str(self.root / "log-key.pass"),
                        "--allow-sample-list")  # fmt: skip
            (self.root / "riley.pem").write_bytes(keys["riley"][0].private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                                                 NoEncryption()))  # fmt: skip
            # the requester's client signs its own request tokens, resumes after a cut, verifies, then renames
            pulled = self.wjson("pull", "demo-lm", "-o", "delivered.wws", "--request", rid, "--broker", base,
                               "--account", "riley", "--key", "riley.pem")  # fmt: skip
            got = (self.root / "delivered.wws").read_bytes()
            again = call("riley", "GET", f"/v1/requests/{rid}/download")
            same = got == (self.root / "for-northwind.wws").read_bytes()
            return pulled["bytes"] == len(got) and same and again.status_code == 409, (
                f"{len(got):,} bytes of the partner's fingerprinted copy, released from the sealed master and sealed "
                f"to the partner's key, pulled (`warden pull`, verified) within a 3 MB budget; a second download "
                f"refused ({again.status_code})"
            )

        self.check("fingerprinted for the partner from the sealed master, sealed to their key, streamed once",
                   release)  # fmt: skip

        def partner_opens() -> tuple[bool, str]:
            import weightwarden as ww
            from weightwarden.errors import WrongKeyError
            from weightwarden.keys.age import AgeIdentityProvider

            our_key = self.wjson("key", "export-public")["public_key"]  # handed to the partner with the copy
            self.warden("open", "delivered.wws", "-o", "northwind-plain.safetensors", "--identity", "northwind.key",
                        "--trust-key", our_key)  # fmt: skip
            try:
                ww.load(self.root / "delivered.wws", keyring=self.keyring())
                ours = "opened it"
            except WrongKeyError:
                ours = "cannot open it"
            ok = (self.root / "northwind-plain.safetensors").stat().st_size > 0 and ours == "cannot open it"
            ident = AgeIdentityProvider.from_file(self.root / "northwind.key")
            n = len(ww.load(self.root / "delivered.wws", providers=[ident], trust=[base64.b64decode(our_key)]))
            return ok, f"the partner opens it with its own key ({n} tensors, our signature checked); our keyring {ours}"

        self.check("the partner opens its copy with its own key; ours cannot", partner_opens)

        def egress() -> tuple[bool, str]:
            first = call("inference-7", "GET", "/v1/models/demo-lm/weights")
            second = call("inference-7", "GET", "/v1/models/demo-lm/weights")
            return first.status_code == 200 and second.status_code == 429, (
                f"a workload's first stream {len(first.content):,} bytes; the second would exceed its 3 MB budget: "
                f"{second.status_code} and an alert"
            )

        self.check("egress budget enforced on a workload's streams", egress)

        def refused() -> tuple[bool, str]:
            r = call("riley", "POST", "/v1/requests", json={"model": "demo-lm", "action": "release",
                     "recipient": LISTED, "country": "DE"})  # fmt: skip
            g = r.json()["gate"]
            gate_table(g)
            cli = self.warden("release", "demo-lm", "--to", LISTED, "--country", "DE", "-o", "x", "--json",
                              "--plaintext", "--allow-sample-list", expect=1)  # fmt: skip
            j = json.loads(cli.stdout)
            return (g["decision"] == "deny" and j["released"] is False and not (self.root / "x").exists()
                    and any(c.startswith("screening:") for c in g["blocking"]),
                    f"{g['blocking'][0]}: needs a two-person override to go anywhere; nothing written")  # fmt: skip

        self.check(f"release to a listed party ({LISTED}) refused with reasons", refused)

        def others() -> tuple[bool, str]:
            for who, cc in (("Blue Harbor AI", "FR"), ("Kestrel Systems", "JP")):
                self.warden("release", "demo-lm", "--to", who, "--country", cc, "--tokens", tokens,
                            "-o", who.split()[0].lower(), "--plaintext", "--allow-sample-list")  # fmt: skip
            return True, "two more partners hold their own fingerprinted copies"

        self.check("two more partners released to (the gate allows them)", others)

    # -- 5. leak ----------------------------------------------------------------------------
    def leak(self) -> None:
        from weightwarden import _demo_lm as lm

        self.act("5. the partner's copy leaks (fine-tuned, int4); trace and scan")
        hub = self.root / "hub"

        def leaked() -> tuple[bool, str]:
            load_file = require("safetensors.numpy", "load_file", extra="provenance")

            t = load_file(str(self.root / "northwind-plain.safetensors"))  # what the partner opened
            p = {k: np.asarray(v, np.float32) for k, v in t.items()}
            with Progress(console=console, transient=True) as prog:
                task = prog.add_task("the leaker fine-tunes its copy on other text", total=150)
                p = lm.train(p, self.other, 150, np.random.default_rng(7), lr=1e-3, batch=BATCH,
                             on_step=lambda: prog.advance(task))  # fmt: skip
            p = lm.int4_round_trip(p)
            lm.save(p, hub / "suspicious-lm")
            drift = float(np.std(p["model.layers.1.mlp.down_proj.weight"]
                                 - self.params["model.layers.1.mlp.down_proj.weight"])
                          / np.std(self.params["model.layers.1.mlp.down_proj.weight"]))  # fmt: skip
            return True, f"150 steps of fine-tuning then int4: weights moved by {drift:.0%} of their spread"

        self.check("the partner's copy fine-tuned and quantised to int4, then found on a hub", leaked)

        def trace() -> tuple[bool, str]:
            args = ["trace", "hub/suspicious-lm", "--model", "demo-lm", "--model-id", "demo-lm"]
            if self.plot:
                args += ["--plot", str(self.figures / "trace.png")]
            j = self.wjson(*args)
            acc = [a["recipient"] for a in j["accused"]]
            if not acc:
                return False, f"no one accused: {j['top']}"
            bound = j["accused"][0]["false_accusation_bound"]
            return acc == [PARTNER], (f"accused: {', '.join(acc)} (score {j['top'][0]['score']:.0f} vs threshold "
                                      f"{j['threshold']:.0f}; false-accusation bound {bound:.1e})")  # fmt: skip

        self.check("warden trace names the partner", trace)

        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("two independent models trained elsewhere", total=2 * STEPS)
            for seed, mod in ((11, "email.message"), (12, "typing")):
                ids = lm.text_ids(__import__(mod, fromlist=["x"]))
                q = lm.train(lm.init(np.random.default_rng(seed)), ids, STEPS, np.random.default_rng(seed),
                             batch=BATCH, on_step=lambda: prog.advance(task))  # fmt: skip
                lm.save(q, hub / f"independent-{seed}")

        def scan() -> tuple[bool, str]:
            j = self.wjson("scan", "hub", "--workers", "2")
            derived = {Path(d["item"]).name: d["derived_from"] for d in j["derived"]}
            return derived == {"suspicious-lm": "demo-lm"} and not j["errors"] and j["items"] == 3, (
                f"{j['items']} models scanned on a local Ray: suspicious-lm derived from demo-lm "
                f"(p = 1e{j['derived'][0]['log10_p_value']:.0f}), 2 independent models cleared"
            )

        self.check("warden scan finds the derived copy and clears the independent ones", scan)

        def compare() -> tuple[bool, str]:
            args = ["provenance", "compare", "hub/suspicious-lm", "demo-lm"]
            if self.plot:
                args += ["--plot", str(self.figures / "compare.png")]
            j = self.wjson(*args)
            ind = self.wjson("provenance", "compare", "hub/independent-11", "demo-lm")
            figs = f"; figures in {self.figures}" if self.plot else ""
            return j["decision"] == "derived" and ind["decision"] != "derived", (
                f"per-layer evidence: log10 p = {j['log10_p_value']:.0f} (derived) vs {ind['log10_p_value']:.1f} "
                f"for an independent model{figs}"
            )

        self.check("warden provenance compare shows the per-layer evidence", compare)

    # -- 6. audit ---------------------------------------------------------------------------
    def audit(self) -> None:
        self.act("6. the tamper-evident audit log")

        def intact() -> tuple[bool, str]:
            j = self.wjson("audit", "verify", "--pubkey", self.pubkey, "--log-id", self.log_id, broker=True)
            rows = [json.loads(x) for x in self.warden("audit", "export").stdout.splitlines()]
            acts = {r["event"]["action"] for r in rows}
            steps = ("key:create", "custody:init", "custody:unseal", "model:seal", "model:verify", "key:unwrap",
                     "provenance:register", "approval:grant", "release:gate", "release:create", "trace:run",
                     "provenance:scan")  # fmt: skip
            missing = [a for a in steps if a not in acts]
            return j["events"] > 20 and j["events"] == len(rows) and not missing, (
                f"{j['events']} events, {j['heads_checked']} signed heads, pinned key {self.pubkey[:12]}… "
                f"and log {self.log_id[:12]}…; every step in it" + (f" but {missing}" if missing else ""))  # fmt: skip

        self.check("warden audit verify: every event of the home's one trail (CLI and broker) is intact", intact)

        def edited() -> tuple[bool, str]:
            db = sqlite3.connect(self.bhome / "broker" / "broker.db")
            with db:
                rows = db.execute("SELECT idx, body FROM ww_audit_events ORDER BY idx").fetchall()
                idx, body = next((i, bytes(b)) for i, b in rows if b'"approval:grant"' in bytes(b))
                db.execute(
                    "UPDATE ww_audit_events SET body = ? WHERE idx = ?", (body.replace(b'"ok"', b'"no"', 1), idx)
                )
            db.close()
            r = self.warden("audit", "verify", "--pubkey", self.pubkey, "--log-id", self.log_id, expect=1,
                            broker=True)  # fmt: skip
            return "Tampered" in r.stderr, f"row {idx} (an approval) edited: {r.stderr.strip()[:120]}"

        self.check("one edited row is caught", edited)

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
        if (self.home / "custody.json").exists():
            self.warden("custody", "seal", expect=None)
            self.warden("agent", "stop", expect=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weightwarden.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--figures", type=Path, help="write the trace and provenance figures here (PNG)")
    a = ap.parse_args(argv)
    try:
        require("matplotlib", extra="plot")
        plot = True
    except MissingExtraError:  # the plot extra is not installed: the demo runs without the figure
        plot = False
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="warden-demo-") as tmp:
        root = a.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        figures = (a.figures or root / "figures").resolve()
        if plot:
            figures.mkdir(parents=True, exist_ok=True)
        demo = Demo(root.resolve(), plot, figures)
        try:
            for act in (demo.custody, demo.seal, demo.register, demo.broker, demo.leak, demo.audit):
                try:
                    act()
                except DemoFailure as e:
                    demo.checks.append((act.__name__, False, str(e)))
                    console.print(f"[red]✘ {act.__name__}: {e}[/red]")
                    break
        finally:
            demo.close()
    table = Table("step", "result", "detail", title=f"summary ({time.perf_counter() - t0:.0f} s)")
    for name, ok, detail in demo.checks:
        table.add_row(name, "[green]ok[/green]" if ok else "[red]FAILED[/red]", detail)
    console.print(table)
    failed = [c for c in demo.checks if not c[1]]
    console.print("[bold green]all checks passed[/bold green]" if not failed
                  else f"[bold red]{len(failed)} failed[/bold red]")  # fmt: skip
    return 1 if failed or len(demo.checks) < 21 else 0  # every check ran


if __name__ == "__main__":
    sys.exit(main())
