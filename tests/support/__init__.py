"""Helpers the tests share (no fixtures: those are in tests/conftest.py; no test imports another test module).

cli.py       the `warden` runner, the test passphrase and cheap KDF, the broker's log key
models.py    tiny Llama-shaped checkpoints, the mixed-dtype tensor set, a sharded model folder
broker.py    a broker account that signs its request tokens
hsm.py       the SoftHSM2 library and PINs
services.py  real services the tests start and stop (SeaweedFS, OpenBao, free ports)
zoo.py       small trained models and their attacker derivations (extra `hf`; bench uses it too)
"""
