"""Random differential tests: Hypothesis sends the same requests to both helpers.

A rule-based state machine starts QEMU's C helper and ours on two identical
export trees, one pair of processes per Hypothesis example. It sends both
every request type, with arguments drawn from small pools. Paths are made of
the names of the starting tree or extend paths that earlier steps created,
so most requests hit existing files, directories, symlinks, hard links and
special files. After each request it compares the two replies, normalised as in
test_differential.py, and every few steps and at the end of each example it
compares the two trees.

Requests under an entry of differences.py are not compared: ours must give
the entry's `our_status`, and C its `c_status` where the entry's text
applies to the case. Requests that would block or crash the C helper go to
ours only. Create requests whose ids are each 0 or -1 reach the C helper as
0/0, because ours runs them as 0/0 (see unchanged-ids-keep-capabilities). A
create request with uid 0 or -1 and another gid leaves the C helper without
its capabilities, so after one the C helper is restarted on its tree.

DIFFERENTIAL_REQUESTS sets roughly how many requests a run sends: Hypothesis
ends some examples early, so a run sends fewer (100,366 for a budget of
110,000 in one run), and shrinking a failure sends more. The test prints the
exact counts. Without
DIFFERENTIAL_SEED the run is derandomized, so every run sends the same
requests. With it, the run uses that seed and saves failing examples in
.cache/hypothesis-differential, which replays them first on the next run.
scripts/differential runs a large budget.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import math
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    rule,
    run_state_machine_as_test,
)

from differences import Difference, difference
from harness import HelperProcess
from test_differential import (
    EXPLICIT_TIME_LIMIT,
    UTIME_NOW,
    UTIME_OMIT,
    Frame,
    assert_upper_bits_zero,
    close_fds,
    exchange,
    frame_with_payload,
    has_generation_numbers,
    kind_of,
    normalise_statfs,
)
from virtfs_proxy_helper import protocol
from virtfs_proxy_helper.client import Client, Reply, ReplyError, parse_stat
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
    to_signed32,
)

REPO = Path(__file__).resolve().parent.parent

# Approximate number of requests per run, and per Hypothesis example. Each
# example pays about 0.2 s to start our helper, so longer examples are cheaper.
REQUESTS = int(os.environ.get("DIFFERENTIAL_REQUESTS", "10000"))
STEPS_PER_EXAMPLE = 50
SEED = os.environ.get("DIFFERENTIAL_SEED")
DATABASE = REPO / ".cache" / "hypothesis-differential"

# Steps between two comparisons of the trees.
TREE_INTERVAL = 4
# Seconds a helper may take to reply. Generous, because the VM running the
# tests may be busy, and a reply that never comes is a failure either way.
REPLY_TIMEOUT = 20.0
# Longest path added to the pool. Generated paths extend a pooled one by one
# name of at most 256 bytes, so they stay below PATH_MAX, where ours differs
# from C on purpose (see long-paths in differences.py), unless they contain
# a name over 255 bytes.
MAX_POOLED_PATH = 2048
# Bytes of a regular file's content that the comparisons read.
CONTENT_LIMIT = 1 << 20

NO_ID = protocol.NO_ID
USER = 1000
OTHER_USER = 1001

O_TMPFILE_ONLY = os.O_TMPFILE & ~os.O_DIRECTORY
# The kernel's O_LARGEFILE; Python's os.O_LARGEFILE is glibc's, 0 on x86_64.
O_LARGEFILE = 0o100000

XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE

# Counts of what the runs did, printed when the test ends.
COUNTS: Counter[str] = Counter()


# Starting tree. Every name is one of NAMES, so generated paths hit it.


NAMES = [b"a", b"b", b"c", b"d", b"e", b"f"]


def write_file(
    path: Path, content: bytes, mode: int, uid: int = 0, gid: int = 0
) -> None:
    path.write_bytes(content)
    os.chown(path, uid, gid)
    path.chmod(mode)


def build_tree(root: Path) -> None:
    """Fill `root` with the tree that every example starts from."""
    root.chmod(0o755)
    write_file(root / "a", b"hello\n", 0o644)
    os.setxattr(root / "a", "user.a", b"1")
    (root / "b/b").mkdir(parents=True)
    write_file(root / "b/a", b"nested\n", 0o600, USER, USER)
    os.chown(root / "b/b", 0, USER)
    (root / "b/b").chmod(0o2775)
    write_file(root / "b/b/a", b"", 0o644)
    os.symlink("b", root / "b/b/b")
    os.mkfifo(root / "b/c")
    os.mknod(root / "b/d", stat.S_IFSOCK)
    os.mknod(root / "b/e", stat.S_IFCHR, os.makedev(1, 3))
    for name, mode in (("b/c", 0o644), ("b/d", 0o644), ("b/e", 0o666)):
        (root / name).chmod(mode)
    os.link(root / "a", root / "b/f")
    os.symlink("a", root / "c")
    os.symlink("b", root / "d")
    os.symlink("f/x", root / "e")
    (root / "f").mkdir()
    (root / "f").chmod(0o3777)
    write_file(root / "f/a", b"#!/bin/sh\n", 0o4755, OTHER_USER, OTHER_USER)
    os.setxattr(root / "f/a", "user.b", b"x" * 300)


INITIAL_PATHS = [
    b"/a",
    b"/b",
    b"/b/a",
    b"/b/b",
    b"/b/b/a",
    b"/b/b/b",
    b"/b/c",
    b"/b/d",
    b"/b/e",
    b"/b/f",
    b"/c",
    b"/d",
    b"/e",
    b"/f",
    b"/f/a",
]


# Tree and descriptor comparison. Like snapshot() and summarise_fd() in
# test_differential.py, but reading at most CONTENT_LIMIT bytes of a file,
# because TRUNCATE may leave a sparse file far larger than memory.


def read_content(path: bytes | str) -> tuple[int, bytes]:
    """Return the size of the file at `path` and a digest of its first bytes."""
    with open(path, "rb") as file:
        prefix = file.read(CONTENT_LIMIT)
        size = os.fstat(file.fileno()).st_size
    return size, hashlib.sha256(prefix).digest()


class Node(NamedTuple):
    """One file as the tree comparison records it, without times and inodes."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int | None
    rdev: int
    content: object
    xattrs: tuple[tuple[str, bytes], ...]


def describe_node(path: bytes) -> Node:
    st_ = os.lstat(path)
    content: object = None
    if stat.S_ISREG(st_.st_mode):
        content = read_content(path)
    elif stat.S_ISLNK(st_.st_mode):
        content = os.readlink(path)
    names = sorted(os.listxattr(path, follow_symlinks=False))
    xattrs = tuple(
        (name, os.getxattr(path, name, follow_symlinks=False)) for name in names
    )
    is_device = stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode)
    return Node(
        mode=st_.st_mode,
        uid=st_.st_uid,
        gid=st_.st_gid,
        nlink=st_.st_nlink,
        # A directory's size depends on how the filesystem allocated it.
        size=None if stat.S_ISDIR(st_.st_mode) else st_.st_size,
        rdev=st_.st_rdev if is_device else 0,
        content=content,
        xattrs=xattrs,
    )


class Tree(NamedTuple):
    nodes: dict[bytes, Node]
    hard_links: frozenset[frozenset[bytes]]


def snapshot(root: Path) -> Tree:
    """Return every file under `root` by relative path, and the hard-link groups."""
    base = os.fsencode(root)
    nodes = {b".": describe_node(base)}
    inodes: dict[int, set[bytes]] = {}
    for directory, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, base)
            node = describe_node(path)
            nodes[relative] = node
            if not stat.S_ISDIR(node.mode) and node.nlink > 1:
                inodes.setdefault(os.lstat(path).st_ino, set()).add(relative)
    return Tree(nodes, frozenset(frozenset(group) for group in inodes.values()))


class FdSummary(NamedTuple):
    """A received descriptor, described without its number."""

    file_type: int
    permissions: int
    uid: int
    gid: int
    nlink: int
    size: int | None
    access_mode: int
    status_flags: int
    content: object


def summarise_fd(fd: int) -> FdSummary:
    """Describe `fd` by what it refers to and how it is open, then close it."""
    try:
        st_ = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        # Reopening through /proc reads an O_PATH or write-only descriptor too.
        link = b"/proc/self/fd/%d" % fd
        content: object = None
        if stat.S_ISREG(st_.st_mode):
            content = read_content(link)
        elif stat.S_ISDIR(st_.st_mode):
            content = tuple(sorted(os.listdir(link)))
    finally:
        os.close(fd)
    return FdSummary(
        file_type=stat.S_IFMT(st_.st_mode),
        permissions=stat.S_IMODE(st_.st_mode),
        uid=st_.st_uid,
        gid=st_.st_gid,
        nlink=st_.st_nlink,
        size=None if stat.S_ISDIR(st_.st_mode) else st_.st_size,
        access_mode=flags & os.O_ACCMODE,
        # Ours applies O_NOFOLLOW while looking the path up and opens the
        # descriptor it sends afresh, so F_GETFL does not show it (see the
        # README's differences).
        status_flags=flags & ~(os.O_ACCMODE | os.O_NOFOLLOW),
        content=content,
    )


def normalise_time(seconds: int, nanoseconds: int) -> tuple[int, int] | str:
    """Keep a time that UTIME set; any later time came from the clock."""
    value = protocol.to_signed64(seconds)
    if value < EXPLICIT_TIME_LIMIT:
        return (value, nanoseconds)
    return "from the clock"


def normalise_stat(payload: bytes) -> dict[str, object]:
    fields: dict[str, object] = parse_stat(payload)._asdict()
    # st_blocks depends on how the filesystem allocated the data.
    for name in ("st_dev", "st_ino", "st_blocks"):
        del fields[name]
    for prefix in ("st_atime", "st_mtime", "st_ctime"):
        seconds = fields.pop(f"{prefix}_sec")
        nanoseconds = fields.pop(f"{prefix}_nsec")
        assert isinstance(seconds, int) and isinstance(nanoseconds, int)
        fields[prefix] = normalise_time(seconds, nanoseconds)
    return fields


def normalise(kind: int, reply: Reply) -> object:
    """Return the part of `reply` that must match, closing any descriptor."""
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


# Looking a path up as the chrooted helpers do, to tell what a request opens.


class OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


# openat2's number on x86_64, arm64 and every other architecture but alpha.
SYS_OPENAT2 = 437
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def stat_in_root(root_fd: int, path: bytes, follow: bool) -> os.stat_result | None:
    """Stat `path` as a process chrooted at `root_fd` would, or return None.

    openat2's RESOLVE_IN_ROOT resolves "/", ".." and absolute symlink targets
    against `root_fd`, as the kernel does for the chrooted helpers.
    """
    if path.endswith(b"\0"):
        path = path[:-1]
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    how = OpenHow(flags, 0, RESOLVE_IN_ROOT)
    fd = _libc.syscall(
        SYS_OPENAT2, root_fd, path, ctypes.byref(how), ctypes.sizeof(how)
    )
    if fd < 0:
        if ctypes.get_errno() == errno.ENOSYS:
            pytest.fail("openat2 is missing: the kernel must be Linux 5.6 or newer")
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def blocks_c(mode: int, flags: int) -> bool:
    """Return whether the C helper's open(2) of a file of `mode` would block.

    open(2) waits for the other end only on a FIFO opened for reading or for
    writing, without O_NONBLOCK. O_PATH opens nothing, O_DIRECTORY fails
    first with ENOTDIR, and O_RDWR or access mode 3 never wait.
    """
    return (
        stat.S_ISFIFO(mode)
        and not flags & (os.O_PATH | os.O_NONBLOCK | os.O_DIRECTORY)
        and flags & os.O_ACCMODE in (os.O_RDONLY, os.O_WRONLY)
    )


def opens_device(mode: int, flags: int) -> bool:
    """Return whether the C helper's open(2) would run a device driver's open."""
    is_device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
    return is_device and not flags & (os.O_PATH | os.O_DIRECTORY)


SPECIAL_TYPES = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})


def open_errno(st_: os.stat_result, flags: int, owner: int | None) -> int | None:
    """Return the errno that open(2) gives a special file without blocking.

    `owner` is the uid that may set O_NOATIME, or None with CAP_FOWNER.
    Return None where open(2) opens the file, or blocks on a FIFO.
    """
    if flags & (os.O_PATH | os.O_DIRECTORY):
        return None
    if stat.S_IFMT(st_.st_mode) not in SPECIAL_TYPES:
        return None
    # The order is open(2)'s: the permission checks, then the FIFO's open,
    # then the O_DIRECT check, which a FIFO fails once its open succeeds.
    if flags & os.O_NOATIME and owner is not None and st_.st_uid != owner:
        return -errno.EPERM
    if not stat.S_ISFIFO(st_.st_mode):
        return None
    access = flags & os.O_ACCMODE
    if access == os.O_ACCMODE:
        # A FIFO open that neither reads nor writes is invalid.
        return -errno.EINVAL
    # Other opens block, or fail with ENXIO when writing without a reader.
    opens_fifo = access == os.O_RDWR or (
        access == os.O_RDONLY and flags & os.O_NONBLOCK
    )
    if flags & os.O_DIRECT and opens_fifo:
        return -errno.EINVAL
    return None


CREATE_TYPES = (Create, Mknod, Mkdir, Symlink)


def runs_as_root(uid: int, gid: int) -> bool:
    """Return whether ours runs a create request with these ids as 0/0 does."""
    return uid in (0, NO_ID) and gid in (0, NO_ID)


def disables_c(uid: int, gid: int) -> bool:
    """Return whether these ids leave the C helper without capabilities.

    See capabilities-after-create in differences.py.
    """
    return uid in (0, NO_ID) and (uid, gid) != (0, 0)


# How a request is checked.


class Plan(NamedTuple):
    """What to send the C helper for a request, and what to assert.

    `c_request` is None when the request goes to ours only. With an `entry`
    the replies are not compared: ours must give `entry.our_status`, and the
    C helper `c_status` unless that is None.
    """

    c_request: Request | Frame | None
    entry: Difference | None = None
    c_status: int | None = None


def ours_only(name: str) -> Plan:
    return Plan(None, difference(name))


def plan_open(root_fd: int, request: Open) -> Plan:
    flags = to_signed32(request.flags)
    if flags & (os.O_CREAT | O_TMPFILE_ONLY):
        excl = os.O_CREAT | os.O_EXCL
        exists = stat_in_root(root_fd, request.path, follow=False) is not None
        if flags & excl == excl and not flags & O_TMPFILE_ONLY and exists:
            # open(2) gives EEXIST only for a plain last name: with a trailing
            # "/", "." or "..", it fails with EISDIR first, with O_DIRECTORY
            # it fails with EINVAL, and O_PATH drops O_CREAT and O_EXCL.
            last = request.path.rstrip(b"\0").rpartition(b"/")[2]
            plain = last not in (b"", b".", b"..")
            usual = not flags & (os.O_DIRECTORY | os.O_PATH)
            entry = difference("open-excl-existing")
            c_status = entry.c_status if plain and usual else None
            return Plan(request, entry, c_status)
        # The C helper would create a file, as root and with an undefined mode.
        return ours_only("open-creat-missing")
    return plan_opened_file(root_fd, request, request.path, flags, None)


def plan_opened_file(
    root_fd: int, request: Request, path: bytes, flags: int, owner: int | None
) -> Plan:
    """Plan a request whose C handling opens the file at `path` with `flags`.

    `owner` is the uid that open(2) lets set O_NOATIME, or None where the
    request runs with CAP_FOWNER.
    """
    st_ = stat_in_root(root_fd, path, follow=not flags & os.O_NOFOLLOW)
    if st_ is None:
        return Plan(request)
    c_status = open_errno(st_, flags, owner)
    if c_status is not None:
        # open(2) fails before it opens the file, so C does not block.
        return Plan(request, difference("special-file-open-errors"), c_status)
    if blocks_c(st_.st_mode, flags):
        return ours_only("fifo-open-blocks")
    if opens_device(st_.st_mode, flags):
        # The C helper's reply is the driver's, so only ours is checked.
        return Plan(request, difference("device-open-runs-driver"))
    return Plan(request)


def plan_create(root_fd: int, request: Create) -> Plan:
    c_request = request
    owner: int | None = request.uid
    if runs_as_root(request.uid, request.gid):
        # Ours runs these ids as 0/0, which C serves with all its capabilities.
        c_request = request._replace(uid=0, gid=0)
        owner = None
    elif request.uid == NO_ID:
        # The effective uid stays 0, but without CAP_FOWNER.
        owner = 0
    flags = to_signed32(request.flags)
    excl = os.O_CREAT | os.O_EXCL
    if flags & O_TMPFILE_ONLY or flags & excl == excl and not flags & os.O_PATH:
        # Neither opens an existing file: O_TMPFILE needs a directory, and
        # O_CREAT | O_EXCL fails on any existing name. O_PATH drops both.
        return Plan(c_request)
    plan = plan_opened_file(root_fd, request, request.path, flags, owner)
    if plan.c_request is None:
        return plan
    return plan._replace(c_request=c_request)


def plan_request(root_fd: int, generation_numbers: bool, request: Request) -> Plan:
    """Decide how to send `request`, from the tree the C helper serves."""
    if isinstance(request, Open):
        return plan_open(root_fd, request)
    if isinstance(request, Create):
        return plan_create(root_fd, request)
    if isinstance(request, Mknod | Mkdir | Symlink):
        if runs_as_root(request.uid, request.gid):
            return Plan(request._replace(uid=0, gid=0))
        return Plan(request)
    if isinstance(request, Readlink) and to_signed32(request.bufsize) < 0:
        return ours_only("readlink-negative-size")
    if isinstance(request, Lgetxattr) and to_signed32(request.size) < 0:
        return ours_only("lgetxattr-negative-size")
    if isinstance(request, Llistxattr) and to_signed32(request.size) < 0:
        return ours_only("llistxattr-negative-size")
    if isinstance(request, Lsetxattr) and to_signed32(request.size) != len(
        request.value
    ):
        return ours_only("lsetxattr-size-mismatch")
    if isinstance(request, Getversion) and generation_numbers:
        st_ = stat_in_root(root_fd, request.path, follow=True)
        if st_ is not None and blocks_c(st_.st_mode, os.O_RDONLY):
            return ours_only("getversion-special-file")
        if st_ is not None and opens_device(st_.st_mode, os.O_RDONLY):
            return Plan(request, difference("getversion-special-file"))
    return Plan(request)


# Strategies. Paths are built from NAMES so that most of them exist.


def join_path(prefix: bytes, components: list[bytes], suffix: bytes) -> bytes:
    return prefix + b"/".join(components) + suffix


COMPONENTS = st.sampled_from(NAMES * 4 + [b"..", b".", b"", b"x" * 255, b"y" * 256])
# Mostly absolute, as QEMU sends them, with a few relative ones that the
# helpers resolve against their working directory, "/" in the chroot.
PREFIXES = st.sampled_from([b"/", b"/", b"/", b"//", b""])
# QEMU counts the C terminator in most strings, so one trailing NUL is valid.
SUFFIXES = st.sampled_from([b"", b"", b"", b"", b"\0", b"/"])
SHORT_PATHS = st.builds(
    join_path, PREFIXES, st.lists(COMPONENTS, min_size=1, max_size=4), SUFFIXES
)
DEEP_PATHS = st.builds(
    join_path,
    st.just(b"/"),
    st.lists(st.sampled_from(NAMES), min_size=5, max_size=24),
    SUFFIXES,
)
# The last three are longer than PATH_MAX, with a name longer than NAME_MAX.
ODD_PATHS = st.sampled_from(
    [
        b"",
        b"/",
        b"//",
        b".",
        b"..",
        b"/..",
        b"/../../a",
        b"/" + b"z" * 4096,
        b"/a/" + b"z" * 4096,
        b"/x/" + b"z" * 4096,
    ]
)

paths: Bundle[bytes] = Bundle("paths")

PATHS = st.one_of(
    SHORT_PATHS,
    paths,
    st.builds(lambda parent, name: parent + b"/" + name, paths, COMPONENTS),
    st.builds(lambda path, suffix: path + suffix, paths, SUFFIXES),
    DEEP_PATHS,
    ODD_PATHS,
)

IDS = st.sampled_from([0, USER, OTHER_USER, NO_ID])
PERMISSIONS = st.one_of(
    st.sampled_from([0o644, 0o755, 0o600, 0o777, 0o000, 0o4755, 0o2755, 0o1777]),
    st.integers(0, 0o7777),
    st.integers(0, 0xFFFFFFFF),
)

ACCESS_MODES = st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_ACCMODE])
OPTIONAL_FLAGS = st.sampled_from(
    [
        os.O_APPEND,
        os.O_TRUNC,
        os.O_NONBLOCK,
        os.O_DIRECTORY,
        os.O_NOFOLLOW,
        os.O_NOATIME,
        os.O_SYNC,
        os.O_DSYNC,
        os.O_DIRECT,
        O_LARGEFILE,
        os.O_CLOEXEC,
        os.O_NOCTTY,
        os.O_ASYNC,
        os.O_PATH,
        os.O_EXCL,
        os.O_CREAT,
        os.O_TMPFILE,
    ]
)


def combine_flags(access: int, optional: set[int]) -> int:
    return functools.reduce(int.__or__, optional, access)


FLAGS = st.one_of(
    st.builds(combine_flags, ACCESS_MODES, st.sets(OPTIONAL_FLAGS, max_size=4)),
    st.integers(0, 0xFFFFFFFF),
)
# QEMU sends CREATE with O_CREAT set, so most generated ones have it.
CREATE_FLAGS = st.builds(
    int.__or__, FLAGS, st.sampled_from([os.O_CREAT, os.O_CREAT, os.O_CREAT, 0])
)

MKNOD_MODES = st.one_of(
    st.builds(
        int.__or__,
        st.sampled_from(
            [stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG, 0, stat.S_IFDIR, 0o170000]
        ),
        PERMISSIONS,
    ).map(lambda mode: (mode, 0)),
    # Only devices whose open is harmless: the C helper opens them.
    st.tuples(
        st.builds(int.__or__, st.just(stat.S_IFCHR), PERMISSIONS),
        st.sampled_from(
            [0, os.makedev(1, 3), os.makedev(1, 5), 1 << 40, (1 << 64) - 1]
        ),
    ),
    st.tuples(st.builds(int.__or__, st.just(stat.S_IFBLK), PERMISSIONS), st.just(0)),
)

SYMLINK_TARGETS = st.one_of(
    st.builds(join_path, PREFIXES, st.lists(COMPONENTS, max_size=4), SUFFIXES),
    paths,
    st.sampled_from([b"", b"t" * 4095, b"t" * 4096, b"../../..", b"/"]),
)

# Sizes for READLINK, LGETXATTR and LLISTXATTR: 0 requests the length only,
# and small ones are too small for the value. Negative ones crash C.
SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 16, 100, 4096, 65535, 100_000]),
    st.integers(0, 400),
    st.sampled_from([-1, -(1 << 31)]),
)

XATTR_NAMES = st.one_of(
    st.sampled_from([b"user.a", b"user.b", b"user.c"]),
    st.sampled_from(
        [
            b"user.",
            b"user." + b"n" * 250,
            b"user." + b"n" * 251,
            b"trusted.a",
            b"security.a",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
            b"bogus.a",
            b"a",
            b"",
        ]
    ),
).flatmap(lambda name: st.sampled_from([name, name, name, name + b"\0"]))


def acl(*entries: tuple[int, int, int]) -> bytes:
    """Encode a POSIX ACL xattr value: (tag, permissions, id) per entry."""
    header = (2).to_bytes(4, "little")
    body = b"".join(
        tag.to_bytes(2, "little")
        + perm.to_bytes(2, "little")
        + id_.to_bytes(4, "little")
        for tag, perm, id_ in entries
    )
    return header + body


# ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK and ACL_OTHER.
VALID_ACLS = [
    acl((0x01, 7, NO_ID), (0x04, 5, NO_ID), (0x20, 4, NO_ID)),
    acl(
        (0x01, 6, NO_ID),
        (0x02, 7, USER),
        (0x04, 4, NO_ID),
        (0x10, 5, NO_ID),
        (0x20, 0, NO_ID),
    ),
]
XATTR_VALUES = st.one_of(
    st.sampled_from([b"", b"1", b"value", b"\0\xff", b"v" * 3000, b"v" * 5000]),
    st.sampled_from(VALID_ACLS),
    st.binary(max_size=24),
)
XATTR_FLAGS = st.sampled_from([0, XATTR_CREATE, XATTR_REPLACE, 3, 4])

TIME_SECONDS = st.sampled_from([0, 1, 1000, 123_456_789, 978_307_199, -1, -1_000_000])
TIME_NANOSECONDS = st.sampled_from(
    [0, 1, 500, 999_999_999, UTIME_NOW, UTIME_OMIT, 1_000_000_000, -1]
)
# Mostly small lengths, plus negative ones and 1 << 62, which ext4 rejects
# with EFBIG. Where a filesystem accepts it, the comparisons still read only
# CONTENT_LIMIT bytes of the sparse file.
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 3, 13, 100, 4096, 65536, 1 << 20, 1 << 62, -1, -(1 << 63)]),
    st.integers(0, 5000),
)


OPEN_CREATE_FLAGS = os.O_CREAT | O_TMPFILE_ONLY
# QEMU strips O_CREAT from OPEN, so most generated ones lack it.
OPEN_FLAGS = st.builds(
    lambda flags, keep: flags if keep else flags & ~OPEN_CREATE_FLAGS,
    FLAGS,
    st.sampled_from([False, False, False, True]),
)
OPENS = st.builds(Open, PATHS, OPEN_FLAGS)
CREATES = st.builds(Create, PATHS, CREATE_FLAGS, PERMISSIONS, IDS, IDS)
MKNODS = st.builds(
    lambda uid, gid, path, mode_rdev: Mknod(uid, gid, path, *mode_rdev),
    IDS,
    IDS,
    PATHS,
    MKNOD_MODES,
)
MKDIRS = st.builds(Mkdir, IDS, IDS, PATHS, PERMISSIONS)
SYMLINKS = st.builds(Symlink, IDS, IDS, SYMLINK_TARGETS, PATHS)
LINKS = st.builds(Link, PATHS, PATHS)
LSTATS = st.builds(Lstat, PATHS)
READLINKS = st.builds(Readlink, PATHS, SIZES)
STATFSES = st.builds(Statfs, PATHS)
CHMODS = st.builds(Chmod, PATHS, PERMISSIONS)
CHOWNS = st.builds(Chown, PATHS, IDS, IDS)
TRUNCATES = st.builds(Truncate, PATHS, LENGTHS)
UTIMES = st.builds(
    Utime, PATHS, TIME_SECONDS, TIME_NANOSECONDS, TIME_SECONDS, TIME_NANOSECONDS
)
RENAMES = st.builds(Rename, PATHS, PATHS)
REMOVES = st.builds(Remove, PATHS)
LGETXATTRS = st.builds(Lgetxattr, SIZES, PATHS, XATTR_NAMES)
LLISTXATTRS = st.builds(Llistxattr, SIZES, PATHS)


def lsetxattr_request(
    path: bytes, name: bytes, value: bytes, skew: int, flags: int
) -> Lsetxattr:
    return Lsetxattr(path, name, value, len(value) + skew, flags)


# Mostly a size field that matches the value. A mismatch goes to ours only.
LSETXATTRS = st.builds(
    lsetxattr_request,
    PATHS,
    XATTR_NAMES,
    XATTR_VALUES,
    st.sampled_from([0, 0, 0, 0, 0, 0, 0, 0, -1, 1, -(1 << 20)]),
    XATTR_FLAGS,
)
LREMOVEXATTRS = st.builds(Lremovexattr, PATHS, XATTR_NAMES)
GETVERSIONS = st.builds(Getversion, PATHS)

ANY_REQUEST = st.one_of(
    OPENS,
    CREATES,
    MKNODS,
    MKDIRS,
    SYMLINKS,
    LINKS,
    LSTATS,
    READLINKS,
    STATFSES,
    CHMODS,
    CHOWNS,
    TRUNCATES,
    UTIMES,
    RENAMES,
    REMOVES,
    LGETXATTRS,
    LLISTXATTRS,
    LSETXATTRS,
    LREMOVEXATTRS,
    GETVERSIONS,
)


def with_nul(path: bytes, suffix: bytes) -> bytes:
    return path.rstrip(b"\0") + b"\0" + suffix


NUL_PATHS = st.builds(with_nul, PATHS, st.sampled_from([b"x", b"/a", b"\0"]))
NUL_REQUESTS = st.one_of(
    st.builds(Lstat, NUL_PATHS),
    st.builds(Mkdir, IDS, IDS, NUL_PATHS, PERMISSIONS),
    st.builds(Rename, NUL_PATHS, PATHS),
    st.builds(Symlink, IDS, IDS, NUL_PATHS, PATHS),
    st.builds(
        lambda path, name: Lsetxattr(path, name, b"v", 1, 0),
        PATHS,
        st.builds(with_nul, XATTR_NAMES, st.just(b"x")),
    ),
    st.builds(Chown, NUL_PATHS, IDS, IDS),
)


# Running the helpers.


def start_helper(command: list[str], export: Path, log: Path) -> HelperProcess:
    """Start `command` serving `export` over a socketpair, appending stderr to `log`."""
    ours, theirs = socket.socketpair()
    try:
        fd = theirs.fileno()
        args = command + ["--nodaemon", "--fd", str(fd), "--path", str(export)]
        with open(log, "ab") as stderr:
            process = subprocess.Popen(args, pass_fds=[fd], stderr=stderr)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.settimeout(REPLY_TIMEOUT)
    return HelperProcess(process, Client(ours))


def stop_helper(helper: HelperProcess) -> int:
    """Close the connection and return the exit status.

    A helper that has not exited 5 s later, such as a C helper blocked in
    open(2), is killed, and the status is then -SIGKILL.
    """
    helper.client.sock.close()
    try:
        return helper.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        helper.process.kill()
        return helper.process.wait()


class RandomRequests(RuleBasedStateMachine):
    """Two helpers on two identical trees, sent the same random requests."""

    paths = paths
    # Set by the test: where the trees go, and the two helpers' commands.
    base: Path
    c_command: list[str]
    our_command: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.parent = Path(tempfile.mkdtemp(prefix="example-", dir=self.base))
        self.c_root = self.parent / "c"
        self.our_root = self.parent / "ours"
        self.c: HelperProcess | None = None
        self.ours: HelperProcess | None = None
        self.root_fd: int | None = None
        self.steps = 0
        self.checked_steps = 0
        self.tree_checked_at = 0
        try:
            for root in (self.c_root, self.our_root):
                root.mkdir()
                build_tree(root)
            self.generation_numbers = has_generation_numbers(self.c_root)
            self.root_fd = os.open(self.c_root, os.O_PATH | os.O_DIRECTORY)
            self.c = start_helper(self.c_command, self.c_root, self.parent / "c.log")
            self.ours = start_helper(
                self.our_command, self.our_root, self.parent / "ours.log"
            )
        except BaseException:
            self.release()
            raise
        COUNTS["examples"] += 1

    def release(self) -> list[tuple[str, int]]:
        """Stop both helpers, delete the trees, and return the exit statuses."""
        statuses = []
        try:
            for name in ("c", "ours"):
                helper = getattr(self, name)
                setattr(self, name, None)
                if helper is not None:
                    statuses.append((name, stop_helper(helper)))
        finally:
            if self.c is not None:
                stop_helper(self.c)
            if self.ours is not None:
                stop_helper(self.ours)
            if self.root_fd is not None:
                os.close(self.root_fd)
                self.root_fd = None
            shutil.rmtree(self.parent)
        return statuses

    def teardown(self) -> None:
        # Compare only after a clean last step: a failed one has been reported.
        clean = self.checked_steps == self.steps
        try:
            if clean:
                self.compare_trees()
        finally:
            statuses = self.release()
        if clean:
            for name, status in statuses:
                assert status == 0, f"the {name} helper exited with status {status}"

    def restart_c(self) -> None:
        """Serve the C tree with a fresh C helper, with all its capabilities."""
        assert self.c is not None
        helper, self.c = self.c, None
        status = stop_helper(helper)
        assert status == 0, f"the C helper exited with status {status}"
        self.c = start_helper(self.c_command, self.c_root, self.parent / "c.log")
        COUNTS["C restarts"] += 1

    def compare_trees(self) -> None:
        c_tree = snapshot(self.c_root)
        our_tree = snapshot(self.our_root)
        assert our_tree.nodes == c_tree.nodes
        assert our_tree.hard_links == c_tree.hard_links
        self.tree_checked_at = self.steps
        COUNTS["tree comparisons"] += 1

    # Sending.

    def check(self, request: Request) -> int:
        """Plan `request` from the C tree, run it, and return the status of ours."""
        assert self.root_fd is not None
        plan = plan_request(self.root_fd, self.generation_numbers, request)
        return self.run(request, plan)

    def run(self, request: Request | Frame, plan: Plan) -> int:
        """Send `request` as `plan` directs, and every few steps compare the trees.

        Return the status of ours.
        """
        self.steps += 1
        COUNTS["requests"] += 1
        status = self.exchange_and_check(request, plan)
        if self.steps - self.tree_checked_at >= TREE_INTERVAL:
            self.compare_trees()
        self.checked_steps = self.steps
        return status

    def exchange_and_check(self, request: Request | Frame, plan: Plan) -> int:
        assert self.c is not None and self.ours is not None
        if plan.c_request is None:
            return self.check_ours_only(request, plan)

        c_reply = self.exchange("c", plan.c_request)
        our_reply = self.exchange("ours", request)
        if disables_c_request(plan.c_request):
            self.restart_c()
        COUNTS["compared"] += 1
        if plan.entry is not None:
            close_fds(c_reply, our_reply)
            message = f"{plan.entry.name}: {request!r}"
            assert our_reply.status == plan.entry.our_status, message
            if plan.c_status is not None:
                assert c_reply.status == plan.c_status, message
            COUNTS[f"difference {plan.entry.name}"] += 1
            return our_reply.status

        kind = kind_of(request)
        getversion = kind == protocol.T_GETVERSION and our_reply.status == 0
        if getversion and self.generation_numbers:
            # C's upper 32 bits are stack garbage, and ours must be zero.
            assert_upper_bits_zero(our_reply)
        try:
            c_result = normalise(kind, c_reply)
        finally:
            our_result = normalise(kind, our_reply)
        assert our_result == c_result, f"{request!r}"
        COUNTS[f"compared {protocol.TYPE_NAMES[kind]}"] += 1
        return our_reply.status

    def exchange(self, name: str, request: Request | Frame) -> Reply:
        """Send `request` to the helper called `name` ("c" or "ours")."""
        helper: HelperProcess = getattr(self, name)
        try:
            return exchange(helper, request)
        except (OSError, ReplyError) as err:
            # A broken connection or a timeout: report how the helper ended.
            try:
                status = helper.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                status = None
            log = (self.parent / f"{name}.log").read_bytes()[-2000:]
            raise AssertionError(
                f"the {name} helper failed to reply to {request!r}: {err}; its exit "
                f"status is {status}, and its stderr ends with {log!r}"
            ) from err

    def check_ours_only(self, request: Request | Frame, plan: Plan) -> int:
        assert self.ours is not None and plan.entry is not None
        our_reply = self.exchange("ours", request)
        close_fds(our_reply)
        message = f"{plan.entry.name}: {request!r}"
        assert our_reply.status == plan.entry.our_status, message
        COUNTS["sent to ours only"] += 1
        return our_reply.status

    def created(self, request: Request, path: bytes) -> Any:
        """Run a request that creates `path`, and return `path` if it succeeded."""
        if self.check(request) != 0 or len(path) > MAX_POOLED_PATH:
            return multiple()
        return path.rstrip(b"\0")

    # Rules: one request each.

    @initialize(target=paths)
    def starting_tree(self) -> Any:
        return multiple(*INITIAL_PATHS)

    @rule(target=paths, request=CREATES)
    def create(self, request: Create) -> Any:
        return self.created(request, request.path)

    @rule(target=paths, request=MKNODS)
    def mknod(self, request: Mknod) -> Any:
        return self.created(request, request.path)

    @rule(target=paths, request=MKDIRS)
    def mkdir(self, request: Mkdir) -> Any:
        return self.created(request, request.path)

    @rule(target=paths, request=SYMLINKS)
    def symlink(self, request: Symlink) -> Any:
        return self.created(request, request.path)

    @rule(target=paths, request=LINKS)
    def link(self, request: Link) -> Any:
        return self.created(request, request.newpath)

    @rule(target=paths, request=RENAMES)
    def rename(self, request: Rename) -> Any:
        return self.created(request, request.newpath)

    @rule(request=OPENS)
    def open(self, request: Open) -> None:
        self.check(request)

    @rule(request=LSTATS)
    def lstat(self, request: Lstat) -> None:
        self.check(request)

    @rule(request=READLINKS)
    def readlink(self, request: Readlink) -> None:
        self.check(request)

    @rule(request=STATFSES)
    def statfs(self, request: Statfs) -> None:
        self.check(request)

    @rule(request=CHMODS)
    def chmod(self, request: Chmod) -> None:
        self.check(request)

    @rule(request=CHOWNS)
    def chown(self, request: Chown) -> None:
        self.check(request)

    @rule(request=TRUNCATES)
    def truncate(self, request: Truncate) -> None:
        self.check(request)

    @rule(request=UTIMES)
    def utime(self, request: Utime) -> None:
        self.check(request)

    @rule(request=REMOVES)
    def remove(self, request: Remove) -> None:
        self.check(request)

    @rule(request=LGETXATTRS)
    def lgetxattr(self, request: Lgetxattr) -> None:
        self.check(request)

    @rule(request=LLISTXATTRS)
    def llistxattr(self, request: Llistxattr) -> None:
        self.check(request)

    @rule(request=LSETXATTRS)
    def lsetxattr(self, request: Lsetxattr) -> None:
        self.check(request)

    @rule(request=LREMOVEXATTRS)
    def lremovexattr(self, request: Lremovexattr) -> None:
        self.check(request)

    @rule(request=GETVERSIONS)
    def getversion(self, request: Getversion) -> None:
        self.check(request)

    # Malformed requests.

    @rule(request=ANY_REQUEST, cut=st.integers(1, 64))
    def truncated_frame(self, request: Request, cut: int) -> None:
        """Send a frame whose payload stops short of its last field."""
        payload_size = len(protocol.encode_request(request)) - protocol.HEADER_SIZE
        frame = frame_with_payload(request, cut=min(cut, payload_size))
        entry = difference("malformed-frame-errno")
        if isinstance(request, Getversion) and not self.generation_numbers:
            entry = difference("getversion-payload-unread")
        plan = Plan(frame, entry, entry.c_status)
        if isinstance(request, Lgetxattr) and to_signed32(request.size) < 0:
            # The C helper allocates the size before it reads the name.
            plan = Plan(None, entry)
        self.run(frame, plan)

    @rule(request=ANY_REQUEST, extra=st.sampled_from([b"\0", b"xx", bytes(9)]))
    def trailing_bytes(self, request: Request, extra: bytes) -> None:
        frame = frame_with_payload(request, extra=extra)
        self.run(frame, ours_only("trailing-bytes"))

    @rule(request=NUL_REQUESTS)
    def embedded_nul(self, request: Request) -> None:
        self.run(request, ours_only("nul-in-path"))


IDS_FIELDS = struct.Struct("=II")


def disables_c_request(request: Request | Frame) -> bool:
    """Return whether sending `request` leaves the C helper without capabilities.

    The C helper switches ids before it reads anything after them, so a
    truncated MKNOD, MKDIR or SYMLINK frame switches them too.
    """
    if isinstance(request, Frame):
        if request.kind not in (protocol.T_MKNOD, protocol.T_MKDIR, protocol.T_SYMLINK):
            return False
        payload = request.data[protocol.HEADER_SIZE :]
        if len(payload) < 8:
            return False
        uid, gid = IDS_FIELDS.unpack_from(payload)
        return disables_c(uid, gid)
    if isinstance(request, CREATE_TYPES):
        return disables_c(request.uid, request.gid)
    return False


def run_settings() -> settings:
    steps = min(STEPS_PER_EXAMPLE, REQUESTS)
    return settings(
        max_examples=max(1, math.ceil(REQUESTS / steps)),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=SEED is None,
        database=None if SEED is None else DirectoryBasedExampleDatabase(DATABASE),
        print_blob=True,
    )


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Not tmp_path: pytest keeps old ones, and a long run creates thousands.
    base = Path(tempfile.mkdtemp(prefix="differential-random-"))
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_random_requests_match_c(
    base_dir: Path,
    c_helper_command: list[str],
    helper_command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    COUNTS.clear()
    monkeypatch.setattr(RandomRequests, "base", base_dir, raising=False)
    monkeypatch.setattr(RandomRequests, "c_command", c_helper_command, raising=False)
    monkeypatch.setattr(RandomRequests, "our_command", helper_command, raising=False)
    if SEED is not None:
        # What hypothesis.seed() sets, undone after the test.
        monkeypatch.setattr(
            RandomRequests, "_hypothesis_internal_use_seed", int(SEED), raising=False
        )
    started = time.monotonic()
    try:
        run_state_machine_as_test(RandomRequests, settings=run_settings())
    finally:
        elapsed = time.monotonic() - started
        details = ", ".join(f"{key} {count}" for key, count in sorted(COUNTS.items()))
        with capsys.disabled():
            print(
                f"\ndifferential: sent {COUNTS['requests']} requests and compared "
                f"{COUNTS['compared']} of them with C in {elapsed:.0f} s ({details})"
            )
    assert COUNTS["compared"] > 0
