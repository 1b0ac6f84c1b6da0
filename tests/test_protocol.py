"""Codec tests: request and reply bytes checked against hand-written frames.

The expected frames are spelled out in hex, field by field, so that a change
to the codec's layout table cannot also change what the tests expect. The
protocol uses native byte order, so the byte-exact tests skip on big-endian hosts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtfs_proxy_helper import protocol
from virtfs_proxy_helper.client import StatfsReply, StatReply, parse_stat, parse_statfs
from virtfs_proxy_helper.protocol import (
    Chmod,
    Chown,
    Create,
    DecodeError,
    Getversion,
    Lgetxattr,
    Link,
    Llistxattr,
    Lremovexattr,
    Lsetxattr,
    Lstat,
    Mkdir,
    Mknod,
    Open,
    Readlink,
    Remove,
    Rename,
    Request,
    Statfs,
    Symlink,
    Truncate,
    Utime,
)

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="expected frames are little-endian"
)

# One request of each type and its whole frame: u32 type, u32 payload size,
# then the fields. A string is a u16 length and its bytes.
REQUEST_FRAMES: list[tuple[int, Request, str]] = [
    (2, Open(b"/f", 0x8002), "02000000 08000000 0200 2f66 02800000"),
    (
        3,
        Create(b"/new", 0x241, 0o644, 1000, 100),
        "03000000 16000000 0400 2f6e6577 41020000 a4010000 e8030000 64000000",
    ),
    (
        4,
        Mknod(1000, 1000, b"/fifo", 0o10644, 0x0102030405060708),
        "04000000 1b000000 e8030000 e8030000 0500 2f6669666f a4110000 0807060504030201",
    ),
    (
        5,
        Mkdir(0, 0, b"/d", 0o755),
        "05000000 10000000 00000000 00000000 0200 2f64 ed010000",
    ),
    (
        6,
        Symlink(1, 2, b"t", b"/l"),
        "06000000 0f000000 01000000 02000000 0100 74 0200 2f6c",
    ),
    (7, Link(b"/a", b"/b"), "07000000 08000000 0200 2f61 0200 2f62"),
    (8, Lstat(b"/"), "08000000 03000000 0100 2f"),
    (9, Readlink(b"/l", 4096), "09000000 08000000 0200 2f6c 00100000"),
    (10, Statfs(b"/"), "0a000000 03000000 0100 2f"),
    (11, Chmod(b"/f", 0o600), "0b000000 08000000 0200 2f66 80010000"),
    (
        12,
        Chown(b"/f", 1000, protocol.NO_ID),
        "0c000000 0c000000 0200 2f66 e8030000 ffffffff",
    ),
    (13, Truncate(b"/f", 1 << 32), "0d000000 0c000000 0200 2f66 0000000001000000"),
    (
        14,
        Utime(b"/f", 0x12345678, 0x3FFFFFFE, (1 << 64) - 1, 0x3FFFFFFF),
        "0e000000 24000000 0200 2f66 7856341200000000 feffff3f00000000"
        " ffffffffffffffff ffffff3f00000000",
    ),
    (
        15,
        Rename(b"/old", b"/new"),
        "0f000000 0c000000 0400 2f6f6c64 0400 2f6e6577",
    ),
    (16, Remove(b"/\xe9"), "10000000 04000000 0200 2fe9"),
    (
        17,
        Lgetxattr(256, b"/f", b"user.a"),
        "11000000 10000000 00010000 0200 2f66 0600 757365722e61",
    ),
    (18, Llistxattr(0, b"/f"), "12000000 08000000 00000000 0200 2f66"),
    (
        19,
        Lsetxattr(b"/f", b"user.a", b"v\x00\xff", 3, 1),
        "13000000 19000000 0200 2f66 0600 757365722e61 0300 7600ff 03000000 01000000",
    ),
    (
        20,
        Lremovexattr(b"/f", b"user.a"),
        "14000000 0c000000 0200 2f66 0600 757365722e61",
    ),
    (21, Getversion(b"/f"), "15000000 04000000 0200 2f66"),
]

FRAME_IDS = [type(proxy_request).__name__ for _, proxy_request, _ in REQUEST_FRAMES]


def test_frames_cover_every_request_type() -> None:
    assert sorted(kind for kind, _, _ in REQUEST_FRAMES) == list(range(2, 22))


@little_endian
@pytest.mark.parametrize(
    ("kind", "proxy_request", "frame"), REQUEST_FRAMES, ids=FRAME_IDS
)
def test_encode_request_exact_bytes(
    kind: int, proxy_request: Request, frame: str
) -> None:
    assert protocol.encode_request(proxy_request) == bytes.fromhex(frame)


@little_endian
@pytest.mark.parametrize(
    ("kind", "proxy_request", "frame"), REQUEST_FRAMES, ids=FRAME_IDS
)
def test_decode_request_exact_bytes(
    kind: int, proxy_request: Request, frame: str
) -> None:
    data = bytes.fromhex(frame)
    assert protocol.decode_header(data[:8]) == (kind, len(data) - 8)
    decoded = protocol.decode_request(kind, data[8:])
    # Tuples of different request classes compare equal when their fields do.
    assert type(decoded) is type(proxy_request)
    assert decoded == proxy_request


def test_decode_request_accepts_memoryview() -> None:
    payload = memoryview(bytes.fromhex("0200 2f6c 00100000"))
    assert protocol.decode_request(protocol.T_READLINK, payload) == Readlink(
        b"/l", 4096
    )


@little_endian
@pytest.mark.parametrize(
    ("result", "frame"),
    [
        (0, "00000000 04000000 00000000"),
        (4096, "00000000 04000000 00100000"),
        (0x7FFFFFFF, "00000000 04000000 ffffff7f"),
        (-2, "01000000 04000000 feffffff"),
    ],
    ids=["zero", "positive", "max-int32", "enoent"],
)
def test_encode_status_exact_bytes(result: int, frame: str) -> None:
    assert protocol.encode_status(result) == bytes.fromhex(frame)


@little_endian
@pytest.mark.parametrize(
    ("payload", "frame"),
    [
        (b"abc", "00000000 03000000 616263"),
        (b"", "00000000 00000000"),
        (b"\x00\xff", "00000000 02000000 00ff"),
    ],
    ids=["text", "empty", "binary"],
)
def test_encode_data_exact_bytes(payload: bytes, frame: str) -> None:
    assert protocol.encode_data(payload) == bytes.fromhex(frame)


@little_endian
def test_encode_data_max_payload() -> None:
    payload = b"x" * 65536
    assert protocol.encode_data(payload) == bytes.fromhex("00000000 00000100") + payload


@little_endian
def test_encode_data_oversize_is_enobufs() -> None:
    # -105 is Linux's -ENOBUFS.
    expected = bytes.fromhex("01000000 04000000 97ffffff")
    assert protocol.encode_data(b"x" * 65537) == expected


@little_endian
@pytest.mark.parametrize(
    ("result", "data"),
    [
        (protocol.FD_VALID, "ffffff7f"),
        (-13, "f3ffffff"),
        (-2, "feffffff"),
    ],
    ids=["valid", "eacces", "enoent"],
)
def test_encode_fd_status_exact_bytes(result: int, data: str) -> None:
    assert protocol.encode_fd_status(result) == bytes.fromhex(data)


@little_endian
@pytest.mark.parametrize(
    ("value", "data"),
    [
        (b"user.a", "0600 757365722e61"),
        (b"", "0000"),
        (b"a\x00b", "0300 610062"),
        (b"y" * 300, "2c01" + "79" * 300),
    ],
    ids=["name", "empty", "nul", "long"],
)
def test_encode_string_exact_bytes(value: bytes, data: str) -> None:
    assert protocol.encode_string(value) == bytes.fromhex(data)


# A STAT reply with each field set to its 1-based position: st_dev, st_ino and
# st_nlink are u64, st_mode, st_uid and st_gid u32, and the ten fields from
# st_rdev to st_ctime_nsec are u64 again. The struct is packed, with no padding.
STAT_BYTES = bytes.fromhex(
    "0100000000000000 0200000000000000 0300000000000000"
    " 04000000 05000000 06000000"
    " 0700000000000000 0800000000000000 0900000000000000 0a00000000000000"
    " 0b00000000000000 0c00000000000000 0d00000000000000 0e00000000000000"
    " 0f00000000000000 1000000000000000"
)

# A STATFS reply with each of its eleven u64 fields set to its 1-based position.
STATFS_BYTES = bytes.fromhex(
    "0100000000000000 0200000000000000 0300000000000000 0400000000000000"
    " 0500000000000000 0600000000000000 0700000000000000 0800000000000000"
    " 0900000000000000 0a00000000000000 0b00000000000000"
)


def test_stat_struct_size() -> None:
    assert protocol.STAT.size == 116


def test_statfs_struct_size() -> None:
    assert protocol.STATFS.size == 88


@little_endian
def test_stat_struct_layout() -> None:
    assert protocol.STAT.pack(*range(1, 17)) == STAT_BYTES


@little_endian
def test_statfs_struct_layout() -> None:
    assert protocol.STATFS.pack(*range(1, 12)) == STATFS_BYTES


@little_endian
def test_parse_stat_field_names() -> None:
    reply = parse_stat(STAT_BYTES)
    assert reply == StatReply(*range(1, 17))
    assert reply.st_nlink == 3
    assert reply.st_mode == 4
    assert reply.st_gid == 6
    assert reply.st_rdev == 7
    assert reply.st_blocks == 10
    assert reply.st_ctime_nsec == 16


@little_endian
def test_parse_statfs_field_names() -> None:
    reply = parse_statfs(STATFS_BYTES)
    assert reply == StatfsReply(*range(1, 12))
    assert reply.f_type == 1
    assert reply.f_fsid0 == 8
    assert reply.f_fsid1 == 9
    assert reply.f_frsize == 11


@little_endian
@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        (protocol.T_LSTAT, "", "string 0 length runs past"),
        (protocol.T_LSTAT, "01", "string 0 length runs past"),
        (protocol.T_LINK, "0200 2f61 02", "string 1 length runs past"),
        (protocol.T_LSTAT, "0500 2f61", "string 0 of 5 bytes runs past"),
        (protocol.T_LSTAT, "ffff", "string 0 of 65535 bytes runs past"),
        (protocol.T_READLINK, "0200 2f6c", "field 1 runs past"),
        (protocol.T_READLINK, "0200 2f6c 0010", "field 1 runs past"),
        (protocol.T_TRUNCATE, "0200 2f66 00000000", "field 1 runs past"),
        (protocol.T_MKDIR, "00000000", "field 1 runs past"),
        (protocol.T_LSTAT, "0100 2f 00", "1 bytes left over"),
        (protocol.T_READLINK, "0200 2f6c 00100000 0000", "2 bytes left over"),
        (protocol.T_LSTAT, "0300 2f 00 61", "string 0 contains a NUL byte"),
        (protocol.T_LSTAT, "0200 0000", "string 0 contains a NUL byte"),
        (protocol.T_LSTAT, "0300 2f 0000", "string 0 contains a NUL byte"),
        (protocol.T_LINK, "0200 2f61 0300 2f0062", "string 1 contains a NUL byte"),
        (
            protocol.T_SYMLINK,
            "0000000000000000 0200 0074 0200 2f6c",
            "string 2 contains",
        ),
        (protocol.T_LGETXATTR, "00000000 0100 2f 0300 610062", "string 2 contains"),
        (
            protocol.T_LSETXATTR,
            "0100 2f 0300 610062 0100 76 01000000 00000000",
            "string 1 contains a NUL byte",
        ),
        (protocol.T_SUCCESS, "", "unknown request type 0"),
        (protocol.T_ERROR, "feffffff", "unknown request type 1"),
        (22, "0100 2f", "unknown request type 22"),
        (0xFFFFFFFF, "", "unknown request type 4294967295"),
    ],
    ids=[
        "empty-string-length",
        "half-string-length",
        "second-string-length",
        "string-past-end",
        "max-string-past-end",
        "missing-u32",
        "half-u32",
        "half-u64",
        "u32-then-nothing",
        "trailing-byte",
        "trailing-bytes-after-int",
        "nul-in-path",
        "path-only-nuls",
        "path-two-trailing-nuls",
        "nul-in-second-path",
        "nul-in-symlink-target",
        "nul-in-xattr-name-get",
        "nul-in-xattr-name-set",
        "success-type",
        "error-type",
        "type-after-last",
        "max-type",
    ],
)
def test_decode_request_rejects(kind: int, payload: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        protocol.decode_request(kind, bytes.fromhex(payload))


@little_endian
def test_decode_xattr_value_allows_nul() -> None:
    payload = bytes.fromhex("0100 2f 0600 757365722e61 0300 000100 03000000 00000000")
    decoded = protocol.decode_request(protocol.T_LSETXATTR, payload)
    assert decoded == Lsetxattr(b"/", b"user.a", b"\x00\x01\x00", 3, 0)


# Paths and names whose length counts one trailing NUL. QEMU sends a V9fsPath
# that way, because v9fs_path_sprintf in its hw/9pfs/9p.c counts the C
# terminator in the size. The decoder drops that NUL but keeps one in a value.
TERMINATED_PAYLOADS = [
    pytest.param(protocol.T_LSTAT, "0200 2f00", Lstat(b"/"), id="lstat"),
    pytest.param(protocol.T_LSTAT, "0100 00", Lstat(b""), id="lstat-empty"),
    pytest.param(protocol.T_OPEN, "0300 2f6600 00000000", Open(b"/f", 0), id="open"),
    pytest.param(
        protocol.T_LINK, "0300 2f6100 0300 2f6200", Link(b"/a", b"/b"), id="link"
    ),
    pytest.param(
        protocol.T_LINK, "0200 2f61 0300 2f6200", Link(b"/a", b"/b"), id="link-mixed"
    ),
    pytest.param(
        protocol.T_SYMLINK,
        "0000000000000000 0200 7400 0300 2f6c00",
        Symlink(0, 0, b"t", b"/l"),
        id="symlink",
    ),
    pytest.param(
        protocol.T_LSETXATTR,
        "0300 2f6600 0700 757365722e6100 0200 7600 02000000 00000000",
        Lsetxattr(b"/f", b"user.a", b"v\x00", 2, 0),
        id="lsetxattr-value-keeps-nul",
    ),
]


@little_endian
@pytest.mark.parametrize(("kind", "payload", "expected"), TERMINATED_PAYLOADS)
def test_decode_drops_path_terminator(
    kind: int, payload: str, expected: Request
) -> None:
    decoded = protocol.decode_request(kind, bytes.fromhex(payload))
    assert type(decoded) is type(expected)
    assert decoded == expected


@little_endian
def test_decode_empty_path_allowed() -> None:
    assert protocol.decode_request(protocol.T_LSTAT, bytes.fromhex("0000")) == Lstat(
        b""
    )


@little_endian
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("08000000 00000100", (8, 65536)),
        ("08000000 00000000", (8, 0)),
        ("ffffffff 03000000", (0xFFFFFFFF, 3)),
        ("08000000 03000000 0100 2f", (8, 3)),
    ],
    ids=["max-size", "zero-size", "max-type", "payload-after-header"],
)
def test_decode_header_accepts(header: str, expected: tuple[int, int]) -> None:
    assert protocol.decode_header(bytes.fromhex(header)) == expected


@little_endian
@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("08000000 01000100", "payload size 65537 exceeds the maximum of 65536"),
        ("08000000 ffffffff", "payload size 4294967295 exceeds"),
        ("08000000 000001", "needs 8 bytes, got 7"),
        ("08000000", "needs 8 bytes, got 4"),
        ("", "needs 8 bytes, got 0"),
    ],
    ids=["size-over-max", "max-u32-size", "seven-bytes", "four-bytes", "empty"],
)
def test_decode_header_rejects(header: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        protocol.decode_header(bytes.fromhex(header))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1, 1),
        (0x7FFFFFFF, 2147483647),
        (0x80000000, -2147483648),
        (0xFFFFFFFE, -2),
        (0xFFFFFFFF, -1),
    ],
)
def test_to_signed32_edges(value: int, expected: int) -> None:
    assert protocol.to_signed32(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1, 1),
        (0xFFFFFFFF, 4294967295),
        (0x7FFFFFFFFFFFFFFF, 9223372036854775807),
        (0x8000000000000000, -9223372036854775808),
        (0xFFFFFFFFFFFFFFFF, -1),
    ],
)
def test_to_signed64_edges(value: int, expected: int) -> None:
    assert protocol.to_signed64(value) == expected


# Field kinds by field name, written independently of protocol.LAYOUTS so
# that a wrong layout letter shows up as a failed round trip.
U32_FIELDS = frozenset({"flags", "mode", "uid", "gid", "bufsize", "size"})
U64_FIELDS = frozenset(
    {"rdev", "length", "atime_sec", "atime_nsec", "mtime_sec", "mtime_nsec"}
)
PATH_FIELDS = frozenset({"path", "target", "oldpath", "newpath", "name"})

U32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
PATH = st.lists(st.integers(min_value=1, max_value=255), max_size=64).map(bytes)
ANY_BYTES = st.binary(max_size=256)


def field_strategy(name: str) -> st.SearchStrategy[int] | st.SearchStrategy[bytes]:
    if name in U32_FIELDS:
        return U32
    if name in U64_FIELDS:
        return U64
    if name in PATH_FIELDS:
        return PATH
    assert name == "value", f"no strategy for field {name}"
    return ANY_BYTES


def encode_with_terminators(proxy_request: Request) -> bytes:
    """Encode a request's payload with a NUL counted in each path and name.

    This encoder follows the field names instead of the codec's layout table.
    """
    parts: list[bytes] = []
    for name, value in zip(type(proxy_request)._fields, proxy_request, strict=True):
        if isinstance(value, int):
            width = 8 if name in U64_FIELDS else 4
            parts.append(value.to_bytes(width, sys.byteorder))
            continue
        assert isinstance(value, bytes)
        if name in PATH_FIELDS:
            value += b"\0"
        parts.append(len(value).to_bytes(2, sys.byteorder) + value)
    return b"".join(parts)


REQUEST_CLASSES = [type(proxy_request) for _, proxy_request, _ in REQUEST_FRAMES]


def request_strategy(cls: type[Request]) -> st.SearchStrategy[Request]:
    fields = [field_strategy(name) for name in cls._fields]
    return st.tuples(*fields).map(lambda values: cls(*values))


ANY_REQUEST = st.one_of([request_strategy(cls) for cls in REQUEST_CLASSES])


@settings(max_examples=400, deadline=None)
@given(ANY_REQUEST)
def test_request_round_trip(proxy_request: Request) -> None:
    frame = protocol.encode_request(proxy_request)
    kind, size = protocol.decode_header(frame)
    assert kind == protocol.TYPE_OF[type(proxy_request)]
    assert size == len(frame) - protocol.HEADER_SIZE
    decoded = protocol.decode_request(kind, frame[protocol.HEADER_SIZE :])
    assert type(decoded) is type(proxy_request)
    assert decoded == proxy_request


@settings(max_examples=200, deadline=None)
@given(ANY_REQUEST)
def test_terminated_paths_round_trip(proxy_request: Request) -> None:
    payload = encode_with_terminators(proxy_request)
    decoded = protocol.decode_request(protocol.TYPE_OF[type(proxy_request)], payload)
    assert type(decoded) is type(proxy_request)
    assert decoded == proxy_request


@settings(max_examples=200, deadline=None)
@given(ANY_REQUEST, st.data())
def test_truncated_payload_rejected(
    proxy_request: Request, data: st.DataObject
) -> None:
    payload = protocol.encode_request(proxy_request)[protocol.HEADER_SIZE :]
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    with pytest.raises(DecodeError):
        protocol.decode_request(protocol.TYPE_OF[type(proxy_request)], payload[:cut])


@settings(max_examples=200, deadline=None)
@given(ANY_REQUEST, st.binary(min_size=1, max_size=16))
def test_extended_payload_rejected(proxy_request: Request, extra: bytes) -> None:
    payload = protocol.encode_request(proxy_request)[protocol.HEADER_SIZE :]
    with pytest.raises(DecodeError):
        protocol.decode_request(protocol.TYPE_OF[type(proxy_request)], payload + extra)


# Mostly known types, so that most examples reach the field decoder.
ANY_KIND = st.one_of(
    st.integers(min_value=0, max_value=23),
    st.integers(min_value=0, max_value=(1 << 32) - 1),
)


def check_decode_or_reject(kind: int, payload: bytes) -> None:
    """Assert that `payload` decodes to `kind`'s class or raises DecodeError.

    A decoded request must encode to a payload that decodes to it again. The
    bytes may differ from `payload` by the path terminators the decoder drops.
    """
    try:
        decoded = protocol.decode_request(kind, payload)
    except DecodeError:
        return
    assert type(decoded) is protocol.LAYOUTS[kind][0]
    encoded = protocol.encode_request(decoded)[protocol.HEADER_SIZE :]
    assert len(encoded) <= len(payload)
    assert protocol.decode_request(kind, encoded) == decoded


@settings(max_examples=500, deadline=None)
@given(ANY_KIND, st.binary(max_size=4096))
def test_decode_random_payload(kind: int, payload: bytes) -> None:
    check_decode_or_reject(kind, payload)


@settings(max_examples=300, deadline=None)
@given(ANY_KIND, ANY_REQUEST, st.data())
def test_decode_mutated_payload(
    kind: int, proxy_request: Request, data: st.DataObject
) -> None:
    # A valid payload with one byte changed gets further into the decoder
    # than random bytes do.
    payload = bytearray(protocol.encode_request(proxy_request)[protocol.HEADER_SIZE :])
    if payload:
        index = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[index] = data.draw(st.integers(min_value=0, max_value=255))
    check_decode_or_reject(kind, bytes(payload))


def decode_or_error(decode: Callable[[], object]) -> object:
    try:
        return decode()
    except DecodeError as err:
        return f"DecodeError: {err}"


@settings(max_examples=500, deadline=None)
@given(ANY_REQUEST, st.data())
def test_fast_decoders_match_field_decoder(
    proxy_request: Request, data: st.DataObject
) -> None:
    # The per-type decoders take shortcuts. For any payload, valid or one
    # byte off, they must give the request or the error that the
    # field-by-field reference decoder gives.
    kind = protocol.TYPE_OF[type(proxy_request)]
    cls, layout = protocol.LAYOUTS[kind]
    payload = bytearray(encode_with_terminators(proxy_request))
    change = data.draw(st.sampled_from(["none", "byte", "cut", "extend"]))
    if change == "byte" and payload:
        index = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[index] = data.draw(st.sampled_from([0, 1, 0xFF]))
    elif change == "cut" and payload:
        del payload[data.draw(st.integers(min_value=0, max_value=len(payload) - 1)) :]
    elif change == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=3))
    fast = decode_or_error(lambda: protocol.DECODERS[kind](bytes(payload)))
    reference = decode_or_error(
        lambda: cls(*protocol.decode_fields(layout, bytes(payload)))
    )
    assert fast == reference
    assert type(fast) is type(reference)
