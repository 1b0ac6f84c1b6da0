"""Differential tests: the same requests to QEMU's C helper and to ours.

Each test builds two identical export trees and serves one with the C helper
and the other with ours. It sends both the same requests and compares each
pair of replies after normalising what may legitimately differ: inode and
device numbers, times set by the clock, free-space counts, GETVERSION values
and descriptor numbers. A received descriptor is compared by its type, mode,
size, content and status flags. Then the test compares the two trees.

Where ours differs from C on purpose, the case names an entry of
differences.py, and the test asserts the statuses stated there instead of
comparing. Send the C helper a request that blocks or crashes it (see the
entries' C behaviour) only from the tests written for that entry.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from differences import DIFFERENCES, Difference, difference
from harness import HelperProcess, running_helper
from virtfs_proxy_helper import libc, protocol
from virtfs_proxy_helper.client import (
    Reply,
    parse_stat,
    parse_statfs,
    parse_u64,
)
from virtfs_proxy_helper.operations import GETVERSION_FILESYSTEMS
from virtfs_proxy_helper.privileges import CAP_DAC_OVERRIDE, KEPT_MASK
from virtfs_proxy_helper.protocol import (
    Chmod,
    Chown,
    Create,
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

USER = 1000
OTHER = 2000
NO_ID = protocol.NO_ID
ODD_NAME = b"odd\nname\xff"

# Seconds a helper may take to reply before the test fails.
REPLY_TIMEOUT = 5.0
# Seconds without a reply that show the C helper is blocked in open(2).
BLOCK_WAIT = 0.3

# The times that tests set with UTIME all fall before 2001-01-01, so a later
# time came from the clock and differs between the two trees.
EXPLICIT_TIME_LIMIT = 978_307_200
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

O_RDONLY = os.O_RDONLY
O_WRONLY = os.O_WRONLY
O_RDWR = os.O_RDWR
O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL


# Export trees.


def write_file(path: Path, content: bytes, mode: int = 0o644) -> None:
    path.write_bytes(content)
    path.chmod(mode)


def populate(root: Path) -> None:
    """Fill `root` with the tree that every differential test starts from."""
    root.chmod(0o755)
    write_file(root / "file", b"hello, world\n")
    os.link(root / "file", root / "hardlink")
    (root / "dir/nested/deeper").mkdir(parents=True)
    write_file(root / "dir/nested/deeper/leaf", b"leaf\n")
    write_file(root / "dir/one", b"1")
    (root / "empty").mkdir()
    write_file(root / "big", bytes(range(256)) * 300)
    os.symlink("file", root / "link")
    os.symlink("dir", root / "dirlink")
    os.symlink("missing", root / "dangling")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")

    write_file(root / "xattrs", b"x")
    os.setxattr(root / "xattrs", "user.colour", b"blue")
    os.setxattr(root / "xattrs", "user.empty", b"")

    write_file(root / "owned", b"owned\n")
    os.chown(root / "owned", USER, USER)
    write_file(root / "foreign", b"foreign\n", 0o640)
    os.chown(root / "foreign", OTHER, OTHER + 1)
    write_file(root / "setuid", b"#!/bin/sh\n", 0o4755)
    write_file(root / "noperm", b"secret\n", 0o000)
    (root / "setgid").mkdir()
    os.chown(root / "setgid", 0, USER)
    (root / "setgid").chmod(0o2775)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    write_file(root / "sticky/theirs", b"theirs\n")
    os.chown(root / "sticky/theirs", USER, USER)
    write_file(root / os.fsdecode(ODD_NAME), b"odd\n")

    os.mkfifo(root / "fifo", 0o644)
    os.mknod(root / "socket", stat.S_IFSOCK | 0o644)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "kmsg", stat.S_IFCHR | 0o600, os.makedev(1, 11))
    # mkfifo and mknod apply the umask, which the tests must not depend on.
    for name, mode in (("fifo", 0o644), ("socket", 0o644), ("null", 0o666)):
        (root / name).chmod(mode)
    (root / "kmsg").chmod(0o600)


class Node(NamedTuple):
    """The attributes of one file that the tree comparison checks.

    Times and inode numbers are left out, because they differ between any
    two trees.
    """

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int | None
    rdev: int
    content: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]


class Tree(NamedTuple):
    """Every file of an export by relative path, and the hard-link groups."""

    nodes: dict[bytes, Node]
    hard_links: frozenset[frozenset[bytes]]


def describe_node(path: bytes) -> Node:
    st = os.lstat(path)
    content = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as file:
            content = file.read()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    names = sorted(os.listxattr(path, follow_symlinks=False))
    xattrs = tuple(
        (name, os.getxattr(path, name, follow_symlinks=False)) for name in names
    )
    is_device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    return Node(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        # A directory's size is its allocated blocks, which the filesystem picks.
        size=None if stat.S_ISDIR(st.st_mode) else st.st_size,
        rdev=st.st_rdev if is_device else 0,
        content=content,
        xattrs=xattrs,
    )


def snapshot(root: Path) -> Tree:
    """Return the tree under `root`, without following symlinks."""
    base = os.fsencode(root)
    nodes = {b".": describe_node(base)}
    inodes: dict[int, set[bytes]] = {}
    for directory, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, base)
            nodes[relative] = describe_node(path)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(relative)
    links = frozenset(frozenset(group) for group in inodes.values())
    return Tree(nodes, links)


def has_generation_numbers(path: Path) -> bool:
    """Return whether the helpers serve GETVERSION at `path` by ioctl.

    Both read FS_IOC_GETVERSION only on the filesystems in
    GETVERSION_FILESYSTEMS, and reply 0 elsewhere without opening the file.
    """
    return libc.statfs(os.fsencode(path)).f_type in GETVERSION_FILESYSTEMS


def dmesg_restricted() -> bool:
    return Path("/proc/sys/kernel/dmesg_restrict").read_text().strip() == "1"


# Running the two helpers.


class HelperPair(NamedTuple):
    c: HelperProcess
    ours: HelperProcess
    c_root: Path
    our_root: Path


@contextmanager
def serve_pair(
    parent: Path, c_command: list[str], our_command: list[str]
) -> Iterator[HelperPair]:
    """Populate two exports under `parent` and serve one with each helper."""
    c_root = parent / "c"
    our_root = parent / "ours"
    for root in (c_root, our_root):
        root.mkdir()
        populate(root)
    with ExitStack() as stack:
        c = stack.enter_context(running_helper(c_command, c_root))
        ours = stack.enter_context(running_helper(our_command, our_root))
        for helper in (c, ours):
            helper.client.sock.settimeout(REPLY_TIMEOUT)
            # running_helper leaves the socket open when the helper has exited.
            stack.callback(helper.client.sock.close)
        yield HelperPair(c, ours, c_root, our_root)


@pytest.fixture
def pair(
    tmp_path: Path, c_helper_command: list[str], helper_command: list[str]
) -> Iterator[HelperPair]:
    with serve_pair(tmp_path, c_helper_command, helper_command) as helpers:
        yield helpers


class Frame(NamedTuple):
    """A whole frame, header included, for requests the codec cannot build."""

    kind: int
    data: bytes


def raw_frame(kind: int, payload: bytes) -> Frame:
    return Frame(kind, protocol.HEADER.pack(kind, len(payload)) + payload)


def frame_with_payload(request: Request, cut: int = 0, extra: bytes = b"") -> Frame:
    """Encode `request`, drop `cut` bytes from its payload's end, append `extra`."""
    data = protocol.encode_request(request)
    kind, size = protocol.HEADER.unpack_from(data)
    payload = data[protocol.HEADER_SIZE : protocol.HEADER_SIZE + size - cut] + extra
    return raw_frame(kind, payload)


def kind_of(request: Request | Frame) -> int:
    if isinstance(request, Frame):
        return request.kind
    return protocol.TYPE_OF[type(request)]


def send(helper: HelperProcess, request: Request | Frame) -> None:
    if isinstance(request, Frame):
        helper.client.send_raw(request.data)
    else:
        helper.client.send_raw(protocol.encode_request(request))


def receive(helper: HelperProcess, kind: int) -> Reply:
    if kind in protocol.FD_REPLY_TYPES:
        return helper.client.read_fd_reply()
    return helper.client.read_frame_reply()


def exchange(helper: HelperProcess, request: Request | Frame) -> Reply:
    send(helper, request)
    return receive(helper, kind_of(request))


def close_fds(*replies: Reply) -> None:
    for reply in replies:
        if reply.fd is not None:
            os.close(reply.fd)


# Normalising replies.


class FdSummary(NamedTuple):
    """A received descriptor, described without its number."""

    file_type: int
    permissions: int
    size: int | None
    access_mode: int
    status_flags: int
    content: bytes | tuple[bytes, ...] | None


def summarise_fd(fd: int) -> FdSummary:
    """Describe `fd` by what it refers to and how it is open, then close it."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        # Reopening through /proc reads an O_PATH or write-only descriptor too.
        link = b"/proc/self/fd/%d" % fd
        content: bytes | tuple[bytes, ...] | None = None
        if stat.S_ISREG(st.st_mode):
            with open(link, "rb") as file:
                content = file.read()
        elif stat.S_ISDIR(st.st_mode):
            content = tuple(sorted(os.listdir(link)))
    finally:
        os.close(fd)
    return FdSummary(
        file_type=stat.S_IFMT(st.st_mode),
        permissions=stat.S_IMODE(st.st_mode),
        size=None if stat.S_ISDIR(st.st_mode) else st.st_size,
        access_mode=flags & os.O_ACCMODE,
        # O_NOFOLLOW only steers the lookup. Ours applies it while probing the
        # path, so the descriptor it passes on does not show it in F_GETFL.
        status_flags=flags & ~(os.O_ACCMODE | os.O_NOFOLLOW),
        content=content,
    )


def normalise_time(seconds: int, nanoseconds: int) -> tuple[int, int] | str:
    value = protocol.to_signed64(seconds)
    if 0 <= value < EXPLICIT_TIME_LIMIT:
        return (value, nanoseconds)
    return "from the clock"


def normalise_stat(payload: bytes) -> dict[str, object]:
    st = parse_stat(payload)
    fields: dict[str, object] = st._asdict()
    # st_blocks depends on how the filesystem allocated the data.
    for name in ("st_dev", "st_ino", "st_blocks"):
        del fields[name]
    for prefix in ("st_atime", "st_mtime", "st_ctime"):
        seconds = fields.pop(f"{prefix}_sec")
        nanoseconds = fields.pop(f"{prefix}_nsec")
        assert isinstance(seconds, int) and isinstance(nanoseconds, int)
        fields[prefix] = normalise_time(seconds, nanoseconds)
    return fields


def normalise_statfs(payload: bytes) -> dict[str, object]:
    fields: dict[str, object] = parse_statfs(payload)._asdict()
    # Other processes change the free counts of the shared filesystem.
    for name in ("f_bfree", "f_bavail", "f_ffree"):
        del fields[name]
    return fields


def normalise(kind: int, reply: Reply) -> object:
    """Return the part of `reply` that must match between the helpers.

    A received descriptor is summarised and closed.
    """
    if reply.fd is not None:
        return summarise_fd(reply.fd)
    if reply.status != 0 or kind in protocol.FD_REPLY_TYPES:
        return reply.status
    if kind == protocol.T_LSTAT:
        return normalise_stat(reply.payload)
    if kind == protocol.T_STATFS:
        return normalise_statfs(reply.payload)
    if kind == protocol.T_GETVERSION:
        return len(reply.payload)
    return reply.payload


def compare(pair: HelperPair, request: Request | Frame) -> None:
    """Send `request` to both helpers and assert that the replies match."""
    kind = kind_of(request)
    c_reply = exchange(pair.c, request)
    our_reply = exchange(pair.ours, request)
    if kind == protocol.T_GETVERSION and our_reply.status == 0:
        # Only ours is checked, because C's upper 32 bits are stack garbage.
        assert_upper_bits_zero(our_reply)
    c_result = normalise(kind, c_reply)
    our_result = normalise(kind, our_reply)
    assert our_result == c_result, f"{request!r}"


def assert_upper_bits_zero(reply: Reply) -> None:
    """Assert what getversion-upper-bits states of our GETVERSION reply."""
    entry = difference("getversion-upper-bits")
    assert reply.status == entry.our_status
    assert parse_u64(reply.payload) >> 32 == 0


def expect_difference(
    pair: HelperPair,
    request: Request | Frame,
    entry: Difference,
    c_status: int | None = None,
) -> None:
    """Send `request` to both and assert the statuses that `entry` states.

    `c_status` replaces the entry's value for C where the entry's text states
    that C's reply depends on the case.
    """
    c_reply = exchange(pair.c, request)
    our_reply = exchange(pair.ours, request)
    close_fds(c_reply, our_reply)
    expected_c = entry.c_status if c_status is None else c_status
    assert our_reply.status == entry.our_status, f"{request!r}"
    assert c_reply.status == expected_c, f"{request!r}"


def compare_trees(pair: HelperPair) -> None:
    c_tree = snapshot(pair.c_root)
    our_tree = snapshot(pair.our_root)
    assert our_tree.nodes == c_tree.nodes
    assert our_tree.hard_links == c_tree.hard_links


# The main sequence: every request type, success and error paths.


def reading_requests() -> list[Request | Frame]:
    odd = b"//" + ODD_NAME
    return [
        Lstat(b"//file"),
        Lstat(b"//"),
        Lstat(b"//dir/nested/deeper/leaf"),
        Lstat(b"//link"),
        Lstat(b"//dangling"),
        Lstat(b"//loop1"),
        Lstat(b"//fifo"),
        Lstat(b"//socket"),
        Lstat(b"//null"),
        Lstat(b"//setuid"),
        Lstat(b"//setgid"),
        Lstat(b"//sticky"),
        Lstat(b"//noperm"),
        Lstat(odd),
        Lstat(b"//dir/../file"),
        Lstat(b"//../../file"),
        Lstat(b"//missing"),
        Lstat(b"//file/x"),
        Lstat(b"//file/"),
        Lstat(b""),
        Lstat(b"//" + b"a" * 300),
        Statfs(b"//"),
        Statfs(b"//file"),
        Statfs(b"//missing"),
        Statfs(b"//loop1"),
        Readlink(b"//link", 4096),
        Readlink(b"//link", 3),
        Readlink(b"//link", 2),
        Readlink(b"//link", 1),
        Readlink(b"//link", 0),
        Readlink(b"//dangling", 100),
        Readlink(b"//dir", 100),
        Readlink(b"//missing", 100),
        Readlink(b"//loop1", 100),
        Open(b"//file", O_RDONLY),
        Open(b"//file", O_WRONLY | os.O_APPEND),
        Open(b"//big", O_RDONLY),
        Open(b"//dir", O_RDONLY | os.O_DIRECTORY),
        Open(b"//dir", O_RDWR),
        Open(b"//file", O_RDONLY | os.O_DIRECTORY),
        Open(b"//link", O_RDONLY),
        Open(b"//dirlink", O_RDONLY | os.O_DIRECTORY),
        Open(b"//dangling", O_RDONLY),
        Open(b"//loop1", O_RDONLY),
        Open(b"//missing", O_RDONLY),
        Open(b"//dir/missing/x", O_RDONLY),
        Open(b"//file/", O_RDONLY),
        Open(b"//noperm", O_RDWR),
        Open(odd, O_RDONLY),
        Open(b"//file", O_RDONLY | os.O_NONBLOCK | os.O_NOATIME),
        Open(b"//dir", os.O_PATH),
        # These replies match because C opens a FIFO without blocking when
        # O_RDWR or O_NONBLOCK is set, and then rejects it as ours does.
        Open(b"//fifo", O_RDWR),
        Open(b"//fifo", O_RDONLY | os.O_NONBLOCK),
        Open(b"//fifo", os.O_PATH),
        Open(b"//socket", O_RDONLY),
        Open(b"//null", O_RDWR),
        Getversion(b"//file"),
        Getversion(b"//dir"),
        Getversion(b"//link"),
        Getversion(b"//socket"),
        Getversion(b"//missing"),
        Getversion(b"//loop1"),
        Lgetxattr(0, b"//xattrs", b"user.colour"),
        Lgetxattr(100, b"//xattrs", b"user.colour"),
        Lgetxattr(4, b"//xattrs", b"user.colour"),
        Lgetxattr(3, b"//xattrs", b"user.colour"),
        Lgetxattr(100_000, b"//xattrs", b"user.colour"),
        Lgetxattr(0, b"//xattrs", b"user.empty"),
        Lgetxattr(1, b"//xattrs", b"user.empty"),
        Lgetxattr(100, b"//xattrs", b"user.missing"),
        Lgetxattr(100, b"//xattrs", b"bogus.name"),
        Lgetxattr(100, b"//link", b"user.colour"),
        Lgetxattr(100, b"//missing", b"user.colour"),
        Llistxattr(0, b"//xattrs"),
        Llistxattr(100, b"//xattrs"),
        Llistxattr(3, b"//xattrs"),
        Llistxattr(100, b"//file"),
        Llistxattr(100, b"//link"),
        Llistxattr(100, b"//missing"),
    ]


def creating_requests(uid: int, gid: int) -> list[Request | Frame]:
    """Return the requests that create files as uid and gid."""
    tag = b"%d-%d" % (protocol.to_signed32(uid), protocol.to_signed32(gid))
    return [
        Create(b"//created-" + tag, O_CREAT | O_RDWR, 0o640, uid, gid),
        Create(b"//setgid/created-" + tag, O_CREAT | O_WRONLY, 0o2755, uid, gid),
        Create(b"//sticky/created-" + tag, O_CREAT | O_EXCL | O_RDWR, 0o600, uid, gid),
        Create(b"//created-" + tag, O_CREAT | O_EXCL | O_RDWR, 0o640, uid, gid),
        Mkdir(uid, gid, b"//dir-" + tag, 0o750),
        Mkdir(uid, gid, b"//setgid/dir-" + tag, 0o755),
        Mkdir(uid, gid, b"//dir-" + tag, 0o750),
        Mknod(uid, gid, b"//fifo-" + tag, stat.S_IFIFO | 0o640, 0),
        Mknod(uid, gid, b"//setgid/fifo-" + tag, stat.S_IFIFO | 0o664, 0),
        Symlink(uid, gid, b"file", b"//link-" + tag),
        Symlink(uid, gid, b"missing", b"//setgid/link-" + tag),
        Symlink(uid, gid, b"file", b"//link-" + tag),
    ]


def max_size_lsetxattr() -> Request:
    """Return an LSETXATTR whose frame payload is exactly the maximum size."""
    base = Lsetxattr(b"//file", b"user.huge", b"", 0, 0)
    overhead = len(protocol.encode_request(base)) - protocol.HEADER_SIZE
    value = b"v" * (protocol.MAX_PAYLOAD - overhead)
    return Lsetxattr(b"//file", b"user.huge", value, len(value), 0)


def writing_requests() -> list[Request | Frame]:
    odd = b"//" + ODD_NAME
    create_errors: list[Request | Frame] = [
        Create(b"//file", O_CREAT | O_EXCL | O_RDWR, 0o644, 0, 0),
        Create(b"//big", O_CREAT | O_RDWR | os.O_TRUNC, 0o600, 0, 0),
        Create(b"//link", O_CREAT | O_RDWR, 0o600, 0, 0),
        Create(b"//dangling", O_CREAT | O_EXCL | O_RDWR, 0o600, 0, 0),
        Create(b"//file", O_RDONLY, 0o644, 0, 0),
        Create(b"//dir", O_RDONLY, 0o644, 0, 0),
        Create(b"//missing", O_RDWR, 0o644, 0, 0),
        Create(b"//dir/missing/x", O_CREAT | O_RDWR, 0o644, 0, 0),
        Create(b"//file/x", O_CREAT | O_RDWR, 0o644, 0, 0),
        Create(b"//new-directory", O_CREAT | os.O_DIRECTORY, 0o755, 0, 0),
        Create(
            b"//high-mode", O_CREAT | O_RDWR, stat.S_IFREG | (1 << 20) | 0o644, 0, 0
        ),
        Create(b"//fifo", O_CREAT | O_RDWR, 0o644, 0, 0),
        Create(b"//fifo", O_RDONLY | os.O_NONBLOCK, 0o644, 0, 0),
        Mkdir(0, 0, b"//file", 0o755),
        Mkdir(0, 0, b"//dangling", 0o755),
        Mkdir(0, 0, b"//missing/x", 0o755),
        Mkdir(0, 0, b"//file/x", 0o755),
        Mkdir(0, 0, b"//all-bits", 0o7777),
        Mkdir(0, 0, b"//" + b"d" * 300, 0o755),
        Mknod(0, 0, b"//new-null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        Mknod(USER, USER, b"//user-null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        Mknod(0, 0, b"//new-socket", stat.S_IFSOCK | 0o644, 0),
        Mknod(0, 0, b"//new-regular", stat.S_IFREG | 0o644, 0),
        Mknod(0, 0, b"//no-type", 0o644, 0),
        Mknod(0, 0, b"//directory-node", stat.S_IFDIR | 0o755, 0),
        Mknod(0, 0, b"//bad-type", 0o170644, 0),
        Mknod(0, 0, b"//wide-device", stat.S_IFCHR | 0o644, 1 << 40),
        Mknod(0, 0, b"//fifo", stat.S_IFIFO | 0o644, 0),
        Symlink(0, 0, b"", b"//empty-target"),
        Symlink(0, 0, b"x" * 5000, b"//long-target"),
        Symlink(0, 0, b"t", b"//missing/x"),
        Symlink(0, 0, b"../../../etc/passwd", b"//escape"),
    ]
    links: list[Request | Frame] = [
        Link(b"//file", b"//new-hardlink"),
        Link(b"//link", b"//symlink-hardlink"),
        Link(b"//dangling", b"//dangling-hardlink"),
        Link(b"//dir", b"//dir-hardlink"),
        Link(b"//missing", b"//x"),
        Link(b"//file", b"//hardlink"),
        Link(b"//file", b"//missing/x"),
    ]
    attributes: list[Request | Frame] = [
        Chmod(b"//owned", 0o4755),
        Chmod(b"//empty", 0o2775),
        Chmod(b"//foreign", 0o1777),
        Chmod(b"//hardlink", stat.S_IFREG | 0o600),
        Chmod(b"//dirlink", 0o700),
        Chmod(b"//missing", 0o644),
        Chmod(b"//dangling", 0o644),
        Chmod(b"//loop1", 0o644),
        Chown(b"//owned", 0, 0),
        Chown(b"//setuid", USER, USER),
        Chown(b"//link", USER, USER),
        Chown(b"//dangling", OTHER, OTHER),
        Chown(b"//foreign", NO_ID, USER),
        Chown(b"//sticky/theirs", OTHER, NO_ID),
        Chown(b"//noperm", NO_ID, NO_ID),
        Chown(b"//missing", USER, USER),
        Truncate(b"//big", 1000),
        Truncate(b"//owned", 100_000),
        Truncate(b"//link", 5),
        Truncate(b"//dir", 1),
        Truncate(b"//file", -1),
        Truncate(b"//file", 1 << 62),
        Truncate(b"//fifo", 1),
        Truncate(b"//missing", 1),
        Truncate(b"//loop1", 1),
        Utime(b"//hardlink", 1_000_000, 5, 2_000_000, 6),
        Utime(b"//link", 123, 0, 456, 0),
        Utime(b"//dangling", 7, 0, 8, 0),
        Utime(b"//dir", 0, UTIME_OMIT, 9, 0),
        Utime(b"//dir/one", 10, 0, 0, UTIME_NOW),
        Utime(b"//file", 0, 1 << 30, 0, 0),
        Utime(b"//file", 0, -1, 0, 0),
        Utime(b"//missing", 1, 0, 1, 0),
        Lstat(b"//file"),
        Lstat(b"//hardlink"),
        Lstat(b"//link"),
        Lstat(b"//dangling"),
        Lstat(b"//dir"),
        Lstat(b"//dir/one"),
        Lstat(b"//setuid"),
    ]
    xattrs: list[Request | Frame] = [
        Lsetxattr(b"//file", b"user.new", b"value", 5, 0),
        Lsetxattr(b"//file", b"user.new", b"v2", 2, os.XATTR_CREATE),
        Lsetxattr(b"//file", b"user.other", b"x", 1, os.XATTR_REPLACE),
        Lsetxattr(b"//file", b"user.new", b"binary\0value", 12, os.XATTR_REPLACE),
        Lsetxattr(b"//file", b"user.empty", b"", 0, 0),
        Lsetxattr(b"//file", b"user.flags", b"x", 1, 4),
        Lsetxattr(b"//link", b"user.new", b"x", 1, 0),
        Lsetxattr(b"//missing", b"user.new", b"x", 1, 0),
        Lsetxattr(b"//file", b"bogus.new", b"x", 1, 0),
        Lsetxattr(b"//file", b"user.", b"x", 1, 0),
        Lsetxattr(b"//file", b"trusted.new", b"x", 1, 0),
        Lsetxattr(b"//file", b"user." + b"n" * 300, b"x", 1, 0),
        max_size_lsetxattr(),
        Lgetxattr(100, b"//file", b"user.new"),
        Llistxattr(100, b"//file"),
        Lremovexattr(b"//xattrs", b"user.colour"),
        Lremovexattr(b"//xattrs", b"user.colour"),
        Lremovexattr(b"//xattrs", b"bogus.name"),
        Lremovexattr(b"//missing", b"user.colour"),
        Lremovexattr(b"//link", b"user.colour"),
        Llistxattr(100, b"//xattrs"),
    ]
    renames: list[Request | Frame] = [
        Rename(b"//new-hardlink", b"//dir/renamed"),
        Rename(odd, b"//dir/" + ODD_NAME),
        Rename(b"//sticky/theirs", b"//moved"),
        Rename(b"//dir", b"//dir/nested/inside"),
        Rename(b"//file", b"//dir"),
        Rename(b"//dir", b"//file"),
        Rename(b"//empty", b"//dir"),
        Rename(b"//missing", b"//x"),
        Rename(b"//file", b"//missing/x"),
        Rename(b"//all-bits", b"//empty"),
        Rename(b"//link", b"//link-renamed"),
        Remove(b"//dir"),
        Remove(b"//dir/one"),
        Remove(b"//dir/renamed"),
        Remove(b"//empty"),
        Remove(b"//fifo"),
        Remove(b"//link-renamed"),
        Remove(b"//dangling"),
        Remove(b"//missing"),
        Remove(b"//file/x"),
        Remove(b"//dir/."),
        Remove(b"//"),
        Lstat(b"//dir/" + ODD_NAME),
        Lstat(b"//moved"),
    ]
    return create_errors + links + attributes + xattrs + renames


def main_sequence() -> list[Request | Frame]:
    requests = reading_requests()
    for uid, gid in [(0, 0), (USER, USER), (USER, 0)]:
        requests += creating_requests(uid, gid)
    requests += writing_requests()
    # Last, because a request with ids -1/-1 leaves the C helper without
    # most capabilities (see capabilities-after-create). The cases whose
    # outcome depends on those capabilities are in test_unchanged_ids_*.
    requests += [
        Create(b"//created-unchanged", O_CREAT | O_RDWR, 0o640, NO_ID, NO_ID),
        Mkdir(NO_ID, NO_ID, b"//dir-unchanged", 0o750),
        Mkdir(NO_ID, NO_ID, b"//setgid/dir-unchanged", 0o755),
        Mknod(NO_ID, NO_ID, b"//fifo-unchanged", stat.S_IFIFO | 0o640, 0),
        Symlink(NO_ID, NO_ID, b"file", b"//link-unchanged"),
    ]
    return requests


def test_main_sequence_matches_c(pair: HelperPair) -> None:
    for request in main_sequence():
        compare(pair, request)
    compare_trees(pair)


@pytest.mark.parametrize("sandbox", ["chroot", "none"])
def test_main_sequence_other_sandboxes(
    tmp_path: Path, c_helper_command: list[str], helper_command: list[str], sandbox: str
) -> None:
    ours = helper_command + ["--sandbox", sandbox]
    with serve_pair(tmp_path, c_helper_command, ours) as other_pair:
        for request in main_sequence():
            compare(other_pair, request)
        compare_trees(other_pair)


def test_sequence_covers_every_type() -> None:
    kinds = {kind_of(request) for request in main_sequence()}
    assert kinds == set(protocol.LAYOUTS)


# A uid of 0 with another gid leaves the C helper unable to serve a later
# create-type request with other ids, so each case gets its own pair.
ROOT_USER_GROUP_REQUESTS = [
    Create(b"//setgid/by-group", O_CREAT | O_RDWR, 0o2755, 0, USER),
    Mkdir(0, USER, b"//by-group", 0o2755),
    Mknod(0, USER, b"//by-group", stat.S_IFIFO | 0o640, 0),
    Symlink(0, USER, b"file", b"//by-group"),
]


@pytest.mark.parametrize(
    "proxy_request",
    ROOT_USER_GROUP_REQUESTS,
    ids=lambda request: type(request).__name__.lower(),
)
def test_root_uid_user_gid(pair: HelperPair, proxy_request: Request) -> None:
    compare(pair, proxy_request)
    compare_trees(pair)


FLAG_CASES = [
    pytest.param(
        Open(b"//file", O_RDONLY | os.O_NOFOLLOW),
        id="open-nofollow-file",
    ),
    pytest.param(
        Open(b"//dir", O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW),
        id="open-nofollow-dir",
    ),
    pytest.param(
        Create(b"//file", O_RDWR | os.O_NOFOLLOW, 0o644, 0, 0),
        id="create-nofollow-file",
    ),
    pytest.param(
        Open(b"//link", O_RDONLY | os.O_NOFOLLOW),
        id="open-nofollow-symlink",
    ),
    pytest.param(
        Open(b"//loop1", O_RDONLY | os.O_NOFOLLOW),
        id="open-nofollow-loop",
    ),
    pytest.param(
        Create(b"//link", O_CREAT | O_RDWR | os.O_NOFOLLOW, 0o644, 0, 0),
        id="create-nofollow-symlink",
    ),
    pytest.param(
        Open(b"//file", os.O_PATH | os.O_NOFOLLOW),
        id="open-path-nofollow-file",
    ),
    pytest.param(
        Create(b"//dir", O_CREAT | O_RDONLY, 0o644, 0, 0),
        id="create-existing-dir",
    ),
    pytest.param(
        Create(b"//dangling", O_CREAT | O_RDWR, 0o640, 0, 0),
        id="create-through-dangling-symlink",
    ),
    pytest.param(
        Create(b"//dir", os.O_TMPFILE | O_RDWR, 0o640, 0, 0),
        id="create-tmpfile-mode",
    ),
    pytest.param(
        Open(b"//dirlink", O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW),
        id="open-nofollow-dirlink",
    ),
    pytest.param(
        Create(b"//fifo", O_CREAT | O_RDONLY | os.O_NONBLOCK, 0o644, 0, 0),
        id="create-fifo-nonblock",
    ),
    pytest.param(Open(b"//link", os.O_PATH | os.O_NOFOLLOW), id="open-path-symlink"),
]


@pytest.mark.parametrize("proxy_request", FLAG_CASES)
def test_open_flags_match_c(pair: HelperPair, proxy_request: Request) -> None:
    compare(pair, proxy_request)
    compare_trees(pair)


# Intended differences: each test asserts what differences.py states.


def truncated_frames() -> list[Frame]:
    """Return frames whose payload ends before their last field does."""
    requests: list[Request] = [
        Open(b"//file", O_RDONLY),
        Create(b"//new", O_CREAT | O_RDWR, 0o644, 0, 0),
        Mknod(0, 0, b"//new", stat.S_IFIFO | 0o644, 0),
        Mkdir(0, 0, b"//new", 0o755),
        Symlink(0, 0, b"file", b"//new"),
        Link(b"//file", b"//new"),
        Lstat(b"//file"),
        Readlink(b"//link", 100),
        Statfs(b"//"),
        Chmod(b"//file", 0o600),
        Chown(b"//file", USER, USER),
        Truncate(b"//file", 1),
        Utime(b"//file", 1, 0, 1, 0),
        Rename(b"//file", b"//new"),
        Remove(b"//file"),
        Lgetxattr(100, b"//xattrs", b"user.colour"),
        Llistxattr(100, b"//xattrs"),
        Lsetxattr(b"//file", b"user.new", b"value", 5, 0),
        Lremovexattr(b"//xattrs", b"user.colour"),
        Getversion(b"//file"),
    ]
    frames = [frame_with_payload(request, cut=1) for request in requests]
    frames += [
        raw_frame(protocol.T_LSTAT, b""),
        raw_frame(protocol.T_LSTAT, b"\xff\xff//file"),
        raw_frame(protocol.T_OPEN, b""),
        raw_frame(protocol.T_REMOVE, b"\x05"),
    ]
    return frames


def test_malformed_frames_change_nothing(pair: HelperPair) -> None:
    before = snapshot(pair.c_root)
    for frame in truncated_frames():
        entry = difference("malformed-frame-errno")
        if frame.kind == protocol.T_GETVERSION and not has_generation_numbers(
            pair.c_root
        ):
            entry = difference("getversion-payload-unread")
        expect_difference(pair, frame, entry)
    compare(pair, Lstat(b"//file"))
    assert snapshot(pair.c_root) == before
    assert snapshot(pair.our_root) == before


def test_malformed_getversion_on_tmpfs(
    c_helper_command: list[str], helper_command: list[str]
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or has_generation_numbers(shm):
        pytest.skip("needs /dev/shm on a filesystem without generation numbers")
    parent = Path(tempfile.mkdtemp(prefix="differential-", dir=shm))
    try:
        with serve_pair(parent, c_helper_command, helper_command) as tmpfs_pair:
            frame = frame_with_payload(Getversion(b"//file"), cut=1)
            entry = difference("getversion-payload-unread")
            expect_difference(tmpfs_pair, frame, entry)
            compare(tmpfs_pair, Getversion(b"//missing"))
    finally:
        shutil.rmtree(parent)


def test_trailing_bytes_rejected(pair: HelperPair) -> None:
    entry = difference("trailing-bytes")
    expect_difference(pair, frame_with_payload(Lstat(b"//file"), extra=b"xx"), entry)
    mkdir = frame_with_payload(Mkdir(0, 0, b"//trailing", 0o755), extra=b"\0\0")
    expect_difference(pair, mkdir, entry)
    assert (pair.c_root / "trailing").is_dir()
    assert not (pair.our_root / "trailing").exists()


def test_max_size_frame_with_padding(pair: HelperPair) -> None:
    padding = bytes(protocol.MAX_PAYLOAD - len(b"\x06\x00//file"))
    frame = frame_with_payload(Lstat(b"//file"), extra=padding)
    assert len(frame.data) == protocol.HEADER_SIZE + protocol.MAX_PAYLOAD
    expect_difference(pair, frame, difference("trailing-bytes"))
    compare(pair, Lstat(b"//file"))


NUL_CASES = [
    pytest.param(Lstat(b"//file\0suffix"), None, id="lstat"),
    pytest.param(Mkdir(0, 0, b"//nul\0suffix", 0o755), b"nul", id="mkdir"),
    pytest.param(Rename(b"//file\0suffix", b"//renamed"), b"renamed", id="rename"),
]


@pytest.mark.parametrize(("proxy_request", "c_creates"), NUL_CASES)
def test_nul_in_path_rejected(
    pair: HelperPair, proxy_request: Request, c_creates: bytes | None
) -> None:
    expect_difference(pair, proxy_request, difference("nul-in-path"))
    if c_creates is not None:
        c_path = os.path.join(os.fsencode(pair.c_root), c_creates)
        our_path = os.path.join(os.fsencode(pair.our_root), c_creates)
        assert os.path.lexists(c_path)
        assert not os.path.lexists(our_path)


def test_nul_symlink_target_rejected(pair: HelperPair) -> None:
    expect_difference(
        pair, Symlink(0, 0, b"file\0suffix", b"//nul-link"), difference("nul-in-path")
    )
    assert os.readlink(pair.c_root / "nul-link") == "file"


def test_nul_xattr_name_rejected(pair: HelperPair) -> None:
    request = Lsetxattr(b"//file", b"user.nul\0suffix", b"x", 1, 0)
    expect_difference(pair, request, difference("nul-in-path"))
    assert os.listxattr(pair.c_root / "file") == ["user.nul"]
    assert os.listxattr(pair.our_root / "file") == []


def test_getversion_upper_bits_zero(pair: HelperPair) -> None:
    if not has_generation_numbers(pair.our_root):
        pytest.skip("the export has no inode generation numbers")
    assert_upper_bits_zero(exchange(pair.ours, Getversion(b"//file")))


NEGATIVE_SIZE_CASES = (
    [
        pytest.param(
            Readlink(b"//link", size),
            difference("readlink-negative-size"),
            id=f"readlink{size}",
        )
        for size in (-1, -(1 << 31))
    ]
    + [
        pytest.param(
            Lgetxattr(size, b"//xattrs", b"user.colour"),
            difference("lgetxattr-negative-size"),
            id=f"lgetxattr{size}",
        )
        for size in (-1, -(1 << 31))
    ]
    + [
        pytest.param(
            Llistxattr(size, b"//xattrs"),
            difference("llistxattr-negative-size"),
            id=f"llistxattr{size}",
        )
        for size in (-1, -(1 << 31))
    ]
)


@pytest.mark.parametrize(("proxy_request", "entry"), NEGATIVE_SIZE_CASES)
def test_negative_size_rejected(
    pair: HelperPair, proxy_request: Request, entry: Difference
) -> None:
    # Sent to ours only, because the C helper dies of it.
    reply = exchange(pair.ours, proxy_request)
    assert reply.status == entry.our_status
    assert exchange(pair.ours, Lstat(b"//file")).status == 0


# (value, size field, C's status, value C stores or None)
LSETXATTR_MISMATCHES = [
    (b"abcdef", 3, 0, b"abc"),
    (b"abc", 4, 0, b"abc\0"),
    (b"abc", -1, -errno.E2BIG, None),
    (b"abc", 0, 0, b""),
]


@pytest.mark.parametrize(
    ("value", "size", "c_status", "c_stored"), LSETXATTR_MISMATCHES
)
def test_lsetxattr_size_mismatch_rejected(
    pair: HelperPair, value: bytes, size: int, c_status: int, c_stored: bytes | None
) -> None:
    request = Lsetxattr(b"//file", b"user.sized", value, size, 0)
    entry = difference("lsetxattr-size-mismatch")
    expect_difference(pair, request, entry, c_status=c_status)
    assert os.listxattr(pair.our_root / "file") == []
    if c_stored is None:
        assert os.listxattr(pair.c_root / "file") == []
    else:
        assert os.getxattr(pair.c_root / "file", "user.sized") == c_stored


@pytest.mark.parametrize("kind", [0, 1, 22, 99, 0xFFFFFFFF])
def test_unknown_type_keeps_serving(pair: HelperPair, kind: int) -> None:
    entry = difference("unknown-request-type")
    frame = raw_frame(kind, b"\0\0\0\0")
    assert exchange(pair.ours, frame).status == entry.our_status
    assert exchange(pair.ours, Lstat(b"//file")).status == 0
    send(pair.c, frame)
    assert pair.c.client.sock.recv(1) == b""
    assert pair.c.process.wait(timeout=REPLY_TIMEOUT) == 0


def test_oversize_frame_closes_both(pair: HelperPair) -> None:
    # Not a difference: both end the connection without a reply.
    header = protocol.HEADER.pack(protocol.T_LSTAT, protocol.MAX_PAYLOAD + 1)
    for helper in (pair.c, pair.ours):
        helper.client.send_raw(header)
        assert helper.client.sock.recv(1) == b""


def test_open_creat_rejected(pair: HelperPair) -> None:
    request = Open(b"//opened-new", O_CREAT | O_RDWR)
    expect_difference(pair, request, difference("open-creat-missing"))
    assert (pair.c_root / "opened-new").is_file()
    assert not (pair.our_root / "opened-new").exists()


def test_open_excl_existing_rejected(pair: HelperPair) -> None:
    request = Open(b"//file", O_CREAT | O_EXCL | O_RDONLY)
    expect_difference(pair, request, difference("open-excl-existing"))
    compare_trees(pair)


def test_unchanged_ids_create_device(pair: HelperPair) -> None:
    request = Mknod(
        NO_ID, NO_ID, b"//made-null", stat.S_IFCHR | 0o666, os.makedev(1, 3)
    )
    expect_difference(pair, request, difference("unchanged-ids-keep-capabilities"))
    assert stat.S_ISCHR(os.lstat(pair.our_root / "made-null").st_mode)
    assert not (pair.c_root / "made-null").exists()


def test_unchanged_ids_keep_setgid_bit(pair: HelperPair) -> None:
    entry = difference("unchanged-ids-keep-capabilities")
    request = Create(b"//setgid/made", O_CREAT | O_RDWR, 0o2755, NO_ID, NO_ID)
    c_reply = exchange(pair.c, request)
    our_reply = exchange(pair.ours, request)
    c_mode = None if c_reply.fd is None else summarise_fd(c_reply.fd).permissions
    our_mode = None if our_reply.fd is None else summarise_fd(our_reply.fd).permissions
    assert our_reply.status == entry.our_status
    assert our_mode == 0o2755
    assert c_mode == 0o755


def effective_capabilities(helper: HelperProcess) -> int:
    return int(helper.status()["CapEff"], 16)


def test_capabilities_restored_after_create(pair: HelperPair) -> None:
    entry = difference("capabilities-after-create")
    compare(pair, Mkdir(0, USER, b"//by-group", 0o755))
    assert effective_capabilities(pair.ours) == KEPT_MASK
    assert effective_capabilities(pair.c) == 1 << CAP_DAC_OVERRIDE
    expect_difference(pair, Chown(b"//file", OTHER, OTHER), entry)
    # Sent to ours only: the C helper aborts on it (see the entry).
    reply = exchange(pair.ours, Mkdir(USER, USER, b"//after", 0o755))
    assert reply.status == 0


# (request, flags that open the FIFO's other end, entry)
FIFO_CASES = [
    pytest.param(
        Open(b"//fifo", O_RDONLY),
        O_WRONLY,
        difference("fifo-open-blocks"),
        id="open-read",
    ),
    pytest.param(
        Open(b"//fifo", O_WRONLY),
        O_RDONLY,
        difference("fifo-open-blocks"),
        id="open-write",
    ),
    pytest.param(
        Create(b"//fifo", O_CREAT | O_WRONLY, 0o644, 0, 0),
        O_RDONLY,
        difference("fifo-open-blocks"),
        id="create-write",
    ),
    pytest.param(
        Getversion(b"//fifo"),
        O_WRONLY,
        difference("getversion-special-file"),
        id="getversion",
    ),
]


def open_other_end(path: Path, flags: int) -> int:
    """Open the FIFO at `path` without blocking, once the C helper waits on it.

    A non-blocking open for writing fails with ENXIO until a reader exists,
    so it is retried until the helper's open(2) for reading has begun.
    """
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        try:
            return os.open(path, flags | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


@pytest.mark.parametrize(("proxy_request", "other_end", "entry"), FIFO_CASES)
def test_fifo_open_blocks_c(
    pair: HelperPair, proxy_request: Request, other_end: int, entry: Difference
) -> None:
    if isinstance(proxy_request, Getversion) and not has_generation_numbers(
        pair.c_root
    ):
        pytest.skip("without generation numbers C does not open the file")
    our_reply = exchange(pair.ours, proxy_request)
    close_fds(our_reply)
    assert our_reply.status == entry.our_status

    send(pair.c, proxy_request)
    try:
        ready, _, _ = select.select([pair.c.client.sock], [], [], BLOCK_WAIT)
        assert not ready, "the C helper replied without blocking"
        other = open_other_end(pair.c_root / "fifo", other_end)
        try:
            c_reply = receive(pair.c, kind_of(proxy_request))
        finally:
            os.close(other)
    except BaseException:
        # A C helper still blocked in open(2) would not notice the socket close.
        pair.c.process.kill()
        raise
    close_fds(c_reply)
    assert c_reply.status == entry.c_status


# (request, entry, C's status when kernel.dmesg_restrict is 1, C's status otherwise)
DEVICE_CASES = [
    pytest.param(
        Open(b"//kmsg", O_RDONLY),
        difference("device-open-runs-driver"),
        -errno.EPERM,
        -errno.ENXIO,
        id="open-kmsg",
    ),
    pytest.param(
        Create(b"//kmsg", O_RDONLY, 0o644, 0, 0),
        difference("device-open-runs-driver"),
        -errno.EPERM,
        -errno.ENXIO,
        id="create-kmsg",
    ),
    pytest.param(
        Getversion(b"//null"),
        difference("getversion-special-file"),
        -errno.ENOTTY,
        -errno.ENOTTY,
        id="getversion-null",
    ),
    pytest.param(
        Getversion(b"//kmsg"),
        difference("getversion-special-file"),
        -errno.EPERM,
        -errno.ENOTTY,
        id="getversion-kmsg",
    ),
]


@pytest.mark.parametrize(
    ("proxy_request", "entry", "c_restricted", "c_unrestricted"), DEVICE_CASES
)
def test_device_not_opened(
    pair: HelperPair,
    proxy_request: Request,
    entry: Difference,
    c_restricted: int,
    c_unrestricted: int,
) -> None:
    if isinstance(proxy_request, Getversion) and not has_generation_numbers(
        pair.c_root
    ):
        pytest.skip("without generation numbers C does not open the file")
    # /dev/kmsg refuses readers that lack CAP_SYSLOG only under dmesg_restrict.
    c_status = c_restricted if dmesg_restricted() else c_unrestricted
    expect_difference(pair, proxy_request, entry, c_status=c_status)


# (request, C's status): open(2) fails on these before it opens the file. An
# access mode of 3 (O_ACCMODE) requests neither reading nor writing.
SPECIAL_OPEN_ERROR_CASES = [
    pytest.param(Open(b"//fifo", os.O_ACCMODE), -errno.EINVAL, id="fifo-mode-3"),
    pytest.param(
        Open(b"//fifo", O_RDWR | os.O_DIRECT), -errno.EINVAL, id="fifo-direct"
    ),
    pytest.param(
        Create(b"//fifo", O_CREAT | O_RDONLY | os.O_NOATIME, 0o644, USER, USER),
        -errno.EPERM,
        id="fifo-noatime-not-owner",
    ),
    pytest.param(
        Create(b"//null", O_CREAT | O_RDONLY | os.O_NOATIME, 0o644, USER, USER),
        -errno.EPERM,
        id="device-noatime-not-owner",
    ),
]


@pytest.mark.parametrize(("proxy_request", "c_status"), SPECIAL_OPEN_ERROR_CASES)
def test_special_open_error_replaced(
    pair: HelperPair, proxy_request: Request, c_status: int
) -> None:
    entry = difference("special-file-open-errors")
    expect_difference(pair, proxy_request, entry, c_status=c_status)


def test_every_difference_exercised() -> None:
    source = Path(__file__).read_text()
    used = set(re.findall(r'difference\("([a-z0-9-]+)"\)', source))
    assert used == {entry.name for entry in DIFFERENCES}


def test_difference_names_unique() -> None:
    names = [entry.name for entry in DIFFERENCES]
    assert len(names) == len(set(names))


def test_long_path_reachable(pair: HelperPair) -> None:
    name = b"n" * 200
    for root in (pair.c_root, pair.our_root):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(25):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
    deep = b"/" + b"/".join([name] * 25)
    assert len(deep) > 4096
    request = Mkdir(0, 0, deep + b"/leaf", 0o755)
    expect_difference(pair, request, difference("long-paths"))
    # The host path is too long as well, so the check walks down by dir fd.
    fd = os.open(pair.our_root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(25):
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    try:
        assert stat.S_ISDIR(os.stat(b"leaf", dir_fd=fd).st_mode)
    finally:
        os.close(fd)
