"""The SoftHSM2 library the PKCS#11 tests load, and the PINs of the token the ``softhsm`` fixture makes."""

from __future__ import annotations

import os

__all__ = ["PIN", "SOFTHSM_LIB", "SO_PIN"]

SOFTHSM_LIB = next(
    (
        p
        for p in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
        if os.path.exists(p)
    ),
    None,
)
PIN, SO_PIN = "246810", "13579111"
