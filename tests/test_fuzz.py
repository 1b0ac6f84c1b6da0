"""Fuzz the running helper with hostile bytes on its socket.

Each example sends one burst of bytes to a live helper: one or more frames
of any type number, with random, mutated or valid payloads and header sizes
that may lie. The invariant is checked after every example. Each complete
frame gets a valid reply of the kind its type calls for: an fd reply for
OPEN and CREATE, a SUCCESS or ERROR frame otherwise. The helper closes the
connection only after a header whose size exceeds 65536, and logs why.
When the test hangs up after a burst, the helper exits with status 0
between frames and 1 inside one. It never exits with a signal, another
status or a traceback, never takes more than REPLY_TIMEOUT to reply, never
keeps a descriptor it did not hold before, and never changes the export for
a malformed request. No request, well-formed or not, reaches the files in
OUTSIDE, next to the export, or returns anything of them.

The expected replies come from a reference decoder in this file, written
from the frame layouts independently of the codec under test.

One helper serves many examples and is restarted only after it exits, or
after an example failed. VIRTFS_FUZZ_EXAMPLES sets the base number of
examples of each fuzz test, which the cheaper tests multiply. The default,
100, took about 30 s in all on a 2-core VM at load average 4. Run with e.g.
VIRTFS_FUZZ_EXAMPLES=3000 to fuzz longer.
"""

from __future__ import annotations

import array
import errno
import hashlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, NoReturn

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from harness import our_helper

FUZZ_EXAMPLES = int(os.environ.get("VIRTFS_FUZZ_EXAMPLES", "100"))

# Generous, because the tests share a noisy 2-core VM. A healthy helper
# replies in milliseconds.
REPLY_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0

MAX_PAYLOAD = 65536
HEADER = struct.Struct("=II")
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
I32 = struct.Struct("=i")

T_SUCCESS = 0
T_ERROR = 1
FD_VALID = 0x7FFFFFFF
MAX_ERRNO = 4095

# Field layout of each request type as QEMU's proxy driver sends it, spelled
# out here apart from the codec: d = u32, q = u64, p = path, n = xattr name,
# s = xattr value. Strings are a u16 length and that many bytes. A path or
# name may end in one NUL, which QEMU counts in the length, and contain no
# other NUL.
REFERENCE_LAYOUTS: dict[int, str] = {
    2: "pd",  # OPEN path flags
    3: "pdddd",  # CREATE path flags mode uid gid
    4: "ddpdq",  # MKNOD uid gid path mode rdev
    5: "ddpd",  # MKDIR uid gid path mode
    6: "ddpp",  # SYMLINK uid gid target path
    7: "pp",  # LINK oldpath newpath
    8: "p",  # LSTAT path
    9: "pd",  # READLINK path bufsize
    10: "p",  # STATFS path
    11: "pd",  # CHMOD path mode
    12: "pdd",  # CHOWN path uid gid
    13: "pq",  # TRUNCATE path length
    14: "pqqqq",  # UTIME path atime atime_nsec mtime mtime_nsec
    15: "pp",  # RENAME oldpath newpath
    16: "p",  # REMOVE path
    17: "dpn",  # LGETXATTR size path name
    18: "dp",  # LLISTXATTR size path
    19: "pnsdd",  # LSETXATTR path name value size flags
    20: "pn",  # LREMOVEXATTR path name
    21: "p",  # GETVERSION path
}
FD_REPLY_TYPES = frozenset({2, 3})
STATUS_REPLY_TYPES = frozenset({4, 5, 6, 7, 11, 12, 13, 14, 15, 16, 19, 20})
# Types that cannot change the export even when they succeed, so the tree
# must stay the same after them as after a malformed frame.
READ_ONLY_TYPES = frozenset({8, 9, 10, 17, 18, 21})
STAT_SIZE = 116
STATFS_SIZE = 88
VERSION_SIZE = 8


class Frame(NamedTuple):
    kind: int
    payload: bytes


class StreamPlan(NamedTuple):
    """What the helper must make of a byte stream, frame by frame."""

    frames: list[Frame]
    # The stream reaches a header whose size exceeds MAX_PAYLOAD.
    oversize: bool
    # The bytes of an incomplete frame at the end of the stream.
    rest: bytes


class Burst(NamedTuple):
    """One example: bytes sent at once, then a hang-up or a completed frame."""

    data: bytes
    hang_up: bool


class HelperClosed(Exception):
    """The helper closed the connection where a reply was expected."""


def reference_decode(kind: int, payload: bytes) -> list[int | bytes] | None:
    """Return the fields of a well-formed request, or None if it is malformed."""
    layout = REFERENCE_LAYOUTS.get(kind)
    if layout is None:
        return None
    fields: list[int | bytes] = []
    offset = 0
    for code in layout:
        if code in "dq":
            unpacker = U32 if code == "d" else U64
            if offset + unpacker.size > len(payload):
                return None
            fields.append(unpacker.unpack_from(payload, offset)[0])
            offset += unpacker.size
            continue
        if offset + U16.size > len(payload):
            return None
        (length,) = U16.unpack_from(payload, offset)
        offset += U16.size
        if offset + length > len(payload):
            return None
        text = payload[offset : offset + length]
        offset += length
        if code in "pn":
            text = text.removesuffix(b"\0")
            if b"\0" in text:
                return None
        fields.append(text)
    if offset != len(payload):
        return None
    return fields


def split_stream(stream: bytes) -> StreamPlan:
    """Cut `stream` into frames the way the helper must read it."""
    frames: list[Frame] = []
    offset = 0
    while offset < len(stream):
        if len(stream) - offset < HEADER.size:
            return StreamPlan(frames, False, stream[offset:])
        kind, size = HEADER.unpack_from(stream, offset)
        if size > MAX_PAYLOAD:
            return StreamPlan(frames, True, b"")
        end = offset + HEADER.size + size
        if end > len(stream):
            return StreamPlan(frames, False, stream[offset:])
        frames.append(Frame(kind, stream[offset + HEADER.size : end]))
        offset = end
    return StreamPlan(frames, False, b"")


def padding_for(rest: bytes) -> bytes:
    """Return the zero bytes that complete the incomplete frame `rest`."""
    header = rest[: HEADER.size].ljust(HEADER.size, b"\0")
    _, size = HEADER.unpack(header)
    if size > MAX_PAYLOAD:
        return bytes(HEADER.size - min(len(rest), HEADER.size))
    return bytes(HEADER.size + size - len(rest))


def changes_export(frame: Frame) -> bool:
    """Tell whether the helper may change the export while serving `frame`."""
    if reference_decode(frame.kind, frame.payload) is None:
        return False
    return frame.kind not in READ_ONLY_TYPES


# Receiving replies.


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def receive_exact(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """Read exactly `size` bytes and any descriptors that come with them."""
    data = bytearray()
    fds: list[int] = []
    space = socket.CMSG_SPACE(16 * I32.size)
    while len(data) < size:
        try:
            chunk, ancillary, flags, _ = sock.recvmsg(size - len(data), space)
        except TimeoutError:
            close_all(fds)
            raise AssertionError(
                f"no reply within {REPLY_TIMEOUT} s ({len(data)} of {size} bytes)"
            ) from None
        except ConnectionResetError:
            close_all(fds)
            raise HelperClosed("connection reset") from None
        for level, kind, cmsg in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(cmsg[: len(cmsg) - len(cmsg) % I32.size])
                fds.extend(received)
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise AssertionError("a reply carried more descriptors than expected")
        if not chunk:
            close_all(fds)
            raise HelperClosed(f"end of stream after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data), fds


def check_fd_reply(
    sock: socket.socket, frame: Frame, malformed: bool, outside: set[tuple[int, int]]
) -> None:
    data, fds = receive_exact(sock, I32.size)
    try:
        (status,) = I32.unpack(data)
        if status == FD_VALID:
            assert not malformed, f"malformed {frame} got a descriptor"
            assert len(fds) == 1, f"fd reply to {frame} carried {len(fds)} fds"
            st = os.fstat(fds[0])
            # The helper hands out regular files and directories only.
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), frame
            assert (st.st_dev, st.st_ino) not in outside, f"{frame} escaped"
        else:
            assert not fds, f"error reply {status} to {frame} carried descriptors"
            assert -MAX_ERRNO <= status < 0, f"fd reply {status} to {frame}"
            if malformed:
                assert status == -errno.EINVAL, f"{frame} got {status}"
    finally:
        close_all(fds)


def check_success_payload(
    frame: Frame,
    fields: list[int | bytes],
    data: bytes,
    outside: set[tuple[int, int]],
) -> None:
    """Check the payload of a SUCCESS reply against the request's type."""
    kind = frame.kind
    assert SECRET not in data, f"{frame} escaped"
    if kind in STATUS_REPLY_TYPES:
        assert data == bytes(4), f"{frame} got SUCCESS {data!r}"
    elif kind == 8:
        assert len(data) == STAT_SIZE, f"{frame} got {len(data)} bytes"
        # st_dev and st_ino lead the stat payload.
        assert struct.unpack_from("=QQ", data) not in outside, f"{frame} escaped"
    elif kind == 10:
        assert len(data) == STATFS_SIZE, f"{frame} got {len(data)} bytes"
    elif kind == 21:
        assert len(data) == VERSION_SIZE, f"{frame} got {len(data)} bytes"
    elif kind in (17, 18) and fields[0] == 0:
        assert len(data) == U32.size, f"{frame} size query got {data!r}"
    else:
        # READLINK, LGETXATTR and LLISTXATTR: one wire string.
        assert len(data) >= U16.size, f"{frame} got {data!r}"
        (length,) = U16.unpack_from(data)
        assert length == len(data) - U16.size, f"{frame} got {data!r}"
        size_field = fields[1] if kind == 9 else fields[0]
        assert isinstance(size_field, int)
        # The size is an int32 on QEMU's side, so a negative one must fail.
        limit = size_field - (1 << 32) if size_field & 0x80000000 else size_field
        if kind == 9:
            # READLINK leaves room for the terminating NUL.
            limit -= 1
        assert length <= limit, f"{frame} got {length} bytes"


def check_frame_reply(
    sock: socket.socket, frame: Frame, fields: object, outside: set[tuple[int, int]]
) -> None:
    header, fds = receive_exact(sock, HEADER.size)
    close_all(fds)
    assert not fds, f"reply frame to {frame} carried descriptors"
    kind, size = HEADER.unpack(header)
    assert kind in (T_SUCCESS, T_ERROR), f"reply type {kind} to {frame}"
    assert size <= MAX_PAYLOAD, f"reply of {size} bytes to {frame}"
    data, fds = receive_exact(sock, size)
    close_all(fds)
    assert not fds, f"reply payload to {frame} carried descriptors"
    if kind == T_ERROR:
        assert size == I32.size, f"ERROR frame of {size} bytes to {frame}"
        (status,) = I32.unpack(data)
        assert -MAX_ERRNO <= status < 0, f"ERROR {status} to {frame}"
        if frame.kind not in REFERENCE_LAYOUTS:
            assert status == -errno.EOPNOTSUPP, f"{frame} got {status}"
        elif fields is None:
            assert status == -errno.EINVAL, f"{frame} got {status}"
        return
    assert fields is not None, f"malformed {frame} got SUCCESS"
    assert frame.kind in REFERENCE_LAYOUTS, f"unknown type {frame} got SUCCESS"
    assert isinstance(fields, list)
    check_success_payload(frame, fields, data, outside)


def check_reply(
    sock: socket.socket, frame: Frame, outside: set[tuple[int, int]]
) -> None:
    """Read and check the reply to `frame`, which must not reveal `outside`."""
    fields = reference_decode(frame.kind, frame.payload)
    if frame.kind in FD_REPLY_TYPES:
        check_fd_reply(sock, frame, fields is None, outside)
    else:
        check_frame_reply(sock, frame, fields, outside)


# The export and the helper's state.


# Everything a fuzz target writes is under FUZZ_BASE, at a path fixed for
# the test process so that PATHS can name OUTSIDE. OUTSIDE contains files
# that no request may reach: only a helper that resolves a path outside the
# export gets there.
FUZZ_BASE = Path(tempfile.gettempdir()) / f"virtfs-fuzz-{os.getpid()}"
OUTSIDE = FUZZ_BASE / "outside"

# Runs the helper in a private mount namespace whose root file system is
# read-only, except for FUZZ_BASE. A helper whose confinement broke then
# gets EROFS and fails the checks, where it would otherwise apply random
# requests such as CHOWN "/" to the host.
GUARD_SCRIPT = (
    'base=$1; shift; mount --bind "$base" "$base" '
    '&& mount -o remount,bind,ro / && exec "$@"'
)


def populate_export(root: Path) -> None:
    """Create the tree that every example starts from.

    Three symlinks point out of the export, to OUTSIDE: up by "..", by its
    absolute path, and through "/".
    """
    os.symlink("../outside", root / "up")
    os.symlink(OUTSIDE, root / "abs")
    os.symlink("/", root / "root")
    (root / "file").write_bytes(b"hello world")
    os.setxattr(root / "file", "user.k", b"value")
    (root / "dir").mkdir()
    (root / "dir" / "inner").write_bytes(b"inner")
    os.symlink("file", root / "link")
    os.mkfifo(root / "fifo")
    (root / "empty").touch()


# Contents, xattr value and symlink target of the files outside the export,
# so that a reply carrying any of them is caught.
SECRET = b"outside-secret"


def populate_outside(outside: Path) -> None:
    """Create the files that no request may reach."""
    if outside.exists():
        shutil.rmtree(outside)
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    os.setxattr(outside / "secret", "user.k", SECRET)
    os.symlink(SECRET.decode(), outside / "link")


def tree_inodes(root: Path) -> set[tuple[int, int]]:
    """Return the (st_dev, st_ino) of `root` and of everything under it."""
    inodes = set()
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        inodes.add((st.st_dev, st.st_ino))
    return inodes


def reset_export(root: Path) -> None:
    """Put the export back as `populate_export` made it, in place.

    The helper's root stays the same directory, so it keeps running.
    """
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    for name in os.listxattr(root, follow_symlinks=False):
        os.removexattr(root, name, follow_symlinks=False)
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)
    populate_export(root)


# Only this much of a file is compared: a well-formed TRUNCATE may leave a
# sparse file of terabytes, and the helper itself never writes file data.
CONTENT_LIMIT = 1 << 20


def describe_entry(path: bytes) -> tuple[object, ...]:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as file:
            content: bytes = hashlib.sha256(file.read(CONTENT_LIMIT)).digest()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    else:
        content = b""
    xattrs = sorted(
        (name, os.getxattr(path, name, follow_symlinks=False))
        for name in os.listxattr(path, follow_symlinks=False)
    )
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_rdev,
        st.st_nlink,
        st.st_mtime_ns,
        st.st_ctime_ns,
        content,
        tuple(xattrs),
    )


def snapshot_tree(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Describe every entry under `root`: type, mode, owner, size, data, xattrs.

    Times are included too (not atime, which reading changes): ctime moves
    on any change to an inode, so it catches what the other fields miss.
    """
    top = os.fsencode(root)
    tree = {b".": describe_entry(top)}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            tree[os.path.relpath(path, top)] = describe_entry(path)
    return tree


def helper_descriptors(pid: int) -> dict[str, str]:
    """Return the helper's open descriptors and what each points at."""
    table = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            table[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            # Closed since the listing: report it as gone.
            table[fd] = "(closed)"
    return table


class Sender(threading.Thread):
    """Sends a burst while the main thread reads the replies.

    A burst may carry more replies than the socket buffers hold, so sending
    it all before reading could block both sides.
    """

    def __init__(self, sock: socket.socket, data: bytes):
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.sock.sendall(self.data)
        except (BrokenPipeError, ConnectionResetError):
            # The helper closed the connection; the reader checks that it
            # was allowed to.
            pass
        except OSError as err:
            self.error = err


class FuzzTarget:
    """A helper that serves many examples, restarted whenever it exits."""

    def __init__(self, sandbox: str = "namespace"):
        self.sandbox = sandbox
        if FUZZ_BASE.exists():
            shutil.rmtree(FUZZ_BASE)
        FUZZ_BASE.mkdir()
        self.outside = OUTSIDE
        populate_outside(self.outside)
        self.outside_tree = snapshot_tree(self.outside)
        self.outside_inodes = tree_inodes(self.outside)
        self.export = FUZZ_BASE / "export"
        self.export.mkdir()
        self.export.chmod(0o755)
        populate_export(self.export)
        self.log_path = FUZZ_BASE / "helper.log"
        self.log_path.touch()
        self.log_offset = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.descriptors: dict[str, str] = {}
        self.tree = snapshot_tree(self.export)

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        guard = ["unshare", "--mount", "--propagation", "private"]
        guard += ["sh", "-c", GUARD_SCRIPT, "guard", str(FUZZ_BASE)]
        options = ["--nodaemon", "--fd", str(fd), "--path", str(self.export)]
        options += ["--sandbox", self.sandbox]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                guard + our_helper() + options,
                pass_fds=[fd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        theirs.close()
        ours.settimeout(REPLY_TIMEOUT)
        self.sock = ours

        try:
            self.check_in_step()
        except HelperClosed as closed:
            self.fail_closed(closed)
        self.descriptors = helper_descriptors(self.process.pid)

    def stop(self) -> None:
        """Hang up and reap the helper, killing it if it does not exit."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.process is not None:
            try:
                self.process.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def read_log(self) -> str:
        """Return what the helper logged since the last call."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            text = log.read()
        self.log_offset += len(text)
        return text.decode(errors="backslashreplace")

    def check_in_step(self) -> None:
        """Send LSTAT / and check its reply: the stream is still in step.

        Its reply also proves that the helper finished the request before,
        closing any descriptor it sent.
        """
        assert self.sock is not None
        path = b"/\0"
        payload = U16.pack(len(path)) + path
        self.sock.sendall(HEADER.pack(8, len(payload)) + payload)
        header, fds = receive_exact(self.sock, HEADER.size)
        close_all(fds)
        assert HEADER.unpack(header) == (T_SUCCESS, STAT_SIZE)
        data, fds = receive_exact(self.sock, STAT_SIZE)
        close_all(fds)
        assert len(data) == STAT_SIZE

    def expect_exit(self, status: int, reason: str) -> None:
        """Check that the helper ends the connection, exits and logs why."""
        assert self.sock is not None
        assert self.process is not None
        try:
            extra = self.sock.recv(1)
        except ConnectionResetError:
            extra = b""
        assert extra == b"", "bytes after the last expected reply"
        returncode = self.process.wait(timeout=EXIT_TIMEOUT)
        log = self.read_log()
        self.stop()
        assert returncode == status, log
        assert reason in log, log
        assert "Traceback" not in log, log

    def send_and_check(self, burst: Burst) -> None:
        """Send one burst and check every reply, the log and the tree."""
        if self.process is None:
            self.reset()
        assert self.sock is not None
        plan = split_stream(burst.data)
        sender = Sender(self.sock, burst.data)
        sender.start()
        frames = list(plan.frames)
        try:
            for frame in plan.frames:
                check_reply(self.sock, frame, self.outside_inodes)
            sender.join(REPLY_TIMEOUT)
            assert not sender.is_alive(), "the helper stopped reading"
            assert sender.error is None, sender.error
            if plan.rest and not plan.oversize and not burst.hang_up:
                # Complete the last frame, so the helper can reply to it.
                padded = split_stream(plan.rest + padding_for(plan.rest))
                self.sock.sendall(padding_for(plan.rest))
                frames += padded.frames
                for frame in padded.frames:
                    check_reply(self.sock, frame, self.outside_inodes)
                plan = padded
            if plan.oversize:
                self.expect_exit(1, "exceeds the maximum of 65536")
            elif burst.hang_up:
                self.sock.shutdown(socket.SHUT_WR)
                if plan.rest:
                    self.expect_exit(1, "disconnected in the middle of a frame")
                else:
                    self.expect_exit(0, "peer disconnected")
            else:
                self.check_in_step()
                self.check_helper_state()
        except HelperClosed as closed:
            self.fail_closed(closed)
        finally:
            sender.join(REPLY_TIMEOUT)
        self.check_tree(any(changes_export(frame) for frame in frames))

    def fail_closed(self, closed: HelperClosed) -> NoReturn:
        """Reap a helper that closed the connection unasked, and fail with
        its exit status and log."""
        assert self.process is not None
        process = self.process
        self.stop()
        raise AssertionError(
            f"helper closed the connection ({closed}), exit status "
            f"{process.returncode}, log:\n{self.read_log()}"
        ) from None

    def check_helper_state(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None
        assert helper_descriptors(self.process.pid) == self.descriptors
        log = self.read_log()
        assert "Traceback" not in log, log
        assert "internal error" not in log, log

    def check_tree(self, may_change: bool) -> None:
        assert snapshot_tree(self.outside) == self.outside_tree, "outside changed"
        tree = snapshot_tree(self.export)
        if not may_change:
            assert tree == self.tree
        elif tree != self.tree:
            reset_export(self.export)
            self.tree = snapshot_tree(self.export)

    def reset(self) -> None:
        """Start afresh: a new helper on the starting tree."""
        self.stop()
        reset_export(self.export)
        self.tree = snapshot_tree(self.export)
        self.read_log()
        self.start()


@contextmanager
def fuzz_target(sandbox: str = "namespace") -> Iterator[FuzzTarget]:
    target = FuzzTarget(sandbox)
    try:
        yield target
    finally:
        target.stop()
        shutil.rmtree(FUZZ_BASE)


def run_bursts(target: FuzzTarget, burst: Burst) -> None:
    try:
        target.send_and_check(burst)
    except BaseException:
        # The helper may be out of step now; the next example starts a new one.
        target.stop()
        raise


# Strategies.

PATHS = [
    b"/file",
    b"/dir",
    b"/dir/inner",
    b"/link",
    b"/fifo",
    b"/empty",
    b"/",
    b"/missing",
    b"/dir/../file",
    b"/file/x",
    b"",
]
# Ways out of the export, which must all resolve inside it.
ESCAPE_PATHS = [
    b"/up/secret",
    b"/abs/secret",
    b"/up",
    os.fsencode(OUTSIDE / "secret"),
    os.fsencode(OUTSIDE / "link"),
    b"/root" + os.fsencode(OUTSIDE),
    b"/.." * 8 + os.fsencode(OUTSIDE / "secret"),
]
XATTR_NAMES = [b"user.k", b"user.new", b"user.", b"trusted.x", b"security.x", b""]
U32_EDGES = [0, 1, 2, 0o644, 0o100644, 0o10644, 0o20644, 0xFFFF, 0x10000]
U32_EDGES += [0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
OPEN_FLAGS = [
    os.O_RDONLY,
    os.O_WRONLY,
    os.O_RDWR,
    os.O_RDWR | os.O_CREAT,
    os.O_RDWR | os.O_CREAT | os.O_EXCL,
    os.O_WRONLY | os.O_TRUNC,
    os.O_DIRECTORY,
    os.O_NOFOLLOW,
    os.O_PATH,
    os.O_TMPFILE | os.O_RDWR,
    os.O_RDONLY | os.O_NONBLOCK,
]
U64_EDGES = [0, 1, 5, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
U64_EDGES += [(1 << 30) - 1, (1 << 30) - 2]  # UTIME_NOW and UTIME_OMIT

u32s = st.one_of(st.sampled_from(U32_EDGES + OPEN_FLAGS), st.integers(0, (1 << 32) - 1))
u64s = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, (1 << 64) - 1))
# Steps repeated to build paths around and past PATH_MAX (4096 bytes),
# which the helper resolves a chunk of components at a time.
LONG_PATH_STEPS = [b"/.", b"//", b"/dir/..", b"/link/..", b"/../", b"/up/.."]
LONG_PATH_STEPS += [b"/root/", b"/" + b"d" * 255]


def build_long_path(step: bytes, length: int, tail: bytes) -> bytes:
    """Return `length` bytes of `step` repeated, ending in `tail`."""
    repeated = step * (length // len(step) + 1)
    return repeated[: max(length - len(tail), 0)] + tail


long_paths = st.builds(
    build_long_path,
    st.sampled_from(LONG_PATH_STEPS),
    st.one_of(st.integers(4090, 4100), st.integers(4096, 12000)),
    st.sampled_from(PATHS),
)
# One trailing NUL is allowed, and any other NUL makes the request malformed.
nul_suffixes = st.sampled_from([b"\0", b"\0", b"\0\0", b"\0x"])
paths = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(ESCAPE_PATHS),
    st.builds(bytes.__add__, st.sampled_from(PATHS), nul_suffixes),
    st.binary(max_size=24),
    long_paths,
)
names = st.one_of(
    st.sampled_from(XATTR_NAMES),
    st.builds(bytes.__add__, st.sampled_from(XATTR_NAMES), nul_suffixes),
    st.binary(max_size=24),
)

values = st.binary(max_size=64)
STRING_FIELDS = {"p": paths, "n": names, "s": values}

kinds = st.one_of(
    st.integers(0, 21),
    st.sampled_from([22, 23, 255, 256, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
    st.integers(0, (1 << 32) - 1),
)
# Payloads that fill or overfill a frame reach the size limit checks.
big_payloads = st.builds(
    lambda size, byte: bytes([byte]) * size,
    st.integers(MAX_PAYLOAD - 8, MAX_PAYLOAD),
    st.integers(0, 255),
)
random_payloads = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64),
    st.binary(max_size=512),
    big_payloads,
)


class Encoded(NamedTuple):
    kind: int
    payload: bytes
    # Offsets of the u16 length of each string field.
    string_offsets: list[int]


@st.composite
def valid_requests(draw: st.DrawFn) -> Encoded:
    kind = draw(st.sampled_from(sorted(REFERENCE_LAYOUTS)))
    payload = bytearray()
    offsets = []
    for code in REFERENCE_LAYOUTS[kind]:
        if code == "d":
            payload += U32.pack(draw(u32s))
        elif code == "q":
            payload += U64.pack(draw(u64s))
        else:
            text = draw(STRING_FIELDS[code])
            offsets.append(len(payload))
            payload += U16.pack(len(text)) + text
    return Encoded(kind, bytes(payload), offsets)


MUTATIONS = ["truncate", "extend", "flip", "length", "nul"]


@st.composite
def mutated_requests(draw: st.DrawFn) -> Frame:
    """A valid request with 1 to 3 mutations, sometimes under another type."""
    request = draw(valid_requests())
    data = bytearray(request.payload)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if mutation == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif mutation == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif mutation == "flip" and data:
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= draw(st.integers(1, 255))
        elif mutation in ("length", "nul"):
            offsets = [off for off in request.string_offsets if off + 2 <= len(data)]
            if not offsets:
                continue
            offset = draw(st.sampled_from(offsets))
            (length,) = U16.unpack_from(data, offset)
            if mutation == "length":
                near = st.integers(max(length - 2, 0), min(length + 2, 0xFFFF))
                new = draw(st.one_of(near, st.integers(0, 0xFFFF)))
                U16.pack_into(data, offset, new)
            elif length > 0 and offset + 2 + length <= len(data):
                # Overwrite, so that the string keeps its length.
                position = offset + 2 + draw(st.integers(0, length - 1))
                data[position] = 0
    kind = draw(st.one_of(st.just(request.kind), st.just(request.kind), kinds))
    return Frame(kind, bytes(data))


def honest_frame(frame: Frame) -> bytes:
    return HEADER.pack(frame.kind, len(frame.payload)) + frame.payload


@st.composite
def lying_frames(draw: st.DrawFn) -> bytes:
    """A frame whose header size may disagree with the payload sent."""
    frame = draw(
        st.one_of(mutated_requests(), st.builds(Frame, kinds, random_payloads))
    )
    length = len(frame.payload)
    smaller = st.integers(0, length)
    larger = st.integers(length, length + 64)
    # Sizes over MAX_PAYLOAD end the connection and cost a helper restart,
    # so they get a fifth of the draws.
    edges = st.sampled_from([0, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1])
    oversize = st.one_of(
        st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
        st.integers(MAX_PAYLOAD + 1, (1 << 32) - 1),
    )
    size = draw(st.one_of(smaller, larger, smaller, larger, edges, oversize))
    return HEADER.pack(frame.kind, size) + frame.payload


# About one burst in ten hangs up, which costs a helper restart. The value
# picked is not 0 or 9, which Hypothesis draws more often than the others.
hang_ups = st.integers(0, 9).map(lambda n: n == 4)

random_frames = st.builds(Frame, kinds, random_payloads).map(honest_frame)
mutated_frames = mutated_requests().map(honest_frame)
valid_frames = valid_requests().map(
    lambda request: honest_frame(Frame(request.kind, request.payload))
)
any_frames = st.one_of(random_frames, mutated_frames, valid_frames, lying_frames())


def bursts_of(frames: st.SearchStrategy[bytes], max_frames: int) -> st.SearchStrategy:
    joined = st.lists(frames, min_size=1, max_size=max_frames).map(b"".join)
    return st.builds(Burst, joined, hang_ups)


def fuzz(
    bursts: st.SearchStrategy[Burst],
    scale: int = 1,
    sandbox: str = "namespace",
) -> None:
    """Run FUZZ_EXAMPLES times `scale` examples of `bursts` on one target."""
    with fuzz_target(sandbox) as target:

        @settings(
            max_examples=FUZZ_EXAMPLES * scale,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(bursts)
        def check(burst: Burst) -> None:
            # The plain repr, with bytes literals, is what goes into REGRESSIONS.
            note(repr(burst))
            run_bursts(target, burst)

        check()


# Single frames with honest sizes rarely end the connection, so they cost
# about 7 ms an example, and the scale of 3 buys more of them.


def test_random_payloads_fuzz() -> None:
    fuzz(bursts_of(random_frames, 1), scale=3)


def test_mutated_requests_fuzz() -> None:
    fuzz(bursts_of(mutated_frames, 1), scale=3)


# Each way of confining the helper resolves paths with its own code, and
# valid requests are the ones that reach it.
@pytest.mark.parametrize("sandbox", ["namespace", "chroot", "none"])
def test_valid_requests_fuzz(sandbox: str) -> None:
    fuzz(bursts_of(valid_frames, 3), sandbox=sandbox)


def test_lying_sizes_fuzz() -> None:
    fuzz(bursts_of(lying_frames(), 1))


def test_concatenated_frames_fuzz() -> None:
    fuzz(bursts_of(any_frames, 5))


# Bursts replayed on every run. REGRESSIONS takes each input that once
# broke the invariant, copied from the note Hypothesis prints on failure.
# None has so far. BOUNDARY_BURSTS are picked by hand to hit the limits.
REGRESSIONS: list[Burst] = []
BOUNDARY_BURSTS: list[Burst] = [
    # The largest frame: LSTAT of a 65533-byte name plus its NUL.
    Burst(HEADER.pack(8, 65536) + b"\xfe\xff" + b"a" * 65533 + b"\0", False),
    # One byte over the limit, and the largest u32.
    Burst(HEADER.pack(8, 65537) + b"\x01\x00/", False),
    Burst(HEADER.pack(2, 0xFFFFFFFF), False),
    # OPEN /file whose header says 0 bytes: an empty OPEN, then its payload
    # read as a header of 6646889 bytes, which ends the connection.
    Burst(HEADER.pack(2, 0) + b"\x05\x00/file\x00\x00\x00\x00", False),
    # A malformed OPEN (fd reply) and a malformed LSTAT (frame reply) back
    # to back, then an unknown type.
    Burst(
        HEADER.pack(2, 3)
        + b"\x09\x00/"
        + HEADER.pack(8, 4)
        + b"\x01\x00/x"
        + HEADER.pack(99, 0),
        False,
    ),
    # A header cut short, then a hang-up: exit status 1.
    Burst(b"\x08\x00\x00\x00\x03", True),
    # A whole frame, then a hang-up: exit status 0.
    Burst(HEADER.pack(8, 3) + b"\x01\x00/", True),
    # LSTAT of a 4203-byte path, which the helper opens in chunks.
    Burst(HEADER.pack(8, 4205) + b"\x6b\x10" + b"/." * 2099 + b"/file", False),
    # READLINK and LGETXATTR with buffer sizes that are negative as int32.
    Burst(HEADER.pack(9, 11) + b"\x05\x00/link\x00\x00\x00\x80", False),
    Burst(
        HEADER.pack(17, 19) + b"\xff\xff\xff\xff\x05\x00/file\x06\x00user.k",
        False,
    ),
]


def burst_id(burst: Burst) -> str:
    """Name a test case by its first bytes, its length and its ending."""
    ending = "hang-up" if burst.hang_up else "kept"
    return f"{burst.data[:12]!r}-{len(burst.data)}-{ending}"


@pytest.mark.parametrize("burst", REGRESSIONS + BOUNDARY_BURSTS, ids=burst_id)
def test_replayed_bursts(burst: Burst) -> None:
    with fuzz_target() as target:
        run_bursts(target, burst)


def test_escape_check_catches_leak() -> None:
    # A hard link in the export to a file outside it plays the part of a
    # helper that resolved a path outside, so the checks must flag the reply.
    path = b"/leak"
    lstat = HEADER.pack(8, len(path) + 2) + U16.pack(len(path)) + path
    with fuzz_target() as target:
        target.reset()
        os.link(OUTSIDE / "secret", target.export / "leak")
        with pytest.raises(AssertionError, match="escaped"):
            run_bursts(target, Burst(lstat, False))
