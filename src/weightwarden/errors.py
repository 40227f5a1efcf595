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


class KeyProviderError(KeyManagementError, ValueError):
    """A key-provider URI is malformed, names an unknown scheme, or needs an extra that is not installed."""


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


class PrivateAddressError(WardenError):
    """A host named by an untrusted list resolves to a non-public address (or to none): refused."""


class AuditLogError(WardenError):
    """The audit log is unusable or asked for something it does not hold (bad index, no key)."""


class AuditTamperedError(AuditLogError, IntegrityError):
    """The audit log's events, nodes or heads disagree with a signed tree head: it was altered."""


class LogKeyError(KeyringError):
    """The broker's log key is missing, malformed or named by an unusable --log-key URI."""


class KeysNotHereError(WardenError):
    """The operation needs key material that this process (the broker) does not hold by design."""
class RecipientKeyError(WardenError):
    """A recipient's public key (age X25519) or private identity is missing or malformed."""


class UnmarkableFilesError(UnsupportedModelError):
    """A release or seal input holds files that cannot be fingerprinted or copied safely (other weight
    formats, links, special files); ``files`` names every one."""

    def __init__(self, message: str, files: list[str] | None = None):
        super().__init__(message)
        self.files = list(files or [])


class RecipientNameError(WardenError):
    """A recipient name holds control, format or bidi characters, or is empty or too long."""


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
    "KeyProviderError",
    "KeyringError",
    "KeysNotHereError",
    "LogKeyError",
    "NoAuditLogError",
    "OutputExistsError",
    "PrivateAddressError",
    "ProviderUnavailableError",
    "RecipientKeyError",
    "RecipientNameError",
    "RegistryError",
    "ScanError",
    "SignatureError",
    "TruncatedError",
    "UnmarkableFilesError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "UntrustedSignerError",
    "WardenError",
    "WrongKeyError",
]


# --- custody quorum and key-use policy (issue 16) ---------------------------------------
class QuorumError(CustodyError):
    """A custody change lacks a fresh quorum of approvals for that exact operation (too few, replayed,
    for another operation, given before it was requested, or the request expired)."""


class PolicyDeniedError(KeyManagementError):
    """The key-use policy does not let this caller (OS user, workload) do this with this key."""


__all__ += ["PolicyDeniedError", "QuorumError"]


# --- key purposes (issue 16) ---------------------------------------------------------
class KeyPurposeError(SignatureError):
    """A key of one purpose (sealing, audit-log, export-rules, tracing) was used or offered for another."""


class HeadKeyPurposeError(KeyPurposeError, AuditTamperedError):
    """An audit tree head is signed by a key that is not an audit-log key."""


class LogIdentityError(AuditTamperedError):
    """A tree head, proof or database belongs to another audit log than the one pinned."""


__all__ += ["HeadKeyPurposeError", "KeyPurposeError", "LogIdentityError"]


class LoaderError(UnsupportedModelError):
    """A loader cannot serve this request: unknown framework or device, a bad slice, a missing extra."""


__all__ += ["LoaderError"]
class DeclarationError(WardenError):
    """A training-compute declaration that is unsigned, signed by an untrusted key, malformed, or names
    another model (issue 17)."""


__all__ += ["DeclarationError"]


class BrokerHomeError(WardenError):
    """`warden serve` was pointed at a home that holds a keyring or a custody agent's socket: the broker
    runs in a home of its own (trust store, log key, database), never beside the keys."""


__all__ += ["BrokerHomeError"]
class NoAuditLogError(AuditLogError):
    """There is no audit log yet where one was looked for (nothing has been logged there)."""


class NoSuchTensorError(WardenError, KeyError):
    """A sealed file or bundle holds no tensor (or member file) of that name.  Also a ``KeyError``, as a
    safetensors reader's lookup is."""


__all__ += ["NoSuchTensorError"]


class MissingExtraError(WardenError, ImportError):
    """A capability's optional dependencies are not installed: its one line names the extra to install
    (``this needs the `provenance` extra: pip install 'weightwarden[provenance]'``).  Also an
    ``ImportError``, as the failed import it stands for is."""

    def __init__(self, extra: str, module: str | None = None):
        super().__init__(f"this needs the `{extra}` extra: pip install 'weightwarden[{extra}]'")
        self.extra = extra
        self.module = module


__all__ += ["MissingExtraError"]


# --- provenance through an API (issue 21) ------------------------------------------------
class EndpointError(WardenError):
    """An OpenAI-compatible endpoint could not give a usable answer: no p-value is computed on it."""


class EndpointUnavailableError(EndpointError):
    """The endpoint kept failing (HTTP errors, 429 / 5xx, timeouts, refused connections) after the retries."""


class EndpointAnswerError(EndpointError):
    """An answer is malformed or inconsistent: non-finite or positive log-probabilities, unsorted top-k, tokens
    that do not spell the prompt, no log-probabilities where they were asked for."""


class ModelChangedError(EndpointAnswerError):
    """The endpoint named another model than earlier in the same probe (or in its cache)."""


class TokenizerMismatchError(EndpointError):
    """The endpoint's tokens are not our model's tokenizer's: log-probabilities cannot be compared token by token."""


class QueryBudgetError(EndpointError):
    """The probe's query budget is spent; the answers so far are in the cache and a rerun resumes from them."""

    def __init__(self, message: str, *, used: int = 0, budget: int = 0):
        super().__init__(message)
        self.used, self.budget = used, budget


class ProbeError(WardenError):
    """A probe cannot be run as asked (too few references, no prompts, a bad option)."""


__all__ += ["EndpointAnswerError", "EndpointError", "EndpointUnavailableError", "ModelChangedError", "ProbeError",
            "QueryBudgetError", "TokenizerMismatchError"]  # fmt: skip
