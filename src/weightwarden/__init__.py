"""weightwarden: custody, access, release and detection for AI model weights.

The sealed-checkpoint API in about ten names::

    import weightwarden as ww
    kr = ww.Keyring.create(home, passphrase)        # or ww.default_keyring()
    ww.seal("model.safetensors", "model.wws", keyring=kr)
    with ww.safe_open("model.wws", keyring=kr) as f:
        w = f.get_tensor("lm_head.weight")
    tensors = ww.load("model.wws", keyring=kr)
    ww.verify("model.wws")                          # no key needed
"""

from . import errors
from .api import default_keyring, inspect, load, open_sealed, safe_open, seal, unseal, verify
from .keys.keyring import Keyring
from .keys.truststore import TrustStore

__version__ = "0.1.0"

__all__ = [
    "Keyring",
    "TrustStore",
    "default_keyring",
    "errors",
    "inspect",
    "load",
    "open_sealed",
    "safe_open",
    "seal",
    "unseal",
    "verify",
]
