"""Coverage-guided fuzzing of the frame codec with atheris.

The input is a byte stream as the helper receives it. Each frame in it goes
through decode_header and decode_request, which must return a request or
raise DecodeError. Any other exception is a bug, and so is a decoded
request that does not survive re-encoding. See fuzz/README.md for how to
run it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from virtfs_proxy_helper import protocol


def check_frames(data: bytes) -> None:
    """Decode every complete frame in `data`, as the request loop would."""
    view = memoryview(data)
    offset = 0
    while offset + protocol.HEADER_SIZE <= len(data):
        try:
            kind, size = protocol.decode_header(view[offset:])
        except protocol.DecodeError:
            # The request loop closes the connection here.
            return
        start = offset + protocol.HEADER_SIZE
        payload = data[start : start + size]
        if len(payload) < size:
            return
        offset = start + size
        try:
            request = protocol.decode_request(kind, payload)
        except protocol.DecodeError:
            continue
        assert type(request) is protocol.LAYOUTS[kind][0]
        # Re-encoding may drop the one trailing NUL a path is allowed.
        encoded = protocol.encode_request(request)[protocol.HEADER_SIZE :]
        assert len(encoded) <= len(payload)
        assert protocol.decode_request(kind, encoded) == request


def write_seeds(directory: Path) -> None:
    """Write one valid frame of each request type into `directory`."""
    samples: list[protocol.Request] = [
        protocol.Open(b"/f", 2),
        protocol.Create(b"/new\0", 0o102, 0o644, 1000, 1000),
        protocol.Mknod(0, 0, b"/fifo", 0o10644, 0),
        protocol.Mkdir(1000, 1000, b"/d", 0o755),
        protocol.Symlink(0, 0, b"target", b"/l"),
        protocol.Link(b"/a", b"/b"),
        protocol.Lstat(b"/"),
        protocol.Readlink(b"/l", 4096),
        protocol.Statfs(b"/"),
        protocol.Chmod(b"/f", 0o600),
        protocol.Chown(b"/f", 1000, protocol.NO_ID),
        protocol.Truncate(b"/f", 5),
        protocol.Utime(b"/f", 1, 2, 3, 4),
        protocol.Rename(b"/a", b"/b"),
        protocol.Remove(b"/f"),
        protocol.Lgetxattr(0, b"/f", b"user.k"),
        protocol.Llistxattr(100, b"/f"),
        protocol.Lsetxattr(b"/f", b"user.k", b"v\0", 2, 0),
        protocol.Lremovexattr(b"/f", b"user.k"),
        protocol.Getversion(b"/f"),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for request in samples:
        name = type(request).__name__.lower()
        (directory / name).write_bytes(protocol.encode_request(request))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, check_frames)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
