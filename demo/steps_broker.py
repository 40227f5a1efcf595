"""Act 4: the broker, the export-control gate, the two-person rule and the egress budget."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from typing import Any

from rich.table import Table

from demo.common import BATCH, LISTED, PARTNER, STEPS, DemoBase, DemoFailure, console, free_port


class BrokerSteps(DemoBase):
    # -- 4. broker, export gate, two-person rule, egress --------------------------------------
    def broker(self) -> None:
        import httpx
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from weightwarden.broker.tokens import mint
        from weightwarden.keys.provider import ed25519_key_id

        self.act("4. the broker: export gate, two approvers, a fingerprinted copy, egress budgets")

        def own_home() -> tuple[bool, str]:
            self.wjson("broker", "init", "--trust-from", str(self.home), broker=True)
            refused = self.warden("serve", "--port", str(free_port()), expect=1, timeout=60)  # the key host's home
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
        port = free_port()
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
                              "--plaintext", "--allow-sample-list", expect=4)  # fmt: skip  (4: denied, docs/CLI.md)
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
