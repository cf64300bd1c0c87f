"""Unit tests for the header codec: round trip and every validation rule."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pserver.protocol.codec import (
    check_frames,
    decode_header,
    encode_header,
    encode_plain_reply,
    plain_fields,
    reply_header,
)
from pserver.protocol.errors import (
    ProtocolError,
    RequestTooLarge,
    UnknownKind,
    UnsupportedVersion,
)
from pserver.protocol.schema import DTYPES, Header, KeyRef, Kind, Limits, TensorMeta

LIMITS = Limits()
U64 = (1 << 64) - 1


def _pack(wire: Any) -> bytes:
    return msgpack.packb(wire, use_bin_type=True)


def _wire(**fields: Any) -> dict[str, Any]:
    """A valid PING header map, with ``fields`` overriding or adding entries."""
    wire: dict[str, Any] = {"v": 1, "k": int(Kind.PING), "id": 7}
    wire.update(fields)
    return wire


def _tensor_wire(key: str = "w", *, part: int = 0, dtype: str = "float32",
                 shape: Any = (4,), offset: int = 0, count: int = 4, nframes: int = 1) -> list[Any]:
    return [key, part, dtype, list(shape) if isinstance(shape, tuple) else shape,
            offset, count, nframes]


def _meta(key: str = "w", dtype: str = "float32", count: int = 4, nframes: int = 1,
          part: int = 0) -> TensorMeta:
    return TensorMeta(key, part, dtype, (count,), 0, count, nframes)


# -- round trip -----------------------------------------------------------------

keys = st.text(min_size=1, max_size=40)
u64 = st.integers(0, U64)
parts = st.integers(0, 1 << 40)


@st.composite
def tensor_metas(draw: st.DrawFn) -> TensorMeta:
    shape = tuple(draw(st.lists(st.integers(0, 50), max_size=4)))
    size = 1
    for d in shape:
        size *= d
    offset = draw(st.integers(0, size))
    count = draw(st.integers(0, size - offset))
    return TensorMeta(
        key=draw(keys),
        part=draw(parts),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        shape=shape,
        offset=offset,
        count=count,
        nframes=draw(st.integers(0, LIMITS.max_frames)),
    )


opt_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), U64) | st.text(max_size=20)
    | st.binary(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)

headers = st.builds(
    Header,
    kind=st.sampled_from(list(Kind)),
    request_id=u64,
    client_id=st.binary(max_size=64),
    seq=u64,
    tensors=st.lists(tensor_metas(), max_size=5).map(tuple),
    refs=st.lists(st.builds(KeyRef, keys, parts), max_size=5).map(tuple),
    opts=st.dictionaries(st.text(max_size=10), opt_values, max_size=5),
    error=st.integers(0, 1 << 16),
    message=st.text(max_size=50),
)


@given(headers)
def test_header_round_trip(header: Header) -> None:
    raw = encode_header(header)
    assert isinstance(raw, bytes)
    assert decode_header(raw, LIMITS) == header


@given(headers)
def test_decode_accepts_memoryview(header: Header) -> None:
    assert decode_header(memoryview(encode_header(header)), LIMITS) == header


def test_round_trip_keeps_nframes_total() -> None:
    header = Header(Kind.PUSH, 1, tensors=(_meta("a", nframes=2), _meta("b", nframes=3)))
    assert decode_header(encode_header(header), LIMITS).nframes == 5


# -- decode_header validation ---------------------------------------------------

BAD_HEADERS: list[Any] = [
    pytest.param(b"\xc1", ProtocolError, id="not-msgpack-reserved-byte"),
    pytest.param(b"\x83\xa1v\x01", ProtocolError, id="not-msgpack-truncated-map"),
    pytest.param(b"", ProtocolError, id="not-msgpack-empty"),
    pytest.param(_pack(_wire()) + b"\x00", ProtocolError, id="not-msgpack-trailing-bytes"),
    pytest.param(_pack([1, 11, 7]), ProtocolError, id="non-map-list"),
    pytest.param(_pack(42), ProtocolError, id="non-map-int"),
    pytest.param(_pack("hello"), ProtocolError, id="non-map-str"),
    pytest.param(_pack({1: 2}), ProtocolError, id="map-with-int-keys"),
    pytest.param(_pack(_wire(v=2)), UnsupportedVersion, id="unsupported-version-2"),
    pytest.param(_pack(_wire(v=0)), UnsupportedVersion, id="unsupported-version-0"),
    pytest.param(_pack({"k": 1, "id": 7}), UnsupportedVersion, id="missing-version"),
    pytest.param(_pack(_wire(k=99)), UnknownKind, id="unknown-kind-99"),
    pytest.param(_pack(_wire(k="push")), UnknownKind, id="unknown-kind-str"),
    pytest.param(_pack(_wire(id=-1)), ProtocolError, id="negative-request-id"),
    pytest.param(_pack(_wire(id="7")), ProtocolError, id="str-request-id"),
    pytest.param(_pack(_wire(cid=b"x" * 65)), ProtocolError, id="client-id-too-long"),
    pytest.param(_pack(_wire(cid="abc")), ProtocolError, id="client-id-not-bytes"),
    pytest.param(_pack(_wire(seq=-3)), ProtocolError, id="negative-seq"),
    pytest.param(_pack(_wire(t={"a": 1})), ProtocolError, id="tensors-not-list"),
    pytest.param(_pack(_wire(r="abc")), ProtocolError, id="refs-not-list"),
    pytest.param(_pack(_wire(o=[1, 2])), ProtocolError, id="opts-not-map"),
    pytest.param(_pack(_wire(m=5)), ProtocolError, id="message-not-str"),
    pytest.param(_pack(_wire(e=1 << 20)), ProtocolError, id="error-code-too-big"),
    pytest.param(_pack(_wire(r=[["k"]])), ProtocolError, id="ref-wrong-length"),
    pytest.param(_pack(_wire(r=[["", 0]])), ProtocolError, id="ref-empty-key"),
    pytest.param(_pack(_wire(r=[[b"k", 0]])), ProtocolError, id="ref-key-not-str"),
    pytest.param(_pack(_wire(r=[["k", -1]])), ProtocolError, id="ref-negative-part"),
    pytest.param(_pack(_wire(t=[["w", 0, "float32", [4], 0, 4]])), ProtocolError,
                 id="tensor-descriptor-too-short"),
    pytest.param(_pack(_wire(t=[_tensor_wire(dtype="complex64")])), ProtocolError,
                 id="bad-dtype-complex64"),
    pytest.param(_pack(_wire(t=[_tensor_wire(dtype="int8")])), ProtocolError,
                 id="bad-dtype-int8"),
    pytest.param(_pack(_wire(t=[_tensor_wire(dtype=5)])), ProtocolError, id="bad-dtype-int"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape="4")])), ProtocolError,
                 id="bad-shape-not-list"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[-4], count=0)])), ProtocolError,
                 id="bad-shape-negative-dim"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[4.0])])), ProtocolError,
                 id="bad-shape-float-dim"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[1] * 33, count=1)])), ProtocolError,
                 id="bad-shape-rank-33"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[4], offset=2, count=3)])), ProtocolError,
                 id="part-outside-tensor"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[4], offset=5, count=0)])), ProtocolError,
                 id="part-offset-past-end"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[2], count=2, nframes=LIMITS.max_frames + 1)])),
                 ProtocolError, id="tensor-nframes-over-cap"),
    pytest.param(_pack(_wire(t=[_tensor_wire(shape=[1 << 21, 1 << 20], count=0)])),
                 RequestTooLarge, id="tensor-over-element-cap"),
]


@pytest.mark.parametrize(("raw", "error"), BAD_HEADERS)
def test_decode_rejects(raw: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        decode_header(raw, LIMITS)


def test_plain_malformed_is_not_reported_as_a_more_specific_error() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(b"\xc1", LIMITS)
    assert type(info.value) is ProtocolError


def test_unsupported_version_attaches_request_id_and_supported_versions() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode_header(_pack(_wire(v=9, id=1234)), LIMITS)
    assert info.value.details["request_id"] == 1234
    assert info.value.details["supported"] == [1]


def test_unsupported_version_without_readable_request_id() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode_header(_pack(_wire(v=9, id="not-an-int")), LIMITS)
    assert "request_id" not in info.value.details


def test_unknown_kind_attaches_request_id() -> None:
    with pytest.raises(UnknownKind) as info:
        decode_header(_pack(_wire(k=77, id=U64)), LIMITS)
    assert info.value.details["request_id"] == U64


def test_header_above_max_header_bytes() -> None:
    limits = Limits(max_header_bytes=100)
    raw = encode_header(Header(Kind.PING, 1, message="x" * 200))
    assert len(raw) > 100
    with pytest.raises(RequestTooLarge):
        decode_header(raw, limits)


def test_header_above_default_cap_is_refused_before_parsing() -> None:
    raw = b"\xc1" * (LIMITS.max_header_bytes + 1)  # not even msgpack: the size check comes first
    with pytest.raises(RequestTooLarge):
        decode_header(raw, LIMITS)


def test_max_header_bytes_boundary() -> None:
    raw = encode_header(Header(Kind.PING, 1, message="x" * 200))
    assert decode_header(raw, Limits(max_header_bytes=len(raw))).message == "x" * 200
    with pytest.raises(RequestTooLarge):
        decode_header(raw, Limits(max_header_bytes=len(raw) - 1))


@pytest.mark.parametrize(
    ("field", "n"),
    [
        pytest.param("r", LIMITS.max_keys + 1, id="refs-one-over-cap"),
        pytest.param("t", LIMITS.max_keys + 1, id="tensors-one-over-cap"),
        pytest.param("r", 10_000, id="refs-10000"),
        pytest.param("t", 10_000, id="tensors-10000"),
    ],
)
def test_too_many_keys(field: str, n: int) -> None:
    if field == "r":
        entries: list[Any] = [[f"k{i}", 0] for i in range(n)]
    else:
        entries = [_tensor_wire(key=f"k{i}", nframes=0) for i in range(n)]
    raw = _pack(_wire(**{field: entries}))
    assert len(raw) <= LIMITS.max_header_bytes  # the key count, not the byte size, is over
    with pytest.raises(RequestTooLarge):
        decode_header(raw, LIMITS)


def test_max_keys_exactly_is_accepted() -> None:
    refs = [[f"k{i}", 0] for i in range(LIMITS.max_keys)]
    assert len(decode_header(_pack(_wire(r=refs)), LIMITS).refs) == LIMITS.max_keys


@pytest.mark.parametrize(
    "field",
    [pytest.param("r", id="ref-key"), pytest.param("t", id="tensor-key")],
)
def test_key_over_max_key_bytes(field: str) -> None:
    key = "k" * 10_000
    entry = [key, 0] if field == "r" else _tensor_wire(key=key)
    with pytest.raises(RequestTooLarge) as info:
        decode_header(_pack(_wire(**{field: [entry]})), LIMITS)
    assert info.value.details["request_id"] == 7


def test_key_cap_counts_utf8_bytes_not_characters() -> None:
    limits = Limits(max_key_bytes=8)
    assert decode_header(_pack(_wire(r=[["é" * 4, 0]])), limits).refs[0].key == "é" * 4
    with pytest.raises(RequestTooLarge):
        decode_header(_pack(_wire(r=[["é" * 5, 0]])), limits)


# -- check_frames -----------------------------------------------------------------


def test_check_frames_accepts_matching_frames() -> None:
    header = Header(Kind.PUSH, 1, tensors=(
        _meta("a", "float32", count=4, nframes=2),
        _meta("b", "float64", count=3, nframes=1),
        _meta("c", "int32", count=5, nframes=0),  # no data for this one
    ))
    check_frames(header, [8, 8, 24], LIMITS)  # does not raise


BAD_FRAMES: list[Any] = [
    pytest.param((_meta(nframes=2),), [16], LIMITS, ProtocolError, id="frame-count-too-few"),
    pytest.param((_meta(nframes=1),), [8, 8], LIMITS, ProtocolError, id="frame-count-too-many"),
    pytest.param((_meta(count=4, nframes=1),), [12], LIMITS, ProtocolError,
                 id="frames-shorter-than-shape"),
    pytest.param((_meta(count=4, nframes=2),), [8, 4], LIMITS, ProtocolError,
                 id="frames-shorter-than-shape-split"),
    pytest.param((_meta(count=4, nframes=1),), [20], LIMITS, ProtocolError,
                 id="frames-longer-than-shape"),
    pytest.param((_meta(count=4, nframes=2),), [6, 10], LIMITS, ProtocolError,
                 id="frame-not-multiple-of-itemsize"),
    pytest.param((_meta("a", count=2, nframes=1), _meta("b", count=2, nframes=1)), [4, 12],
                 LIMITS, ProtocolError, id="bytes-shifted-between-tensors"),
    pytest.param((_meta(count=4, nframes=1),), [16], Limits(max_frame_bytes=8),
                 RequestTooLarge, id="frame-over-max-frame-bytes"),
    pytest.param((_meta(count=4, nframes=2),), [8, 8], Limits(max_request_bytes=15),
                 RequestTooLarge, id="total-over-max-request-bytes"),
    pytest.param((_meta(count=3, nframes=3),), [4, 4, 4], Limits(max_frames=2),
                 RequestTooLarge, id="frame-count-over-max-frames"),
]


@pytest.mark.parametrize(("tensors", "sizes", "limits", "error"), BAD_FRAMES)
def test_check_frames_rejects(tensors: tuple[TensorMeta, ...], sizes: list[int],
                              limits: Limits, error: type[ProtocolError]) -> None:
    header = Header(Kind.PUSH, 1, tensors=tensors)
    with pytest.raises(error) as info:
        check_frames(header, sizes, limits)
    if error is ProtocolError:  # malformed, not merely over a cap
        assert type(info.value) is ProtocolError


@pytest.mark.parametrize("kind", [[1], {"a": 1}, True, 1.0, "1"], ids=repr)
def test_a_kind_of_the_wrong_type_is_unknown_not_a_crash(kind: Any) -> None:


    raw = msgpack.packb({"v": 1, "k": kind, "id": 7})
    with pytest.raises(UnknownKind) as info:
        decode_header(raw, Limits())
    assert info.value.details["request_id"] == 7


@given(rid=st.integers(0, U64), cid=st.binary(max_size=64), seq=st.integers(0, U64),
       worker=st.integers(0, 1000), n=st.integers(0, 3))
def test_plain_fields_give_what_decode_header_gives(rid: int, cid: bytes, seq: int,
                                                    worker: int, n: int) -> None:
    tensors = [_tensor_wire(f"k{i}", count=4) for i in range(n)]
    raw = _pack(_wire(k=int(Kind.PUSH_PULL), id=rid, cid=cid, seq=seq, t=tensors,
                      o={"worker": worker}))
    header = decode_header(raw, LIMITS)
    assert plain_fields(raw, LIMITS) == (int(header.kind), header.request_id, header.client_id,
                                         header.seq, header.opts, tensors)


@pytest.mark.parametrize("wire", [
    _wire(v=2), _wire(v=True), _wire(k=999), _wire(k=True), _wire(id=-1), _wire(id="7"),
    _wire(cid=b"x" * 65), _wire(cid="text"), _wire(seq=-1), _wire(o=[1]), _wire(t={"a": 1}),
    _wire(e=3), _wire(m="an error"), _wire(r=[["k", 0]]), _wire(extra=1),
    _wire(t=[_tensor_wire()] * (LIMITS.max_keys + 1)), [1, 2, 3],
])
def test_plain_fields_leave_anything_else_to_decode_header(wire: Any) -> None:
    assert plain_fields(_pack(wire), LIMITS) is None


def test_plain_fields_refuse_what_is_not_msgpack_or_too_large() -> None:
    assert plain_fields(b"\xc1", LIMITS) is None
    assert plain_fields(_pack(_wire()) + b"\x00", LIMITS) is None  # extra data
    small = Limits(max_header_bytes=16)
    assert plain_fields(_pack(_wire(cid=b"x" * 32)), small) is None


def test_a_plain_reply_is_encoded_as_encode_header_would() -> None:
    metas = (TensorMeta("w", 0, "float32", (4,), 0, 4, 1),
             TensorMeta("v", 2, "int64", (9,), 3, 2, 1))
    request = Header(Kind.PUSH_PULL, 12345)
    assert encode_plain_reply(12345) == encode_header(reply_header(request))
    assert encode_plain_reply(12345, [m.to_wire() for m in metas]) == encode_header(
        reply_header(request, tensors=metas))
