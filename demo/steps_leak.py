"""Acts 5 and 6: the leak traced and scanned; the audit log verified, then tampered with."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
from rich.progress import Progress

from demo.common import BATCH, PARTNER, STEPS, DemoBase, console


class LeakSteps(DemoBase):
    # -- 5. leak ----------------------------------------------------------------------------
    def leak(self) -> None:
        from demo import lm

        self.act("5. the partner's copy leaks (fine-tuned, int4; served behind an API); trace and scan")
        hub = self.root / "hub"

        def leaked() -> tuple[bool, str]:
            from safetensors.numpy import load_file

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
        self.check("warden trace --endpoint names the partner behind an API", self.behind_api)

    def behind_api(self) -> tuple[bool, str]:
        """The partner's copy as it opened it, served by a rival's OpenAI-compatible API as is and after int8;
        traced through the API only (echoed prompts, every character's log-probability), with the master
        differentiated in numpy; an independent model behind the same kind of API accuses no one."""
        from safetensors.numpy import load_file

        from demo import lm
        from demo.endpoint import NumpyScorer, serve
        from weightwarden.trace.endpoint import trace_endpoint, variant

        t = load_file(str(self.root / "northwind-plain.safetensors"))
        copy = {k: np.asarray(v, np.float32) for k, v in t.items()}
        scorer = NumpyScorer(self.params)
        # every character once as a context (the model has no attention: its next-character distribution
        # depends on the current character only), each answer the whole distribution (128 log-probabilities)
        prompts = ["".join(map(chr, range(lm.VOCAB))) + "\0"]
        served = {"as is": copy, "int8": variant(copy, "int8"), "independent": lm.load(self.root / "hub" /
                                                                                       "independent-11")}  # fmt: skip
        reps = {}
        with self.key_host_env():
            provider = self.keyring().provider(purpose="tracing")
            for label, params in served.items():
                with serve(params, "rival-chat-1") as url:
                    reps[label] = trace_endpoint(url, self.model, provider=provider, scorer=scorer, model_id="demo-lm",
                                                 home=self.home, db=self.env["WARDEN_BROKER_DB"], prompts=prompts,
                                                 n_prompts=len(prompts), top=lm.VOCAB, population=10**6)  # fmt: skip
        if self.plot:
            from weightwarden.plots import trace_plot

            trace_plot(reps["as is"], self.figures / "trace-endpoint.png")
        acc = {k: [a["recipient"] for a in r.accused] for k, r in reps.items()}
        ok = acc["as is"] == [PARTNER] and acc["int8"] == [PARTNER] and acc["independent"] == []
        why = []
        for k, r in reps.items():
            j = r.to_json()
            top = f"{j['top'][0]['score']:.0f}" if j["top"] else "none"
            bound = f", bound {j['accused'][0]['false_accusation_bound']:.1e}" if j["accused"] else ""
            who = ", ".join(acc[k]) or "no one"
            why.append(f"{k}: {who} (top score {top} vs threshold {j['threshold']:.0f}{bound})")
        e = reps["as is"].endpoint or {}
        n = (f"{e.get('queries')} query per copy, {e.get('data_points', 0):,} log-probabilities each, "
             "population 10^6")  # fmt: skip
        return ok, f"{n}; accused {'; '.join(why)}"

    # -- 6. audit ---------------------------------------------------------------------------
    def audit(self) -> None:
        self.act("6. the tamper-evident audit log")

        def intact() -> tuple[bool, str]:
            j = self.wjson("audit", "verify", "--pubkey", self.pubkey, "--log-id", self.log_id, broker=True)
            rows = [json.loads(x) for x in self.warden("audit", "export").stdout.splitlines()]
            acts = {r["event"]["action"] for r in rows}
            steps = ("key:create", "custody:init", "custody:unseal", "model:seal", "model:verify", "key:unwrap",
                     "provenance:register", "approval:grant", "release:gate", "release:create", "trace:run",
                     "provenance:scan", "provenance:query")  # fmt: skip
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
            r = self.warden("audit", "verify", "--pubkey", self.pubkey, "--log-id", self.log_id, expect=3,
                            broker=True)  # fmt: skip
            return "Tampered" in r.stderr, f"row {idx} (an approval) edited: {r.stderr.strip()[:120]}"

        self.check("one edited row is caught", edited)
