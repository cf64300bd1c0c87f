"""Unit tests for the error hierarchy and its wire codes."""

from __future__ import annotations

import pytest

import pserver
from pserver.protocol import errors
from pserver.protocol.errors import (
    ErrorCode,
    InternalError,
    InvalidArgument,
    KeyNotFound,
    NotLeader,
    ProtocolError,
    PServerError,
    RequestTooLarge,
    ShapeMismatch,
    SharedMemoryUnavailable,
    Unavailable,
    UnknownKind,
    UnsupportedVersion,
    WrongShard,
    error_from_code,
)

EXPECTED: dict[ErrorCode, type[PServerError]] = {
    ErrorCode.MALFORMED: ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: UnsupportedVersion,
    ErrorCode.UNKNOWN_KIND: UnknownKind,
    ErrorCode.TOO_LARGE: RequestTooLarge,
    ErrorCode.KEY_NOT_FOUND: KeyNotFound,
    ErrorCode.SHAPE_MISMATCH: ShapeMismatch,
    ErrorCode.INVALID_ARGUMENT: InvalidArgument,
    ErrorCode.NOT_LEADER: NotLeader,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.WRONG_SHARD: WrongShard,
    ErrorCode.SHM_UNAVAILABLE: SharedMemoryUnavailable,
}

ALL_CLASSES = sorted(set(EXPECTED.values()), key=lambda c: c.__name__)


def test_every_error_code_but_ok_has_a_class() -> None:
    assert set(EXPECTED) == set(ErrorCode) - {ErrorCode.OK}


@pytest.mark.parametrize("code", sorted(EXPECTED), ids=lambda c: c.name)
def test_error_from_code_rebuilds_the_class(code: ErrorCode) -> None:
    exc = error_from_code(int(code), "boom")
    assert type(exc) is EXPECTED[code]
    assert exc.code == code
    assert exc.message == "boom"


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_class_code_round_trips(cls: type[PServerError]) -> None:
    assert type(error_from_code(cls.code, "x")) is cls


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_a_pserver_error(cls: type[PServerError]) -> None:
    assert issubclass(cls, PServerError)
    assert issubclass(cls, Exception)


def test_error_codes_are_unique_per_class() -> None:
    assert len({cls.code for cls in ALL_CLASSES}) == len(ALL_CLASSES)


@pytest.mark.parametrize("code", [999, 12345, -1], ids=["999", "12345", "negative"])
def test_unknown_code_becomes_internal_error(code: int) -> None:
    exc = error_from_code(code, "what")
    assert type(exc) is InternalError
    assert exc.message == "what"


def test_details_survive_the_round_trip() -> None:
    exc = error_from_code(ErrorCode.KEY_NOT_FOUND, "no key", {"key": "w", "shard": 2})
    assert exc.details == {"key": "w", "shard": 2}


def test_error_from_code_does_not_mutate_details() -> None:
    details = {"shard": 3, "leader_hint": "tcp://h:1"}
    error_from_code(ErrorCode.UNAVAILABLE, "x", details)
    assert details == {"shard": 3, "leader_hint": "tcp://h:1"}


def test_not_leader_keeps_leader_hint_and_shard() -> None:
    exc = error_from_code(ErrorCode.NOT_LEADER, "not me",
                          {"shard": 2, "leader_hint": "tcp://10.0.0.1:7001"})
    assert isinstance(exc, NotLeader)
    assert isinstance(exc, Unavailable)  # callers retrying on Unavailable also catch it
    assert exc.leader_hint == "tcp://10.0.0.1:7001"
    assert exc.shard == 2


def test_not_leader_without_hint() -> None:
    exc = error_from_code(ErrorCode.NOT_LEADER, "not me")
    assert isinstance(exc, NotLeader)
    assert exc.leader_hint is None
    assert exc.shard is None


def test_unavailable_keeps_shard() -> None:
    exc = error_from_code(ErrorCode.UNAVAILABLE, "timeout", {"shard": 3})
    assert type(exc) is Unavailable
    assert exc.shard == 3
    assert exc.details["shard"] == 3


def test_key_not_found_is_a_key_error_with_a_readable_message() -> None:
    exc = error_from_code(ErrorCode.KEY_NOT_FOUND, "key 'w' is not initialized")
    assert isinstance(exc, KeyError)
    assert str(exc) == "key 'w' is not initialized"
    with pytest.raises(KeyError):
        raise exc


@pytest.mark.parametrize("cls", [ShapeMismatch, InvalidArgument], ids=lambda c: c.__name__)
def test_value_errors(cls: type[PServerError]) -> None:
    assert issubclass(cls, ValueError)


@pytest.mark.parametrize(
    "cls", [UnsupportedVersion, UnknownKind, RequestTooLarge], ids=lambda c: c.__name__
)
def test_protocol_error_family(cls: type[PServerError]) -> None:
    assert issubclass(cls, ProtocolError)


@pytest.mark.parametrize(
    "name",
    ["PServerError", "KeyNotFound", "ShapeMismatch", "Unavailable", "ProtocolError",
     "InvalidArgument", "RequestTooLarge", "NotLeader"],
)
def test_public_names_are_the_protocol_classes(name: str) -> None:
    assert getattr(pserver, name) is getattr(errors, name)
