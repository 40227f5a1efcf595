"""The provenance-through-an-API world, shared by the tests of `warden provenance probe` and of
`warden scan --endpoints`: tiny Llama models trained once per session on Python's stdlib sources, served by
a real OpenAI-compatible HTTP server (tests/support/oai_server.py)."""

from __future__ import annotations

import pytest

N_REFS = 5


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("httpx")
    import transformers as T

    from tests.support.oai_server import Family, OAIServer, Served
    from weightwarden.provenance.probe import HFScorer

    root = tmp_path_factory.mktemp("probe-family")
    fam = Family(root, vocab=320, d=32, ff=96, seq=48, batch=8, text_limit=120_000)
    ours = fam.base(0, steps=90)
    refs = [fam.base(s, steps=90) for s in range(1, N_REFS + 1)]
    ind = fam.base(50, steps=90)
    ft = fam.finetune(ours, steps=15, lr=3e-4)  # a short fine-tune on other data
    i8 = Family.int8(ours)
    other_tok = Family(root / "other", vocab=600, d=32, ff=96, seq=48, batch=8, text_limit=40_000)
    cfg = T.LlamaConfig(vocab_size=len(other_tok.tokenizer), hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)  # fmt: skip
    other = T.LlamaForCausalLM(cfg).eval()
    srv = OAIServer()
    tok = fam.tokenizer
    urls = {
        "ft": srv.add("ft", Served(ft, tok, "suspect-ft")),
        "int8": srv.add("int8", Served(i8, tok, "suspect-int8")),
        "ind": srv.add("ind", Served(ind, tok, "suspect-ind")),
        "ft-t1": srv.add("ft-t1", Served(ft, tok, "suspect-ft", temperature=1.0)),
        "ind-t1": srv.add("ind-t1", Served(ind, tok, "suspect-ind", temperature=1.0)),
        "ft-text": srv.add("ft-text", Served(ft, tok, "suspect-ft", logprobs=False, temperature=1.0)),
        "ind-text": srv.add("ind-text", Served(ind, tok, "suspect-ind", logprobs=False, temperature=1.0)),
        "other-tok": srv.add("other-tok", Served(other, other_tok.tokenizer, "other")),
        "ref1": srv.add("ref1", Served(refs[0], tok, "ref1")),
        "budget": srv.add("budget", Served(ft, tok, "suspect-ft")),
    }
    for fault in ("500", "429:2", "hang", "nan", "positive", "unsorted", "switch:3", "badecho", "surrogate"):
        urls[fault] = srv.add(fault.replace(":", "-"), Served(i8, tok, "hostile", fault=fault))
    w = {
        "fam": fam, "srv": srv, "urls": urls, "root": root,
        "ours": HFScorer(model=ours, tokenizer=tok, name="ours"),
        "refs": [HFScorer(model=m, tokenizer=tok, name=f"ref{i + 1}") for i, m in enumerate(refs)],
        "prompts": [fam.text[i : i + 200] for i in range(2000, 100_000, 2500)],
        "paths": {"ours": fam.save(ours, "ours"), **{f"ref{i + 1}": fam.save(m, f"ref{i + 1}")
                                                    for i, m in enumerate(refs)}},
    }  # fmt: skip
    yield w
    srv.close()
