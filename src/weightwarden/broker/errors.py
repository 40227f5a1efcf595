"""The broker's errors, each with the HTTP status the server answers it with."""

from __future__ import annotations

from ..errors import WardenError

__all__ = ["BrokerError", "Conflict", "EgressLimitError", "Forbidden", "NotFound", "PreconditionFailed", "RangeError",
           "RangeNotSatisfiable", "StreamCut", "Unauthorized"]  # fmt: skip


class BrokerError(WardenError):
    status = 400


class Unauthorized(BrokerError):
    status = 401


class Forbidden(BrokerError):
    status = 403


class NotFound(BrokerError):
    status = 404


class Conflict(BrokerError):
    status = 409


class EgressLimitError(BrokerError):
    status = 429


class StreamCut(Forbidden):
    """A running stream ended because its principal was suspended."""


class RangeError(BrokerError):
    """A ``Range`` header that is malformed or asks for several ranges (only one is served)."""

    status = 400


class RangeNotSatisfiable(BrokerError):
    """A single range that lies outside the file; the answer carries ``Content-Range: bytes */size``."""

    status = 416

    def __init__(self, msg: str, total: int):
        super().__init__(msg)
        self.headers = {"content-range": f"bytes */{total}"}


class PreconditionFailed(BrokerError):
    """``If-Match`` names another version of the file: a resume against a different file."""

    status = 412
