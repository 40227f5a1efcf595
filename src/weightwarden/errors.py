"""Every error weightwarden raises on purpose derives from :class:`WardenError`.

One type per failure a caller may want to handle differently.  Messages never
contain key material, passphrases or plaintext.
"""

from __future__ import annotations


class WardenError(Exception):
    """Base class of all weightwarden errors."""


# --- sealed format -----------------------------------------------------------
class FormatError(WardenError):
    """The input is not a well-formed sealed file (bad magic, bad structure)."""


class UnsupportedVersionError(FormatError):
    """The file uses a format version or algorithm id this build does not know."""


class TruncatedError(FormatError):
    """The file is shorter (or longer) than its own context says it must be."""


class HeaderError(FormatError):
    """A tensor header or context is hostile or inconsistent (offsets, sizes, JSON)."""


class IntegrityError(WardenError):
    """Ciphertext, header or manifest does not match what was signed/authenticated."""


class DecryptionError(IntegrityError):
    """An AEAD tag failed: the data was tampered with, reordered or truncated."""


class SignatureError(IntegrityError):
    """The manifest signature is invalid."""


class UntrustedSignerError(SignatureError):
    """The manifest is validly signed, but by a key that is not trusted."""


# --- keys ----------------------------------------------------------------------
class KeyManagementError(WardenError):
    """Base class of key-management errors."""


class WrongKeyError(KeyManagementError):
    """No available key can unwrap this file's data key."""


class KeyNotFoundError(KeyManagementError):
    """A key id or version is not known to the provider."""


class KeyDisabledError(KeyManagementError):
    """The key version exists but is disabled (it can be enabled again)."""


class KeyDestroyedError(KeyManagementError):
    """The key version was destroyed: what it protected is unreadable for good."""


class ProviderUnavailableError(KeyManagementError):
    """The key provider cannot be reached (token missing, service down, wrong PIN)."""


class CustodyError(KeyManagementError):
    """M-of-N custody: a bad, foreign, duplicate or insufficient set of shares."""


class KeyringError(KeyManagementError):
    """The keyring is missing, corrupt or cannot be written."""


class BadPassphraseError(KeyringError):
    """The passphrase does not unlock the keyring."""


# --- files ---------------------------------------------------------------------
class OutputExistsError(WardenError):
    """The output path exists and overwriting was not requested."""


class UnsupportedModelError(WardenError):
    """The input is not a checkpoint this tool can handle."""


class RegistryError(WardenError):
    """The provenance registry is missing, damaged, or lacks the model asked for."""


class ScanError(WardenError):
    """A hub scan could not start or resume (bad input list, unreadable state, no cluster)."""


class AuditLogError(WardenError):
    """The audit log is unusable or asked for something it does not hold (bad index, no key)."""


class AuditTamperedError(AuditLogError, IntegrityError):
    """The audit log's events, nodes or heads disagree with a signed tree head: it was altered."""


class NoAuditLogError(AuditLogError):
    """There is no audit log yet where one was looked for (nothing has been logged there)."""


__all__ = [
    "AuditLogError",
    "AuditTamperedError",
    "BadPassphraseError",
    "CustodyError",
    "DecryptionError",
    "FormatError",
    "HeaderError",
    "IntegrityError",
    "KeyDestroyedError",
    "KeyDisabledError",
    "KeyManagementError",
    "KeyNotFoundError",
    "KeyringError",
    "NoAuditLogError",
    "OutputExistsError",
    "ProviderUnavailableError",
    "RegistryError",
    "ScanError",
    "SignatureError",
    "TruncatedError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "UntrustedSignerError",
    "WardenError",
    "WrongKeyError",
]
