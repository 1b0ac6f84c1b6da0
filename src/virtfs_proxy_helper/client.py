"""A blocking client for the proxy protocol, playing QEMU's part.

The tests and benchmarks use it to drive a helper, ours or QEMU's C one,
over a connected unix socket. It reads replies strictly: a reply that does
not match the request's reply kind raises `ReplyError`.
"""

from __future__ import annotations

import array
import socket
import struct
from typing import NamedTuple

from . import protocol
from .protocol import Request

_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class ReplyError(Exception):
    """The helper's reply does not follow the protocol."""


class Reply(NamedTuple):
    """One reply: `status` is 0 or a result on success, -errno on failure.

    `payload` is the data of a SUCCESS frame (empty for fd and status
    replies); `fd` is the received descriptor of a successful OPEN/CREATE.
    """

    status: int
    payload: bytes = b""
    fd: int | None = None


class StatReply(NamedTuple):
    """The fields of an LSTAT reply, in wire order."""

    st_dev: int
    st_ino: int
    st_nlink: int
    st_mode: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_atime_sec: int
    st_atime_nsec: int
    st_mtime_sec: int
    st_mtime_nsec: int
    st_ctime_sec: int
    st_ctime_nsec: int


class StatfsReply(NamedTuple):
    """The fields of a STATFS reply, in wire order."""

    f_type: int
    f_bsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_fsid0: int
    f_fsid1: int
    f_namelen: int
    f_frsize: int


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("helper closed the connection")
        chunks += chunk
    return bytes(chunks)


class Client:
    """Sends requests over `sock` and reads their replies."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, request: Request) -> Reply:
        """Send one request and return its reply."""
        self.send_raw(protocol.encode_request(request))
        kind = protocol.TYPE_OF[type(request)]
        if kind in protocol.FD_REPLY_TYPES:
            return self.read_fd_reply()
        return self.read_frame_reply()

    def read_fd_reply(self) -> Reply:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(
            _I32.size, socket.CMSG_SPACE(fds.itemsize)
        )
        if len(data) < _I32.size:
            data += _recv_exact(self.sock, _I32.size - len(data))
        for level, kind, cmsg in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - len(cmsg) % fds.itemsize])
        (status,) = _I32.unpack(data)
        if status == protocol.FD_VALID:
            if len(fds) != 1:
                raise ReplyError(f"fd reply carried {len(fds)} descriptors, not 1")
            return Reply(0, fd=fds[0])
        if fds:
            raise ReplyError("an error fd reply carried descriptors")
        if status >= 0:
            raise ReplyError(f"fd reply status {status} is neither valid nor -errno")
        return Reply(status)

    def read_frame_reply(self) -> Reply:
        kind, size = protocol.HEADER.unpack(
            _recv_exact(self.sock, protocol.HEADER_SIZE)
        )
        payload = _recv_exact(self.sock, size)
        if kind == protocol.T_ERROR:
            if size != 4:
                raise ReplyError(f"ERROR frame of {size} bytes, not 4")
            return Reply(_I32.unpack(payload)[0])
        if kind != protocol.T_SUCCESS:
            raise ReplyError(f"reply type {kind} is neither SUCCESS nor ERROR")
        return Reply(0, payload)


def status_of(reply: Reply) -> int:
    """Return the int of a status reply: 0 (or a result) or -errno."""
    if reply.status < 0:
        return reply.status
    if len(reply.payload) != 4:
        raise ReplyError(f"status reply of {len(reply.payload)} bytes, not 4")
    return int(_I32.unpack(reply.payload)[0])


def parse_stat(payload: bytes) -> StatReply:
    return StatReply(*protocol.STAT.unpack(payload))


def parse_statfs(payload: bytes) -> StatfsReply:
    return StatfsReply(*protocol.STATFS.unpack(payload))


def parse_string(payload: bytes) -> bytes:
    """Return the bytes of a payload that is exactly one wire string."""
    fields = protocol.decode_fields("s", payload)
    value = fields[0]
    assert isinstance(value, bytes)
    return value


def parse_u32(payload: bytes) -> int:
    return int(_U32.unpack(payload)[0])


def parse_u64(payload: bytes) -> int:
    return int(_U64.unpack(payload)[0])
