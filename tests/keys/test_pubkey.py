"""The one parser of Ed25519 public keys given by people (keys/pubkey.py)."""

from __future__ import annotations

import base64

import pytest

from weightwarden.errors import WardenError
from weightwarden.keys.pubkey import parse_public_key

RAW = bytes(range(32))


def test_hex_base64_and_the_export_public_line(tmp_path) -> None:
    b64 = base64.b64encode(RAW).decode()
    assert parse_public_key(RAW.hex()) == RAW
    assert parse_public_key(b64) == RAW
    assert parse_public_key(f"kid-1234 {b64}\n") == RAW
    f = tmp_path / "alice.pub"
    f.write_text(f"kid-1234 {b64}\n")
    assert parse_public_key(str(f), files=True) == RAW


@pytest.mark.parametrize("bad", ["", "zz", base64.b64encode(b"short").decode(), "00" * 31])
def test_anything_else_is_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(WardenError, match="--trust-key is an Ed25519 public key"):
        parse_public_key(bad, "--trust-key")
