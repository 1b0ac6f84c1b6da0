#!/usr/bin/env python3
"""The least a Python helper can do per LSTAT: the floor for our helper's speed.

bench/protocol.py --floor runs this next to the C helper and ours. It takes
the same --fd and --path options, chroots into the export and then answers
LSTAT requests with one recv_into, one os.lstat and one send each: no
decoding checks, no dispatch, no logging, no sandbox beyond the chroot.
Any other request type, a frame split over two receives or a failed lstat
ends it. It is a measuring stick, not a helper to run.

Whatever ours does on top of these three calls shows as the gap between
ours and this script. The gap between this script and the C helper is
the cost of the interpreter itself, which no change to our code removes.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct

_HEADER = struct.Struct("=II")
_LENGTH = struct.Struct("=H")
# Reply header (SUCCESS, 116 bytes) and the LSTAT payload, seconds signed.
_REPLY = struct.Struct("=IIQQQIIIQQQQqQqQqQ")
_T_LSTAT = 8
_NS = 1_000_000_000


def serve(sock: socket.socket) -> None:
    buffer = bytearray(8 + 65536)
    view = memoryview(buffer)
    receive, send, lstat, pack = sock.recv_into, sock.send, os.lstat, _REPLY.pack
    while True:
        received = receive(view)
        if received < 10:
            return
        kind, size = _HEADER.unpack_from(buffer)
        (length,) = _LENGTH.unpack_from(buffer, 8)
        if kind != _T_LSTAT or received != 8 + size:
            return
        # QEMU counts the path's NUL terminator in its length.
        st = lstat(bytes(view[10 : 10 + length - 1]))
        # The same packing as operations.stat_payload, inline to save a call.
        mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime = st[:10]
        send(
            pack(
                0,
                116,
                dev,
                ino,
                nlink,
                mode,
                uid,
                gid,
                st.st_rdev,
                size,
                st.st_blksize,
                st.st_blocks,
                atime,
                st.st_atime_ns % _NS,
                mtime,
                st.st_mtime_ns % _NS,
                ctime,
                st.st_ctime_ns % _NS,
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-f", "--fd", type=int, required=True, help="connected socket to serve"
    )
    parser.add_argument("-p", "--path", required=True, help="directory to chroot into")
    # Accepted because the benchmark passes it to every helper.
    parser.add_argument(
        "-n", "--nodaemon", action="store_true", help="ignored: this never forks"
    )
    args = parser.parse_args()
    os.chroot(args.path)
    os.chdir("/")
    serve(socket.socket(fileno=args.fd))


if __name__ == "__main__":
    main()
