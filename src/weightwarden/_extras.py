"""Optional capabilities and the extras that install them (``pip install 'weightwarden[EXTRA]'``).

The core install seals, opens, loads and verifies; everything else is an extra (pyproject.toml).  Every
import of an extra's package goes through :func:`require`, inside the function or module that needs it,
so that ``import weightwarden`` and ``import weightwarden.cli`` work without any extra, and a missing one
is one typed line (:class:`~weightwarden.errors.MissingExtraError`) naming the extra to install.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from .errors import MissingExtraError

__all__ = ["EXTRAS", "extra_imports", "require"]

#: extra -> the top-level modules of its distributions (what tests/test_light_core.py blocks)
EXTRAS: dict[str, tuple[str, ...]] = {
    "custody": ("Crypto",),
    "provenance": ("scipy", "safetensors"),
    "release": ("scipy", "rapidfuzz", "rigour", "icu"),
    "server": ("fastapi", "uvicorn", "psycopg", "cedarpy", "jwt", "httpx", "webauthn", "boto3", "botocore"),
    "client": ("jwt", "httpx"),
    "cluster": ("ray", "boto3", "botocore", "scipy"),
    "hsm": ("pkcs11",),
    "kms": ("boto3", "botocore", "hvac"),
    "plot": ("matplotlib",),
    "fast": ("numba",),
    "torch": ("torch",),
    "hf": ("torch", "transformers", "accelerate"),
}


def require(module: str, *names: str, extra: str) -> Any:
    """``module`` imported (or, given ``names``, its attribute of that name, or a tuple of them), else
    :class:`MissingExtraError` naming ``extra`` when it (or a package it needs) is not installed::

        linear_sum_assignment = require("scipy.optimize", "linear_sum_assignment", extra="provenance")

    Other import failures (a broken install) propagate as they are."""
    try:
        mod = importlib.import_module(module)
        got = [getattr(mod, n) if hasattr(mod, n) else importlib.import_module(f"{module}.{n}") for n in names]
    except ModuleNotFoundError as e:
        raise MissingExtraError(extra, e.name or module) from None
    if not names:
        return mod
    return got[0] if len(got) == 1 else tuple(got)


@contextlib.contextmanager
def extra_imports(extra: str) -> Iterator[None]:
    """``with extra_imports("hsm"): import pkcs11``: the module-level imports of a module that only
    ``extra``'s capability imports; a package missing there is :class:`MissingExtraError` naming ``extra``."""
    try:
        yield
    except ModuleNotFoundError as e:
        raise MissingExtraError(extra, e.name) from None
