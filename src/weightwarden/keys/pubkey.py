"""The one parser of Ed25519 public keys given by people: on the command line, in a file, in an environment
variable.

A key is accepted as 64 hex digits, as base64, or as the line `warden key export-public` prints
(``KEY_ID BASE64``: the last word is taken).  With ``files=True`` the text may also name a file that holds one
of these.  Anything else, or a key that is not 32 bytes, is refused with one line that names ``what`` (the flag
or field) and the forms it takes.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from ..errors import WardenError

__all__ = ["parse_public_key"]

ED25519_PUBLIC_KEY_LEN = 32


def parse_public_key(text: str, what: str = "the public key", *, files: bool = False) -> bytes:
    """The 32 raw bytes of the Ed25519 public key in ``text`` (hex, base64, or `warden key export-public`'s line;
    with ``files``, also a file holding one of these)."""
    if files:
        p = Path(text)
        try:
            if p.is_file():
                text = p.read_text()
        except (OSError, ValueError):
            pass  # not a readable file: parsed as the key itself
    token = text.strip().split()[-1] if text.strip() else ""
    key = b""
    if len(token) == 2 * ED25519_PUBLIC_KEY_LEN:
        try:
            key = bytes.fromhex(token)
        except ValueError:
            key = b""
    if not key:
        try:
            key = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            key = b""
    if len(key) != ED25519_PUBLIC_KEY_LEN:
        raise WardenError(f"{what} is an Ed25519 public key: 64 hex digits, base64 (32 bytes), or the output of "
                          "`warden key export-public`")  # fmt: skip
    return key
