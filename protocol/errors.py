"""Error types shared by every layer, and their wire codes.

Owns the exception hierarchy users catch (``PServerError`` and its subclasses,
re-exported as ``pserver.PServerError`` etc.) and the numeric error codes that
travel in reply headers. A server turns an exception into a code with
``code_of``; a client turns a code back into the same exception type with
``error_from_code``. Imports nothing internal.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """Error codes carried in the ``e`` field of a reply header (0 = success)."""

    OK = 0
    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_KIND = 3
    TOO_LARGE = 4
    KEY_NOT_FOUND = 5
    SHAPE_MISMATCH = 6
    INVALID_ARGUMENT = 7
    NOT_LEADER = 8
    UNAVAILABLE = 9
    INTERNAL = 10
    WRONG_SHARD = 11
    SHM_UNAVAILABLE = 12


class PServerError(Exception):
    """Base of every error pserver raises to a user."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details


class ProtocolError(PServerError):
    """A message broke the wire protocol (bad header, frames, version or kind)."""

    code = ErrorCode.MALFORMED


class UnsupportedVersion(ProtocolError):
    """The peer speaks a protocol version this side does not."""

    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownKind(ProtocolError):
    """The message kind is not one this side knows."""

    code = ErrorCode.UNKNOWN_KIND


class RequestTooLarge(ProtocolError):
    """A request exceeds a size or count limit (header, frames, keys, bytes)."""

    code = ErrorCode.TOO_LARGE


class KeyNotFound(PServerError, KeyError):
    """A key (or table) that was never initialized."""

    code = ErrorCode.KEY_NOT_FOUND

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ShapeMismatch(PServerError, ValueError):
    """An array's shape or dtype differs from the key's."""

    code = ErrorCode.SHAPE_MISMATCH


class InvalidArgument(PServerError, ValueError):
    """A well-formed request with a value the server cannot accept."""

    code = ErrorCode.INVALID_ARGUMENT


class Unavailable(PServerError):
    """No answer within the deadline, or the server cannot take requests now.

    ``shard`` names the shard that did not answer (None for the bootstrap).
    """

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, shard: int | None = None, **details: Any) -> None:
        super().__init__(message, shard=shard, **details)
        self.shard = shard


class NotLeader(Unavailable):
    """The replica is not its shard's leader; ``leader_hint`` names who may be."""

    code = ErrorCode.NOT_LEADER

    def __init__(
        self, message: str, *, shard: int | None = None, leader_hint: str | None = None
    ) -> None:
        super().__init__(message, shard=shard, leader_hint=leader_hint)
        self.leader_hint = leader_hint


class WrongShard(PServerError):
    """A request reached a shard that does not own the key part."""

    code = ErrorCode.WRONG_SHARD


class SharedMemoryUnavailable(ProtocolError):
    """A shard cannot open the shared memory a request names (PROTOCOL.md §4.6); the
    client then sends that shard's data through the socket."""

    code = ErrorCode.SHM_UNAVAILABLE


class InternalError(PServerError):
    """The server failed in a way that is a bug; the message says where."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[int, type[PServerError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        UnsupportedVersion,
        UnknownKind,
        RequestTooLarge,
        KeyNotFound,
        ShapeMismatch,
        InvalidArgument,
        Unavailable,
        NotLeader,
        WrongShard,
        SharedMemoryUnavailable,
        InternalError,
    )
}


def error_from_code(code: int, message: str, details: dict[str, Any] | None = None) -> PServerError:
    """Rebuild the exception a server reported as ``code``."""
    details = dict(details or {})
    cls = _BY_CODE.get(code, InternalError)
    if cls is NotLeader:
        return NotLeader(
            message, shard=details.get("shard"), leader_hint=details.get("leader_hint")
        )
    if issubclass(cls, Unavailable):
        shard = details.pop("shard", None)
        return cls(message, shard=shard, **details)
    return cls(message, **details)
