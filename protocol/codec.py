"""msgpack codec for headers, with strict validation before any allocation.

Owns the translation between ``schema.Header`` and header bytes, and the checks
that a message's frames agree with its header (count, byte lengths, dtype
allow-list, caps from ``schema.Limits``). Every failure raises a
``ProtocolError`` subclass. Imports msgpack, never zmq.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack

from .errors import ProtocolError, RequestTooLarge, UnknownKind, UnsupportedVersion
from .schema import (
    DTYPES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Header,
    KeyRef,
    Kind,
    Limits,
    ShmRef,
    TensorMeta,
)
from .shm import NAME_RE

_MAX_ELEMENTS = 1 << 40
_MAX_UINT64 = (1 << 64) - 1


def encode_header(header: Header) -> bytes:
    """Header -> msgpack bytes (map with short string keys, see PROTOCOL.md)."""
    wire: dict[str, Any] = {"v": header.version, "k": int(header.kind), "id": header.request_id}
    if header.client_id:
        wire["cid"] = header.client_id
    if header.seq:
        wire["seq"] = header.seq
    if header.tensors:
        wire["t"] = [t.to_wire() for t in header.tensors]
    if header.refs:
        wire["r"] = [r.to_wire() for r in header.refs]
    if header.opts:
        wire["o"] = header.opts
    if header.error:
        wire["e"] = header.error
    if header.message:
        wire["m"] = header.message
    if header.shm is not None:
        wire["x"] = header.shm.to_wire()
    return msgpack.packb(wire, use_bin_type=True)


def _int(value: Any, what: str, lo: int = 0, hi: int = _MAX_UINT64) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _key(value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"key must be a string, got {type(value).__name__}")
    if len(value.encode("utf-8")) > limits.max_key_bytes:
        raise RequestTooLarge(
            f"key of {len(value.encode('utf-8'))} bytes exceeds the {limits.max_key_bytes}-byte cap"
        )
    if not value:
        raise ProtocolError("key must not be empty")
    return value


def _tensor(raw: Any, limits: Limits) -> TensorMeta:
    """One tensor descriptor. A single-expression check accepts the common valid
    case quickly; anything it does not accept goes through ``_tensor_checked``,
    which names the exact problem (or accepts, e.g. a long non-ASCII key)."""
    if type(raw) is list and len(raw) == 7:
        key, part, dtype, shape, offset, count, nframes = raw
        if (
            type(key) is str
            and 0 < len(key) <= limits.max_key_bytes // 4  # utf-8 needs <= 4 bytes a char
            and type(part) is int
            and 0 <= part <= _MAX_ELEMENTS
            and type(dtype) is str
            and dtype in DTYPES
            and type(shape) is list
            and len(shape) <= limits.max_rank
            and all(type(d) is int and 0 <= d <= _MAX_ELEMENTS for d in shape)
            and type(offset) is int
            and type(count) is int
            and type(nframes) is int
            and offset >= 0
            and count >= 0
            and 0 <= nframes <= limits.max_frames
        ):
            size = math.prod(shape)
            if size <= _MAX_ELEMENTS and offset + count <= size:
                return TensorMeta(key, part, dtype, tuple(shape), offset, count, nframes)
    return _tensor_checked(raw, limits)


def _tensor_checked(raw: Any, limits: Limits) -> TensorMeta:
    if not isinstance(raw, list) or len(raw) != 7:
        raise ProtocolError(
            "tensor descriptor must be [key, part, dtype, shape, offset, count, nframes]"
        )
    key = _key(raw[0], limits)
    part = _int(raw[1], "part", hi=_MAX_ELEMENTS)
    dtype = raw[2]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    shape_raw = raw[3]
    if not isinstance(shape_raw, list) or len(shape_raw) > limits.max_rank:
        raise ProtocolError(f"shape must be a list of at most {limits.max_rank} dimensions")
    shape = tuple(_int(d, "dimension", hi=_MAX_ELEMENTS) for d in shape_raw)
    size = math.prod(shape)
    if size > _MAX_ELEMENTS:
        raise RequestTooLarge(f"tensor of {size} elements exceeds the element cap")
    offset = _int(raw[4], "offset", hi=_MAX_ELEMENTS)
    count = _int(raw[5], "count", hi=_MAX_ELEMENTS)
    if offset + count > size:
        raise ProtocolError(
            f"part [{offset}, {offset + count}) lies outside a tensor of {size} elements"
        )
    nframes = _int(raw[6], "nframes", hi=limits.max_frames)
    return TensorMeta(key, part, dtype, shape, offset, count, nframes)


def _unpack(raw: bytes | memoryview, limits: Limits) -> Any:
    """The msgpack value of a header. Arrays and maps may be as long as the header
    allows (the header cap bounds the work); no ext types."""
    cap = limits.max_header_bytes
    return msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0,
                           max_str_len=cap, max_bin_len=cap, max_array_len=cap,
                           max_map_len=cap)


def decode_header(raw: bytes | memoryview, limits: Limits) -> Header:
    """msgpack bytes -> Header, rejecting anything malformed or over a cap."""
    if len(raw) > limits.max_header_bytes:
        raise RequestTooLarge(
            f"header of {len(raw)} bytes exceeds the {limits.max_header_bytes}-byte cap"
        )
    # Arrays may be as long as the header allows (the header cap bounds the work),
    # so a count above max_keys is reported as too large rather than malformed.
    try:
        wire = _unpack(raw, limits)
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(wire, dict):
        raise ProtocolError("header must be a msgpack map")
    rid = wire.get("id")
    try:
        return _decode_fields(wire, limits)
    except ProtocolError as exc:
        # Let the server address its error reply to the request when it can.
        if type(rid) is int and 0 <= rid <= _MAX_UINT64:
            exc.details["request_id"] = rid
        raise


_KINDS = {int(k): k for k in Kind}
_EMPTY: dict[str, Any] = {}
_PLAIN_FIELDS = frozenset({"v", "k", "id", "cid", "seq", "t", "o"})
_REPLY = int(Kind.REPLY)


def plain_fields(raw: bytes | memoryview, limits: Limits,
                 ) -> tuple[int, int, bytes, int, dict[str, Any], list[Any]] | None:
    """(kind, request id, client id, seq, opts, raw tensor descriptors) of a header
    that has only those fields, each of the right type and range, and no more
    descriptors than ``limits.max_keys``; None for any other (``decode_header`` then
    names the problem). No objects are made: a caller that can check the raw
    descriptors itself (``ShardServer``'s whole pushes) skips ``decode_header``."""
    if len(raw) > limits.max_header_bytes:
        return None
    try:
        wire = _unpack(raw, limits)
    except Exception:  # decode_header reports it
        return None
    if type(wire) is not dict or not wire.keys() <= _PLAIN_FIELDS:
        return None
    version, kind, rid = wire.get("v"), wire.get("k"), wire.get("id")
    cid, seq = wire.get("cid", b""), wire.get("seq", 0)
    opts, tensors = wire.get("o", _EMPTY), wire.get("t", [])
    if (type(version) is int and version in SUPPORTED_VERSIONS
            and type(kind) is int and kind in _KINDS
            and type(rid) is int and 0 <= rid <= _MAX_UINT64
            and type(cid) is bytes and len(cid) <= 64
            and type(seq) is int and 0 <= seq <= _MAX_UINT64
            and type(opts) is dict and type(tensors) is list
            and len(tensors) <= limits.max_keys):
        return kind, rid, cid, seq, opts, tensors
    return None


def encode_plain_reply(request_id: int, tensors: list[Any] | None = None) -> bytes:
    """What ``encode_header(reply_header(request, tensors=...))`` gives for a reply
    without error or opts, made from the request id and the tensors' wire lists
    (``TensorMeta.to_wire``)."""
    wire: dict[str, Any] = {"v": PROTOCOL_VERSION, "k": _REPLY, "id": request_id}
    if tensors:
        wire["t"] = tensors
    return msgpack.packb(wire, use_bin_type=True)


def _decode_fields(wire: dict[Any, Any], limits: Limits) -> Header:
    # Fast path: a well-formed header of the usual shape, checked in one go.
    raw_kind = wire.get("k")
    kind = _KINDS.get(raw_kind) if type(raw_kind) is int else None
    version, rid = wire.get("v"), wire.get("id")
    tensors_raw = wire.get("t", ())
    cid, seq = wire.get("cid", b""), wire.get("seq", 0)
    opts, error, message = wire.get("o", _EMPTY), wire.get("e", 0), wire.get("m", "")
    if (
        version in SUPPORTED_VERSIONS
        and type(version) is int
        and type(rid) is int
        and 0 <= rid <= _MAX_UINT64
        and kind is not None
        and type(cid) is bytes
        and len(cid) <= 64
        and type(seq) is int
        and 0 <= seq <= _MAX_UINT64
        and type(tensors_raw) in (list, tuple)
        and "r" not in wire
        and "x" not in wire
        and len(tensors_raw) <= limits.max_keys
        and type(opts) is dict
        and type(error) is int
        and 0 <= error <= 1 << 16
        and type(message) is str
    ):
        tensors = tuple([_tensor(t, limits) for t in tensors_raw])
        return Header(kind, rid, version, cid, seq, tensors, (), opts, error, message)
    return _decode_fields_checked(wire, limits)


def _decode_fields_checked(wire: dict[Any, Any], limits: Limits) -> Header:
    version = wire.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported "
            f"(supported: {list(SUPPORTED_VERSIONS)})",
            supported=list(SUPPORTED_VERSIONS),
        )
    request_id = _int(wire.get("id"), "request id")
    try:
        raw_kind = wire.get("k")
        if type(raw_kind) is not int:
            raise ValueError
        kind = Kind(raw_kind)
    except ValueError:
        raise UnknownKind(f"unknown message kind {wire.get('k')!r}") from None
    client_id = wire.get("cid", b"")
    if not isinstance(client_id, bytes) or len(client_id) > 64:
        raise ProtocolError("client id must be at most 64 bytes")
    seq = _int(wire.get("seq", 0), "sequence number")
    tensors_raw = wire.get("t", [])
    refs_raw = wire.get("r", [])
    if not isinstance(tensors_raw, list) or not isinstance(refs_raw, list):
        raise ProtocolError("'t' and 'r' must be lists")
    if len(tensors_raw) + len(refs_raw) > limits.max_keys:
        raise RequestTooLarge(
            f"{len(tensors_raw) + len(refs_raw)} keys in one message exceed "
            f"the cap of {limits.max_keys}"
        )
    tensors = tuple(_tensor(t, limits) for t in tensors_raw)
    refs: list[KeyRef] = []
    for r in refs_raw:
        if not isinstance(r, list) or len(r) != 2:
            raise ProtocolError("key reference must be [key, part]")
        refs.append(KeyRef(_key(r[0], limits), _int(r[1], "part", hi=_MAX_ELEMENTS)))
    opts = wire.get("o", {})
    if not isinstance(opts, dict):
        raise ProtocolError("'o' must be a map")
    error = _int(wire.get("e", 0), "error code", hi=1 << 16)
    message = wire.get("m", "")
    if not isinstance(message, str):
        raise ProtocolError("'m' must be a string")
    shm = _shm(wire["x"], limits) if "x" in wire else None
    return Header(
        kind, request_id, version, client_id, seq, tensors, tuple(refs), opts, error, message,
        shm,
    )


def _span(raw: Any, what: str, limits: Limits) -> tuple[int, int]:
    if type(raw) is not list or len(raw) != 2:
        raise ProtocolError(f"{what} must be [offset, length]")
    return (_int(raw[0], f"{what} offset", hi=_MAX_ELEMENTS),
            _int(raw[1], f"{what} length", hi=limits.max_request_bytes))


def _shm(raw: Any, limits: Limits) -> ShmRef:
    """The 'x' field: [segment name, [[offset, length] per data frame], reply region]."""
    if type(raw) is not list or len(raw) != 3:
        raise ProtocolError("'x' must be [segment, spans, reply region]")
    name, spans_raw, out_raw = raw
    if type(name) is not str or NAME_RE.match(name) is None:
        raise ProtocolError(f"{name!r} is not a shared-memory segment name")
    if type(spans_raw) is not list:
        raise ProtocolError("'x' spans must be a list")
    if len(spans_raw) > limits.max_frames:
        raise RequestTooLarge(f"{len(spans_raw)} frames exceed the cap of {limits.max_frames}")
    spans = tuple(_span(s, "span", limits) for s in spans_raw)
    out = None if out_raw is None else _span(out_raw, "reply region", limits)
    return ShmRef(name, spans, out)


def check_frames(header: Header, frame_sizes: Sequence[int], limits: Limits) -> None:
    """Check that the data frames after the header match its tensor descriptors.

    ``frame_sizes`` are the byte lengths of the frames that followed the header.
    Each tensor's frames must together hold exactly count x itemsize bytes, each
    frame a whole number of elements.
    """
    if len(frame_sizes) > limits.max_frames:
        raise RequestTooLarge(f"{len(frame_sizes)} frames exceed the cap of {limits.max_frames}")
    total = sum(frame_sizes)
    if total > limits.max_request_bytes:
        raise RequestTooLarge(
            f"request of {total} bytes exceeds the {limits.max_request_bytes}-byte cap"
        )
    if header.nframes != len(frame_sizes):
        raise ProtocolError(
            f"header describes {header.nframes} data frames but {len(frame_sizes)} arrived"
        )
    i = 0
    for t in header.tensors:
        itemsize = t.np_dtype.itemsize
        got = 0
        for size in frame_sizes[i : i + t.nframes]:
            if size > limits.max_frame_bytes:
                raise RequestTooLarge(
                    f"frame of {size} bytes exceeds the {limits.max_frame_bytes}-byte cap"
                )
            if size % itemsize:
                raise ProtocolError(
                    f"frame of {size} bytes for {t.key!r} is not a whole number of {t.dtype}"
                )
            got += size
        if t.nframes and got != t.nbytes:
            raise ProtocolError(
                f"{t.key!r} part {t.part}: frames hold {got} bytes, the header says "
                f"{t.count} x {t.dtype} = {t.nbytes}"
            )
        i += t.nframes


def reply_header(
    request: Header | None,
    *,
    error: int = 0,
    message: str = "",
    tensors: tuple[TensorMeta, ...] = (),
    opts: dict[str, Any] | None = None,
) -> Header:
    """A REPLY header answering ``request`` (request id 0 when it was unreadable)."""
    return Header(
        Kind.REPLY,
        request.request_id if request is not None else 0,
        PROTOCOL_VERSION,
        tensors=tensors,
        opts=opts or {},
        error=error,
        message=message,
    )
