"""Key providers and signers named by URI: one backend module per scheme, imported only when a URI of
its scheme is used (a node that never names an HSM needs no PKCS#11 library).

=============  =========================  ====================  ===========================================
scheme         backend module             extra                 URI
=============  =========================  ====================  ===========================================
``pkcs11:``    keys/pkcs11.py             ``hsm``               ``pkcs11:token=T;object=O?module-path=..``
``awskms:``    keys/awskms.py             ``kms``               ``awskms:///ARN`` (also ``aws-kms://ARN``)
``vault:``     keys/vault.py              ``kms``               ``vault://MOUNT/keys/NAME``
``agent:``     keys/agent_client.py       (none)                ``agent:HOME`` (signers only)
=============  =========================  ====================  ===========================================

The local keyring is not named by a URI: it needs a passphrase or an unsealed agent
(``api.default_keyring``).  An age recipient is a release's (``keys/age.py``), not a provider a node
picks.  Every refusal is a :class:`~weightwarden.errors.KeyProviderError` (also a ``ValueError``, as the
URI functions raised before): an unknown scheme, a malformed URI, or a backend whose optional
dependency is missing (the message is :class:`~weightwarden.errors.MissingExtraError`'s line naming the extra).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import KeyProviderError, MissingExtraError
from .provider import KeyProvider, Signer

__all__ = ["Backend", "provider_from_uri", "register", "scheme_of", "schemes", "signer_from_uri"]

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]{0,31}):")


@dataclass(frozen=True)
class Backend:
    """Where a scheme's code lives: ``module`` (imported when used), its functions that build a provider
    and a signer from a URI (None: the scheme names no such thing), the extra that installs what it needs
    and the top-level modules that extra provides."""

    module: str
    provider: str | None = "from_uri"
    signer: str | None = None
    extra: str | None = None
    requires: tuple[str, ...] = ()


_BACKENDS: dict[str, Backend] = {}


def register(scheme: str, backend: Backend) -> None:
    """Name ``backend`` for URIs ``scheme:...`` (a later registration of the same scheme replaces it)."""
    if not _SCHEME.match(scheme + ":"):
        raise KeyProviderError(f"{scheme[:40]!r} is not a URI scheme (lower-case letters, digits, '+', '-', '.')")
    _BACKENDS[scheme] = backend


_KMS = ("boto3", "botocore")
register("pkcs11", Backend("weightwarden.keys.pkcs11", "from_uri", "signer_from_uri", "hsm", ("pkcs11",)))
register("awskms", Backend("weightwarden.keys.awskms", extra="kms", requires=_KMS))
register("aws-kms", Backend("weightwarden.keys.awskms", extra="kms", requires=_KMS))
register("vault", Backend("weightwarden.keys.vault", extra="kms", requires=("hvac", "requests")))
register("agent", Backend("weightwarden.keys.agent_client", provider=None, signer="signer_from_uri"))


def schemes() -> list[str]:
    """The registered schemes, sorted."""
    return sorted(_BACKENDS)


def scheme_of(uri: str) -> str | None:
    """The scheme of ``uri`` (``pkcs11``, ``awskms``, ...), or None when it has none."""
    m = _SCHEME.match(uri) if isinstance(uri, str) else None
    return m.group(1) if m else None


def _call(uri: str, kind: str, **kw: Any) -> Any:
    scheme = scheme_of(uri)
    backend = _BACKENDS.get(scheme or "")
    fn_name = None if backend is None else (backend.provider if kind == "provider" else backend.signer)
    if backend is None or fn_name is None:
        known = [s for s, b in sorted(_BACKENDS.items()) if (b.provider if kind == "provider" else b.signer)]
        what = "key provider" if kind == "provider" else "signer"
        raise KeyProviderError(
            f"unknown {what} URI scheme in {str(uri)[:40]!r}: use one of " + ", ".join(f"{s}:" for s in known)
        )
    try:
        fn = getattr(importlib.import_module(backend.module), fn_name)
        return fn(uri, **kw)
    except MissingExtraError as e:  # the backend's imports (_extras.require): the same one line, as a refusal
        raise KeyProviderError(str(e)) from None
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in backend.requires or backend.extra is None:
            raise
        raise KeyProviderError(str(MissingExtraError(backend.extra, e.name))) from None


def provider_from_uri(uri: str) -> KeyProvider:
    """The key provider a URI names: ``pkcs11:...``, ``awskms:///ARN``, ``aws-kms://ARN``,
    ``vault://MOUNT/keys/NAME`` (:class:`KeyProviderError` for anything else)."""
    provider: KeyProvider = _call(uri, "provider")
    return provider


def signer_from_uri(uri: str, *, create: bool = False, purpose: str | None = None) -> Signer:
    """The signing key a URI names: ``pkcs11:...;object=LABEL`` (made there with ``create``) or
    ``agent:HOME`` (held by the custody agent of HOME); ``purpose`` is the purpose it must have."""
    signer: Signer = _call(uri, "signer", create=create, purpose=purpose)
    return signer
