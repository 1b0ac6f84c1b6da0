"""Hostile requests against the helper process, each with its correct reply.

These cover what a compromised QEMU can send on purpose. That includes
buffer sizes that lie, special files it wants the helper to open, names no
guest file system would make, and descriptors attached to requests. It also
includes pipelined requests that exhaust the helper's descriptors, errors
meant to put the reply stream out of step, and paths longer than PATH_MAX.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import resource
import shutil
import socket
import stat
import struct
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from harness import HelperProcess, running_helper
from virtfs_proxy_helper import libc
from virtfs_proxy_helper import protocol as p
from virtfs_proxy_helper.client import (
    Reply,
    parse_stat,
    parse_statfs,
    parse_string,
    parse_u32,
    parse_u64,
    status_of,
)

# Generous, because the tests share a noisy 2-core VM. A healthy helper
# replies in milliseconds.
REPLY_TIMEOUT = 10.0

# Filesystems whose inodes carry a generation number, by statfs f_type:
# ext2/3/4, btrfs, xfs and reiserfs. Only there does GETVERSION look the
# path up.
GENERATION_FILESYSTEMS = frozenset({0xEF53, 0x9123683E, 0x58465342, 0x52654973})
FS_IOC_GETVERSION = 0x80087601


# Runs the helper in a private mount namespace whose root file system is
# read-only, except for the test's own directory. A helper whose
# confinement broke then gets EROFS, where it would otherwise create, chmod
# or rename the requests' paths ("/new", "/file"...) on the host.
GUARD_SCRIPT = (
    'base=$1; shift; mount --bind "$base" "$base" '
    '&& mount -o remount,bind,ro / && exec "$@"'
)


@pytest.fixture
def helper_command(helper_command: list[str], tmp_path: Path) -> list[str]:
    """The helper's command, run where only tmp_path and tmpfs are writable."""
    guard = ["unshare", "--mount", "--propagation", "private"]
    return [*guard, "sh", "-c", GUARD_SCRIPT, "guard", str(tmp_path), *helper_command]


def populate(root: Path) -> None:
    (root / "file").write_bytes(b"hello world")
    os.setxattr(root / "file", "user.k", b"abc")
    (root / "values").touch()
    os.setxattr(root / "values", "user.empty", b"")
    os.setxattr(root / "values", "user.one", b"x")
    (root / "dir").mkdir()
    os.symlink("file", root / "link")
    os.mkfifo(root / "fifo")


@pytest.fixture
def helper(helper_command: list[str], export: Path) -> Iterator[HelperProcess]:
    populate(export)
    with running_helper(helper_command, export) as running:
        running.client.sock.settimeout(REPLY_TIMEOUT)
        # One round trip guarantees that start-up (confinement, capabilities)
        # is done.
        assert running.client.call(p.Lstat(b"/")).status == 0
        yield running


@pytest.fixture
def tmpfs_export() -> Iterator[Path]:
    """An export on tmpfs, which stores xattr values of up to 64 KiB, where
    ext4 stores only one block's worth."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


def call_status(helper: HelperProcess, request: p.Request) -> int:
    return status_of(helper.client.call(request))


def helper_descriptors(pid: int) -> dict[str, str]:
    """Return the helper's open descriptors and what each points at."""
    table = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            table[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
    return table


def close_reply(reply: Reply) -> None:
    if reply.fd is not None:
        os.close(reply.fd)


def supports_generation(root: Path) -> bool:
    return libc.statfs(os.fsencode(root)).f_type in GENERATION_FILESYSTEMS


# Size fields of READLINK, LGETXATTR and LLISTXATTR.
#
# The expected value is a negative errno, the u32 of a size query (an int
# >= 0), or the bytes of a wire string.

SIZE_CASES: list[tuple[p.Request, int | bytes]] = [
    (p.Readlink(b"/link", 0), -errno.EINVAL),
    (p.Readlink(b"/link", 1), -errno.EINVAL),
    (p.Readlink(b"/link", 0xFFFFFFFF), -errno.EINVAL),
    (p.Readlink(b"/link", 0x80000000), -errno.EINVAL),
    (p.Readlink(b"/link", 5), b"file"),
    (p.Readlink(b"/link", 4096), b"file"),
    (p.Readlink(b"/link", 0x7FFFFFFF), b"file"),
    (p.Lgetxattr(0, b"/file", b"user.k"), 3),
    (p.Lgetxattr(1, b"/file", b"user.k"), -errno.ERANGE),
    (p.Lgetxattr(0xFFFFFFFF, b"/file", b"user.k"), -errno.EINVAL),
    (p.Lgetxattr(0x80000000, b"/file", b"user.k"), -errno.EINVAL),
    (p.Lgetxattr(3, b"/file", b"user.k"), b"abc"),
    (p.Lgetxattr(4096, b"/file", b"user.k"), b"abc"),
    (p.Lgetxattr(0x7FFFFFFF, b"/file", b"user.k"), b"abc"),
    (p.Lgetxattr(0, b"/values", b"user.empty"), 0),
    (p.Lgetxattr(1, b"/values", b"user.empty"), b""),
    (p.Lgetxattr(1, b"/values", b"user.one"), b"x"),
    (p.Llistxattr(0, b"/dir"), 0),
    (p.Llistxattr(1, b"/dir"), b""),
    (p.Llistxattr(0, b"/file"), 7),
    (p.Llistxattr(1, b"/file"), -errno.ERANGE),
    (p.Llistxattr(6, b"/file"), -errno.ERANGE),
    (p.Llistxattr(0xFFFFFFFF, b"/file"), -errno.EINVAL),
    (p.Llistxattr(0x80000000, b"/file"), -errno.EINVAL),
    (p.Llistxattr(7, b"/file"), b"user.k\0"),
    (p.Llistxattr(4096, b"/file"), b"user.k\0"),
    (p.Llistxattr(0x7FFFFFFF, b"/file"), b"user.k\0"),
]


def check_sized_reply(reply: Reply, expected: int | bytes) -> None:
    if isinstance(expected, int) and expected < 0:
        assert reply.status == expected
    elif isinstance(expected, int):
        assert reply.status == 0
        assert parse_u32(reply.payload) == expected
    else:
        assert reply.status == 0
        assert parse_string(reply.payload) == expected


@pytest.mark.parametrize(
    ("request_", "expected"), SIZE_CASES, ids=[repr(case[0]) for case in SIZE_CASES]
)
def test_size_fields_exact_replies(
    helper: HelperProcess, request_: p.Request, expected: int | bytes
) -> None:
    check_sized_reply(helper.client.call(request_), expected)


def filler(length: int) -> bytes:
    return bytes(range(256)) * (length // 256) + b"x" * (length % 256)


@pytest.mark.parametrize(
    ("length", "fits"),
    [(p.MAX_PAYLOAD - 2, True), (p.MAX_PAYLOAD - 1, False), (p.MAX_PAYLOAD, False)],
)
def test_xattr_value_near_64k(
    helper_command: list[str], tmpfs_export: Path, length: int, fits: bool
) -> None:
    # A reply is a u16 length and the value in one 65536-byte frame, so
    # 65534 bytes is the largest value that fits.
    value = filler(length)
    (tmpfs_export / "file").touch()
    os.setxattr(tmpfs_export / "file", "user.big", value)
    with running_helper(helper_command, tmpfs_export) as helper:
        for size in (length, 0x7FFFFFFF):
            reply = helper.client.call(p.Lgetxattr(size, b"/file", b"user.big"))
            expected: int | bytes = value if fits else -errno.ENOBUFS
            check_sized_reply(reply, expected)
        query = helper.client.call(p.Lgetxattr(0, b"/file", b"user.big"))
        check_sized_reply(query, length)


def xattr_names_listing(length: int) -> list[bytes]:
    """Return xattr names whose NUL-terminated listing is `length` bytes long.

    Every name takes 256 bytes with its NUL (255 is NAME_MAX for xattr
    names) but the last, which takes what remains.
    """
    full, rest = divmod(length, 256)
    sizes = [256] * full + ([rest] if rest else [])
    return [
        b"user.%04d" % index + b"n" * (size - 10) for index, size in enumerate(sizes)
    ]


@pytest.mark.parametrize(
    ("length", "fits"),
    [(p.MAX_PAYLOAD - 2, True), (p.MAX_PAYLOAD - 1, False), (p.MAX_PAYLOAD, False)],
)
def test_xattr_listing_near_64k(
    helper_command: list[str], tmpfs_export: Path, length: int, fits: bool
) -> None:
    names = xattr_names_listing(length)
    (tmpfs_export / "file").touch()
    for name in names:
        os.setxattr(tmpfs_export / "file", name, b"")
    listing = b"".join(name + b"\0" for name in names)
    assert len(listing) == length
    with running_helper(helper_command, tmpfs_export) as helper:
        reply = helper.client.call(p.Llistxattr(0x7FFFFFFF, b"/file"))
        if fits:
            # tmpfs lists names in an order of its own.
            assert reply.status == 0
            names_sent = parse_string(reply.payload).split(b"\0")
            assert sorted(names_sent) == sorted(listing.split(b"\0"))
        else:
            check_sized_reply(reply, -errno.ENOBUFS)
        query = helper.client.call(p.Llistxattr(0, b"/file"))
        check_sized_reply(query, length)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (b"abc", 4),
        (b"abc", 0x7FFFFFFF),
        (b"abc", 2),
        (b"abc", 0),
        (b"abc", 0xFFFFFFFF),
        (b"abc", 0x80000000),
        (b"", 1),
        (b"", 0xFFFFFFFF),
        (b"\0" * 100, 99),
    ],
)
def test_lsetxattr_size_mismatch_stores_nothing(
    helper: HelperProcess, export: Path, value: bytes, size: int
) -> None:
    new = p.Lsetxattr(b"/file", b"user.new", value, size, 0)
    assert call_status(helper, new) == -errno.EINVAL
    replace = p.Lsetxattr(b"/file", b"user.k", value, size, 0)
    assert call_status(helper, replace) == -errno.EINVAL
    assert os.listxattr(export / "file") == ["user.k"]
    assert os.getxattr(export / "file", "user.k") == b"abc"


# Special files: FIFO, socket, character and block devices.

SPECIAL_REQUESTS: list[tuple[str, Callable[[bytes], p.Request]]] = [
    ("OPEN O_RDONLY", lambda path: p.Open(path, os.O_RDONLY)),
    ("OPEN O_WRONLY", lambda path: p.Open(path, os.O_WRONLY)),
    ("OPEN O_RDWR", lambda path: p.Open(path, os.O_RDWR)),
    ("OPEN O_NONBLOCK", lambda path: p.Open(path, os.O_RDONLY | os.O_NONBLOCK)),
    ("CREATE O_RDONLY", lambda path: p.Create(path, os.O_CREAT, 0o600, 0, 0)),
    (
        "CREATE O_WRONLY",
        lambda path: p.Create(path, os.O_WRONLY | os.O_CREAT, 0o600, 0, 0),
    ),
    (
        "CREATE O_RDWR as a user",
        lambda path: p.Create(path, os.O_RDWR | os.O_CREAT, 0o600, 1000, 1000),
    ),
    ("GETVERSION", lambda path: p.Getversion(path)),
]

# Majors that Linux reserves for local or experimental use, so no driver in
# a stock kernel registers them. The first not in /proc/devices is used.
EXPERIMENTAL_MAJORS = [60, 61, 62, 63, *range(120, 128), *range(240, 255)]


def unused_char_major() -> int:
    with open("/proc/devices") as devices:
        text = devices.read()
    char_section = text.split("Block devices:")[0]
    used = {int(line.split()[0]) for line in char_section.splitlines()[1:] if line}
    for major in EXPERIMENTAL_MAJORS:
        if major not in used:
            return major
    pytest.skip("every experimental character major is in use")


class SpecialFiles(NamedTuple):
    root: Path
    # Names inside the export of the special files.
    names: list[str]


@pytest.fixture
def special_files(export: Path) -> Iterator[SpecialFiles]:
    """An export with a FIFO, a live unix socket and three device nodes.

    The devices are /dev/null's numbers, the first loop device's, and an
    unused character major whose open would fail with ENXIO.
    """
    if not supports_generation(export):
        pytest.skip("GETVERSION looks paths up only on ext4, btrfs, xfs or reiserfs")
    (export / "file").write_bytes(b"regular")
    os.mkfifo(export / "fifo")
    os.mknod(export / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(export / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    major = unused_char_major()
    os.mknod(export / "unused", stat.S_IFCHR | 0o666, os.makedev(major, 0))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(export / "sock"))
        listener.listen(1)
        yield SpecialFiles(export, ["fifo", "sock", "null", "loop", "unused"])


def fdinfo_flags(pid: int, fd: str) -> int | None:
    """Return a descriptor's open flags from /proc/PID/fdinfo, None if closed."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except FileNotFoundError:
        return None
    return None


def descriptors_on(pid: int, inodes: set[tuple[int, int]]) -> dict[str, int | None]:
    """Return the helper's descriptors on any of `inodes`, with their flags."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            found[fd] = fdinfo_flags(pid, fd)
    return found


class DescriptorWatch(threading.Thread):
    """Polls the helper's descriptors while requests run, and records any
    that is open on a watched inode with flags other than O_PATH.

    An O_PATH descriptor is the helper's probe: it names the file without
    opening it, so no driver's open runs and no FIFO blocks.
    """

    def __init__(self, pid: int, inodes: set[tuple[int, int]]):
        super().__init__(daemon=True)
        self.pid = pid
        self.inodes = inodes
        self.stopping = threading.Event()
        self.opened: list[tuple[str, int | None]] = []
        self.samples = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            for fd, flags in descriptors_on(self.pid, self.inodes).items():
                if flags is not None and not flags & os.O_PATH:
                    self.opened.append((fd, flags))
            self.samples += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def special_inodes(files: SpecialFiles) -> set[tuple[int, int]]:
    inodes = set()
    for name in files.names:
        st = os.lstat(files.root / name)
        inodes.add((st.st_dev, st.st_ino))
    return inodes


# Each way the helper can be confined resolves paths with its own code.
SANDBOXES = ["namespace", "chroot", "none"]


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("name", ["fifo", "sock", "null", "loop", "unused"])
def test_special_file_gets_enxio(
    helper_command: list[str], special_files: SpecialFiles, name: str, sandbox: str
) -> None:
    path = b"/" + name.encode()
    inodes = special_inodes(special_files)
    mode = os.lstat(special_files.root / name).st_mode
    extra = ["--sandbox", sandbox]
    with running_helper(helper_command, special_files.root, extra) as helper:
        # No writer ever opens the FIFO, so a helper that opened it would
        # block and this timeout would fire.
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        assert helper.client.call(p.Lstat(b"/")).status == 0
        watch = DescriptorWatch(helper.pid, inodes)
        watch.start()
        try:
            for label, make_request in SPECIAL_REQUESTS:
                reply = helper.client.call(make_request(path))
                close_reply(reply)
                assert reply.status == -errno.ENXIO, label
                assert reply.fd is None, label
                # The probe is closed before the reply is sent.
                assert descriptors_on(helper.pid, inodes) == {}, label
        finally:
            watch.stop()
        assert watch.samples > 0
        assert watch.opened == []
    # The CREATE requests left the special file as it was.
    assert os.lstat(special_files.root / name).st_mode == mode
    assert sorted(os.listdir(special_files.root)) == sorted(
        special_files.names + ["file"]
    )


STRACE_LINE = re.compile(
    r"^(?P<pid>\d+)\s+(?P<call>open|openat|openat2)\((?P<args>.*)\)"
    r"\s+=\s+(?P<result>-?\d+)(?:<(?P<target>.*)>)?(?:\s+(?P<errno>E[A-Z0-9]+))?"
)
# openat2 prints its flags inside a struct: {flags=O_RDONLY|O_PATH, ...}.
STRACE_ARGS = re.compile(
    r'^(?:(?P<dirfd>AT_FDCWD|\d+)(?:<(?P<dir>[^>]*)>)?,\s*)?"(?P<path>(?:[^"\\]|\\.)*)",'
    r"\s*(?:\{flags=)?(?P<flags>[^,}]+)"
)


# Seen from another mount namespace, /proc/PID/fd prints as /PID/fd.
PROC_FD_DIR = re.compile(r"(?:/proc)?/\d+/fd")


def special_opens(trace: str, export_paths: set[str]) -> list[str]:
    """Return the traced opens, direct or through /proc/self/fd, of any of
    `export_paths` without O_PATH.

    strace -yy prints the path of each descriptor relative to the tracee's
    root, which is the export unless the helper runs with --sandbox none,
    so `export_paths` should name each file both ways. The helper reopens
    its O_PATH probe as openat(<fd of /proc/self/fd>, "N"), so each
    descriptor's path is remembered to resolve such a reopen.
    """
    paths_by_fd: dict[tuple[str, str], str] = {}
    offending = []
    for line in trace.splitlines():
        match = STRACE_LINE.match(line)
        if match is None:
            continue
        args = STRACE_ARGS.match(match["args"])
        assert args is not None, line
        path = args["path"]
        if args["dir"] is not None and PROC_FD_DIR.fullmatch(args["dir"]):
            path = paths_by_fd.get((match["pid"], path), path)
        flags = set(args["flags"].split("|"))
        # O_CREAT|O_EXCL fails with EEXIST on any existing name before
        # anything is opened, which is how CREATE first tries a new file.
        exclusive = {"O_CREAT", "O_EXCL"} <= flags and match["errno"] == "EEXIST"
        if path in export_paths and "O_PATH" not in flags and not exclusive:
            offending.append(line)
        if match["target"] is not None:
            # Drop the device numbers that -yy appends: "/null<char 1:3>".
            paths_by_fd[(match["pid"], match["result"])] = match["target"].split("<")[0]
    return offending


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_special_files_never_opened_strace(
    helper_command: list[str], special_files: SpecialFiles, tmp_path: Path, sandbox: str
) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    trace_path = tmp_path / "trace"
    command = [strace, "-f", "-yy", "-qq", "-e", "trace=open,openat,openat2"]
    command += ["-o", str(trace_path), *helper_command]
    extra = ["--sandbox", sandbox]
    with running_helper(command, special_files.root, extra) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        assert helper.client.call(p.Lstat(b"/")).status == 0
        for name in special_files.names:
            for label, make_request in SPECIAL_REQUESTS:
                reply = helper.client.call(make_request(b"/" + name.encode()))
                close_reply(reply)
                assert reply.status == -errno.ENXIO, f"{label} {name}"
        # The regular file is opened as usual, which shows that the trace
        # records opens at all.
        reply = helper.client.call(p.Open(b"/file", os.O_RDONLY))
        close_reply(reply)
        assert reply.status == 0
        status, _ = helper.close()
        assert status == 0
    trace = trace_path.read_text(errors="backslashreplace")
    root = str(special_files.root)
    assert special_opens(trace, {"/file", f"{root}/file"}) != []
    export_paths = {"/" + name for name in special_files.names}
    export_paths |= {f"{root}/{name}" for name in special_files.names}
    assert special_opens(trace, export_paths) == []


def test_strace_parser_resolves_proc_reopen() -> None:
    # A reopen through /proc/self/fd of a probe on /null must count as an
    # open of /null, or the strace test would pass for a helper that
    # reopens a device that way.
    trace = "\n".join(
        [
            '7 openat(AT_FDCWD</>, "/null", O_RDONLY|O_CLOEXEC|O_PATH) = 5</null>',
            '7 openat(3</proc/7/fd>, "5", O_RDWR|O_CLOEXEC) = 6</null<char 1:3>>',
            '7 openat(AT_FDCWD</>, "/unused", O_RDONLY|O_CLOEXEC|O_PATH) = 5</unused>',
            '7 openat(3</proc/7/fd>, "5", O_RDWR|O_CLOEXEC) = -1 ENXIO (No such dev)',
            '7 openat(AT_FDCWD</>, "/null", O_RDWR|O_CREAT, 0600) = 5</null<char 1:3>>',
            '7 openat(AT_FDCWD</>, "/null", O_RDWR|O_CREAT|O_EXCL, 0600) = -1 EEXIST',
            '7 openat2(3</x>, "/null", {flags=O_RDONLY|O_PATH, resolve=0}, 24) = 5',
            '7 openat2(3</x>, "/null", {flags=O_RDWR, resolve=0}, 24) = 6</x/null>',
            '7 openat2(3</x>, "/null", {flags=O_PATH, resolve=0}, 24) = 5</null>',
            '7 openat(3</7/fd>, "5", O_RDONLY|O_CLOEXEC) = 6</null<char 1:3>>',
        ]
    )
    assert len(special_opens(trace, {"/null", "/unused"})) == 5


# Names that are not UTF-8 or contain control characters.

ODD_NAMES = [
    b"new\nline",
    b"\xff\xfe",
    b"\xc3\x28",
    b"\x80",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"tab\tcr\r",
    b"\xf4\x90\x80\x80",
    b" ",
    b"\x1b[31m",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_round_trip(helper: HelperProcess, export: Path, name: bytes) -> None:
    top = os.fsencode(export)
    directory = b"/" + name
    assert call_status(helper, p.Mkdir(0, 0, directory, 0o755)) == 0
    assert name in os.listdir(top)
    st = parse_stat(helper.client.call(p.Lstat(directory)).payload)
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_ino == os.lstat(top + directory).st_ino

    file = directory + b"/" + name
    reply = helper.client.call(p.Create(file, os.O_CREAT | os.O_RDWR, 0o600, 0, 0))
    close_reply(reply)
    assert reply.status == 0
    assert os.listdir(top + directory) == [name]

    link = directory + b"/link"
    assert call_status(helper, p.Symlink(0, 0, name, link)) == 0
    assert os.readlink(top + link) == name
    target = helper.client.call(p.Readlink(link, 4096))
    assert parse_string(target.payload) == name

    renamed = directory + b"/" + name + name[::-1]
    assert call_status(helper, p.Rename(file, renamed)) == 0
    assert sorted(os.listdir(top + directory)) == sorted([b"link", name + name[::-1]])

    xattr = b"user." + name
    request = p.Lsetxattr(renamed, xattr, name, len(name), 0)
    assert call_status(helper, request) == 0
    assert os.getxattr(top + renamed, xattr) == name
    value = helper.client.call(p.Lgetxattr(4096, renamed, xattr))
    assert parse_string(value.payload) == name
    listing = helper.client.call(p.Llistxattr(4096, renamed))
    assert parse_string(listing.payload) == xattr + b"\0"
    assert call_status(helper, p.Lremovexattr(renamed, xattr)) == 0
    assert os.listxattr(top + renamed) == []


def tree_listing(root: Path) -> dict[bytes, tuple[int, int, bytes, list[str]]]:
    """Return each entry's mode, size, symlink target and xattr names."""
    top = os.fsencode(root)
    listing = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else b""
            xattrs = sorted(os.listxattr(path, follow_symlinks=False))
            listing[os.path.relpath(path, top)] = (
                st.st_mode,
                st.st_size,
                target,
                xattrs,
            )
    return listing


FIFO_MODE = stat.S_IFIFO | 0o600

EMBEDDED_NUL_REQUESTS: list[p.Request] = [
    p.Open(b"/file\0x", os.O_RDONLY),
    p.Create(b"/new\0x", os.O_CREAT | os.O_RDWR, 0o600, 0, 0),
    p.Create(b"/file\0x", os.O_RDWR | os.O_TRUNC, 0o600, 0, 0),
    p.Mknod(0, 0, b"/new\0x", FIFO_MODE, 0),
    p.Mkdir(0, 0, b"/new\0x", 0o755),
    p.Mkdir(0, 0, b"/new\0\0", 0o755),
    p.Symlink(0, 0, b"file\0x", b"/new"),
    p.Symlink(0, 0, b"file", b"/new\0x"),
    p.Link(b"/file\0x", b"/new"),
    p.Link(b"/file", b"/new\0x"),
    p.Chmod(b"/file\0x", 0o600),
    p.Chown(b"/file\0x", 1000, 1000),
    p.Truncate(b"/file\0x", 0),
    p.Utime(b"/file\0x", 1, 0, 1, 0),
    p.Rename(b"/file\0x", b"/new"),
    p.Rename(b"/file", b"/new\0x"),
    p.Remove(b"/file\0x"),
    p.Remove(b"/dir\0\0"),
    p.Lsetxattr(b"/file\0x", b"user.new", b"v", 1, 0),
    p.Lsetxattr(b"/file", b"user.new\0x", b"v", 1, 0),
    p.Lremovexattr(b"/file", b"user.k\0x"),
    p.Lremovexattr(b"/file\0x", b"user.k"),
]


@pytest.mark.parametrize("request_", EMBEDDED_NUL_REQUESTS, ids=repr)
def test_embedded_nul_changes_nothing(
    helper: HelperProcess, export: Path, request_: p.Request
) -> None:
    before = tree_listing(export)
    reply = helper.client.call(request_)
    close_reply(reply)
    assert reply.status == -errno.EINVAL
    assert reply.fd is None
    assert tree_listing(export) == before


TRAILING_NUL_REQUESTS: list[tuple[p.Request, Callable[[Path], bool]]] = [
    (p.Mkdir(0, 0, b"/new\0", 0o755), lambda root: (root / "new").is_dir()),
    (
        p.Mknod(0, 0, b"/new\0", FIFO_MODE, 0),
        lambda root: stat.S_ISFIFO(os.lstat(root / "new").st_mode),
    ),
    (
        p.Symlink(0, 0, b"file\0", b"/new\0"),
        lambda root: os.readlink(root / "new") == "file",
    ),
    (p.Link(b"/file\0", b"/new\0"), lambda root: (root / "new").stat().st_nlink == 2),
    (p.Rename(b"/file\0", b"/new\0"), lambda root: (root / "new").is_file()),
    (p.Remove(b"/file\0"), lambda root: not (root / "file").exists()),
    (
        p.Lsetxattr(b"/file\0", b"user.new\0", b"v\0", 2, 0),
        lambda root: os.getxattr(root / "file", "user.new") == b"v\0",
    ),
    (
        p.Chmod(b"/file\0", 0o600),
        lambda root: (root / "file").stat().st_mode & 0o777 == 0o600,
    ),
]


@pytest.mark.parametrize(
    ("request_", "effect"),
    TRAILING_NUL_REQUESTS,
    ids=[repr(case[0]) for case in TRAILING_NUL_REQUESTS],
)
def test_trailing_nul_accepted(
    helper: HelperProcess,
    export: Path,
    request_: p.Request,
    effect: Callable[[Path], bool],
) -> None:
    assert call_status(helper, request_) == 0
    assert effect(export)
    assert not any(b"\0" in name for name in os.listdir(os.fsencode(export)))


def test_create_trailing_nul_accepted(helper: HelperProcess, export: Path) -> None:
    request = p.Create(b"/new\0", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600, 0, 0)
    reply = helper.client.call(request)
    close_reply(reply)
    assert reply.status == 0
    assert (export / "new").is_file()
    opened = helper.client.call(p.Open(b"/file\0", os.O_RDONLY))
    try:
        assert opened.fd is not None
        assert os.read(opened.fd, 5) == b"hello"
    finally:
        close_reply(opened)


# Descriptor exhaustion.

# The helper's RLIMIT_NOFILE, while the peer keeps three times as many of
# its descriptors open. In-flight descriptors of every root process count against
# it too (see start_pipelined_opens), so it is not set lower.
HELD_FD_LIMIT = 128


def test_held_fds_not_counted_by_helper(
    helper_command: list[str], export: Path
) -> None:
    # Every descriptor the helper sends is closed on its side, so the peer
    # may hold far more of them than the helper's own limit allows.
    populate(export)
    limited = ["prlimit", f"--nofile={HELD_FD_LIMIT}:{HELD_FD_LIMIT}", *helper_command]
    received: list[int] = []
    with running_helper(limited, export) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        assert helper.client.call(p.Lstat(b"/")).status == 0
        limits = resource.prlimit(helper.pid, resource.RLIMIT_NOFILE)
        assert limits == (HELD_FD_LIMIT, HELD_FD_LIMIT)
        before = helper_descriptors(helper.pid)
        try:
            for _ in range(3 * HELD_FD_LIMIT):
                reply = helper.client.call(p.Open(b"/file", os.O_RDONLY))
                if reply.fd is not None:
                    received.append(reply.fd)
                assert reply.status == 0
            assert helper.client.call(p.Lstat(b"/file")).status == 0
            assert helper_descriptors(helper.pid) == before
        finally:
            for fd in received:
                os.close(fd)

        reply = helper.client.call(p.Open(b"/file", os.O_RDONLY))
        close_reply(reply)
        assert reply.status == 0


def lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def test_emfile_replies_then_recovers(helper: HelperProcess, export: Path) -> None:
    if not supports_generation(export):
        pytest.skip("GETVERSION opens files only on ext4, btrfs, xfs or reiserfs")
    before = helper_descriptors(helper.pid)
    limits = resource.prlimit(helper.pid, resource.RLIMIT_NOFILE)
    # A limit at the lowest free descriptor number leaves the helper no
    # room for another descriptor.
    full = lowest_free_fd(helper.pid)
    resource.prlimit(helper.pid, resource.RLIMIT_NOFILE, (full, limits[1]))
    try:
        opened = helper.client.call(p.Open(b"/file", os.O_RDONLY))
        close_reply(opened)
        assert opened.status == -errno.EMFILE

        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
        created = helper.client.call(p.Create(b"/new", flags, 0o600, 0, 0))
        close_reply(created)
        assert created.status == -errno.EMFILE
        assert not (export / "new").exists()

        version = helper.client.call(p.Getversion(b"/file"))
        assert version.status == -errno.EMFILE

        # Requests that need no descriptor still work.
        assert helper.client.call(p.Lstat(b"/file")).status == 0
        assert call_status(helper, p.Mkdir(0, 0, b"/made", 0o755)) == 0
        assert helper_descriptors(helper.pid) == before
    finally:
        resource.prlimit(helper.pid, resource.RLIMIT_NOFILE, limits)

    reply = helper.client.call(p.Open(b"/file", os.O_RDONLY))
    close_reply(reply)
    assert reply.status == 0
    # The helper closes its copy just after sending it, so one more round
    # trip is needed before its table can be compared.
    assert helper.client.call(p.Lstat(b"/")).status == 0
    assert helper_descriptors(helper.pid) == before


def receive_fd_replies(helper: HelperProcess, count: int) -> list[Reply]:
    replies = []
    try:
        for _ in range(count):
            replies.append(helper.client.read_fd_reply())
    except BaseException:
        for reply in replies:
            close_reply(reply)
        raise
    return replies


def wait_for_queued_replies(helper: HelperProcess, size: int) -> None:
    """Wait until `size` bytes of replies are queued or the helper exited."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    while helper.process.poll() is None and time.monotonic() < deadline:
        queued = fcntl.ioctl(helper.client.sock, termios.FIONREAD, bytes(4))
        if struct.unpack("=i", queued)[0] >= size:
            return
        time.sleep(0.01)


def start_pipelined_opens(helper: HelperProcess, count: int) -> None:
    """Send `count` OPENs without reading a reply, as a hostile peer would.

    Each descriptor the helper sends stays in flight in the socket until
    the peer reads it, and the kernel counts it against the sending user,
    root, for every process of that user. Once that count exceeds the
    sender's RLIMIT_NOFILE, sendmsg with SCM_RIGHTS fails with
    ETOOMANYREFS unless the sender has CAP_SYS_RESOURCE, which the helper
    drops.
    """
    assert helper.client.call(p.Lstat(b"/")).status == 0
    helper.client.send_raw(p.encode_request(p.Open(b"/file", os.O_RDONLY)) * count)
    wait_for_queued_replies(helper, count * FD_REPLY_SIZE)


def limited_helper(helper_command: list[str]) -> list[str]:
    return ["prlimit", f"--nofile={INFLIGHT_LIMIT}:{INFLIGHT_LIMIT}", *helper_command]


# Small, so that few descriptors in flight reach it.
INFLIGHT_LIMIT = 32
# An fd reply is one int: FD_VALID or -errno.
FD_REPLY_SIZE = 4


def test_pipelined_opens_keep_serving(helper_command: list[str], export: Path) -> None:
    # Every request must get an fd reply, with a descriptor or an errno,
    # and the helper must go on serving.
    populate(export)
    count = 2 * INFLIGHT_LIMIT
    with running_helper(limited_helper(helper_command), export) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        # One round trip first, so that start-up has opened what it keeps.
        assert helper.client.call(p.Lstat(b"/")).status == 0
        before = helper_descriptors(helper.pid)
        start_pipelined_opens(helper, count)
        assert helper.process.poll() is None
        replies = receive_fd_replies(helper, count)
        statuses = [reply.status for reply in replies]
        for reply in replies:
            close_reply(reply)
        assert statuses[0] == 0
        assert all(status == 0 or -4095 <= status < 0 for status in statuses)
        assert helper.client.call(p.Lstat(b"/file")).status == 0
        reply = helper.client.call(p.Open(b"/file", os.O_RDONLY))
        close_reply(reply)
        assert reply.status == 0
        assert helper.client.call(p.Lstat(b"/")).status == 0
        assert helper_descriptors(helper.pid) == before


def test_hostile_peer_spares_other_helpers(
    helper_command: list[str], tmp_path: Path
) -> None:
    # Two helpers as root with the same limit, as for two VMs on one host.
    # The descriptors that the first peer leaves unread must not make the
    # second helper's sends fail.
    hostile_export = tmp_path / "hostile"
    other_export = tmp_path / "other"
    for root in (hostile_export, other_export):
        root.mkdir()
        populate(root)
    command = limited_helper(helper_command)
    with running_helper(command, hostile_export) as hostile:
        hostile.client.sock.settimeout(REPLY_TIMEOUT)
        start_pipelined_opens(hostile, 2 * INFLIGHT_LIMIT)
        with running_helper(command, other_export) as other:
            other.client.sock.settimeout(REPLY_TIMEOUT)
            reply = other.client.call(p.Open(b"/file", os.O_RDONLY))
            close_reply(reply)
            assert reply.status == 0
            assert reply.fd is not None


# Descriptors that the peer attaches to its requests.


def send_with_fds(helper: HelperProcess, data: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    helper.client.sock.sendmsg([data], rights)


# The maximum number of descriptors in one SCM_RIGHTS message (SCM_MAX_FD).
SCM_MAX_FD = 253

ATTACHED_FD_CASES: list[tuple[str, p.Request, int]] = [
    ("LSTAT, one", p.Lstat(b"/file"), 1),
    ("LSTAT, many", p.Lstat(b"/file"), SCM_MAX_FD),
    ("OPEN, one", p.Open(b"/file", os.O_RDONLY), 1),
    ("OPEN, many", p.Open(b"/file", os.O_RDONLY), SCM_MAX_FD),
    ("failing MKDIR, many", p.Mkdir(0, 0, b"/dir", 0o755), SCM_MAX_FD),
]


@pytest.mark.parametrize(("label", "request_", "count"), ATTACHED_FD_CASES)
def test_attached_fds_never_kept(
    helper: HelperProcess,
    tmp_path: Path,
    label: str,
    request_: p.Request,
    count: int,
) -> None:
    passed = tmp_path / "passed"
    passed.write_bytes(b"passed")
    before = helper_descriptors(helper.pid)
    frame = p.encode_request(request_)
    fds = [os.open(passed, os.O_RDONLY) for _ in range(count)]
    try:
        # Whole frame with descriptors, then a frame split in two sends
        # that each carry them, then descriptors on a malformed frame.
        send_with_fds(helper, frame, fds)
        send_with_fds(helper, frame[:5], fds)
        send_with_fds(helper, frame[5:], fds)
        malformed = p.HEADER.pack(p.T_LSTAT, 1) + b"\x01"
        send_with_fds(helper, malformed, fds)
    finally:
        for fd in fds:
            os.close(fd)
    kind = p.TYPE_OF[type(request_)]
    for _ in range(2):
        if kind in p.FD_REPLY_TYPES:
            reply = helper.client.read_fd_reply()
        else:
            reply = helper.client.read_frame_reply()
        close_reply(reply)
    assert helper.client.read_frame_reply().status == -errno.EINVAL
    assert helper.client.call(p.Lstat(b"/")).status == 0
    after = helper_descriptors(helper.pid)
    assert after == before
    assert str(passed) not in after.values()


# Reply kinds stay in step after errors and malformed frames.


def failing_request(kind: int) -> p.Request:
    """Return a well-formed request of `kind` that fails with ENOENT."""
    missing = b"/missing/x"
    requests: dict[int, p.Request] = {
        p.T_OPEN: p.Open(missing, os.O_RDONLY),
        p.T_CREATE: p.Create(missing, os.O_CREAT | os.O_RDWR, 0o600, 0, 0),
        p.T_MKNOD: p.Mknod(0, 0, missing, FIFO_MODE, 0),
        p.T_MKDIR: p.Mkdir(0, 0, missing, 0o755),
        p.T_SYMLINK: p.Symlink(0, 0, b"file", missing),
        p.T_LINK: p.Link(missing, b"/new"),
        p.T_LSTAT: p.Lstat(missing),
        p.T_READLINK: p.Readlink(missing, 100),
        p.T_STATFS: p.Statfs(missing),
        p.T_CHMOD: p.Chmod(missing, 0o600),
        p.T_CHOWN: p.Chown(missing, 0, 0),
        p.T_TRUNCATE: p.Truncate(missing, 0),
        p.T_UTIME: p.Utime(missing, 0, 0, 0, 0),
        p.T_RENAME: p.Rename(missing, b"/new"),
        p.T_REMOVE: p.Remove(missing),
        p.T_LGETXATTR: p.Lgetxattr(0, missing, b"user.k"),
        p.T_LLISTXATTR: p.Llistxattr(0, missing),
        p.T_LSETXATTR: p.Lsetxattr(missing, b"user.k", b"v", 1, 0),
        p.T_LREMOVEXATTR: p.Lremovexattr(missing, b"user.k"),
        p.T_GETVERSION: p.Getversion(missing),
    }
    return requests[kind]


def bad_frames(kind: int) -> list[tuple[str, bytes, int]]:
    """Return (label, frame, errno) for each bad request of type `kind`."""
    if kind not in p.LAYOUTS:
        return [
            ("empty", p.HEADER.pack(kind, 0), errno.EOPNOTSUPP),
            ("with payload", p.HEADER.pack(kind, 3) + b"abc", errno.EOPNOTSUPP),
        ]
    frame = p.encode_request(failing_request(kind))
    payload = frame[p.HEADER_SIZE :]
    overrun = bytearray(payload)
    # The first string's length, which follows the u32 fields before it.
    string_at = 4 * p.LAYOUTS[kind][1].index("p")
    overrun[string_at : string_at + 2] = b"\xff\xff"
    return [
        ("failing", frame, errno.ENOENT),
        ("empty", p.HEADER.pack(kind, 0), errno.EINVAL),
        (
            "truncated",
            p.HEADER.pack(kind, len(payload) - 1) + payload[:-1],
            errno.EINVAL,
        ),
        (
            "extended",
            p.HEADER.pack(kind, len(payload) + 1) + payload + b"\0",
            errno.EINVAL,
        ),
        (
            "string overrun",
            p.HEADER.pack(kind, len(payload)) + bytes(overrun),
            errno.EINVAL,
        ),
    ]


def check_good_requests(helper: HelperProcess, export: Path) -> None:
    """Send one request of each reply kind and check each reply's content."""
    inode = (export / "file").stat().st_ino
    opened = helper.client.call(p.Open(b"/file", os.O_RDONLY))
    try:
        assert opened.fd is not None
        assert os.fstat(opened.fd).st_ino == inode
    finally:
        close_reply(opened)
    assert parse_stat(helper.client.call(p.Lstat(b"/file")).payload).st_ino == inode
    target = helper.client.call(p.Readlink(b"/link", 100))
    assert parse_string(target.payload) == b"file"
    assert call_status(helper, p.Chmod(b"/file", 0o644)) == 0


def read_reply(helper: HelperProcess, kind: int) -> Reply:
    if kind in p.FD_REPLY_TYPES:
        return helper.client.read_fd_reply()
    return helper.client.read_frame_reply()


ALL_TYPES = list(range(p.T_GETVERSION + 1)) + [22, 0x80000000, 0xFFFFFFFF]


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_replies_stay_in_step(helper: HelperProcess, export: Path, kind: int) -> None:
    for label, frame, code in bad_frames(kind):
        lookup = kind != p.T_GETVERSION or supports_generation(export)
        if code == errno.ENOENT and not lookup:
            # On other file systems GETVERSION returns 0 without a lookup.
            continue
        helper.client.send_raw(frame)
        reply = read_reply(helper, kind)
        close_reply(reply)
        assert reply.status == -code, label
        assert reply.fd is None, label
        check_good_requests(helper, export)
        # Again, with the good request in the same write as the bad one.
        good = p.encode_request(p.Lstat(b"/file"))
        helper.client.send_raw(frame + good)
        reply = read_reply(helper, kind)
        close_reply(reply)
        assert reply.status == -code, label
        st = parse_stat(helper.client.read_frame_reply().payload)
        assert st.st_ino == (export / "file").stat().st_ino, label


# Paths longer than PATH_MAX, made of ordinary components.

DEPTH = 40
COMPONENT = 200


class DeepTree(NamedTuple):
    root: Path
    # The deepest directory's path in the export, over PATH_MAX bytes.
    path: bytes
    # A descriptor of that directory, for checks on the host.
    fd: int


@pytest.fixture
def deep_tree(export: Path) -> Iterator[DeepTree]:
    """An export with DEPTH nested directories of COMPONENT-byte names.

    The host creates them through directory descriptors, as no path to the
    deepest ones fits in PATH_MAX. The deepest contains "file" (with xattr
    user.k) and "link", a symlink to it.
    """
    names = [b"%02d" % level + b"d" * (COMPONENT - 2) for level in range(DEPTH)]
    fd = os.open(export, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, 0o755, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file = os.open("file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        try:
            os.write(file, b"hello world")
            os.setxattr(file, "user.k", b"abc")
        finally:
            os.close(file)
        os.symlink("file", "link", dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise
    path = b"/" + b"/".join(names)
    assert len(path) > 4096
    try:
        yield DeepTree(export, path, fd)
    finally:
        os.close(fd)


def deep_stat(tree: DeepTree, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=tree.fd, follow_symlinks=False)


def deep_exists(tree: DeepTree, name: str) -> bool:
    try:
        deep_stat(tree, name)
    except FileNotFoundError:
        return False
    return True


def deep_xattrs(tree: DeepTree, name: str) -> dict[str, bytes]:
    fd = os.open(name, os.O_RDONLY, dir_fd=tree.fd)
    try:
        return {key: os.getxattr(fd, key) for key in os.listxattr(fd)}
    finally:
        os.close(fd)


def check_deep_open(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Open(tree.path + b"/file", os.O_RDONLY))
    try:
        assert reply.fd is not None
        assert os.read(reply.fd, 100) == b"hello world"
    finally:
        close_reply(reply)


def check_deep_create(helper: HelperProcess, tree: DeepTree) -> None:
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
    request = p.Create(tree.path + b"/new", flags, 0o640, 1000, 1001)
    reply = helper.client.call(request)
    try:
        assert reply.fd is not None
        os.write(reply.fd, b"data")
    finally:
        close_reply(reply)
    st = deep_stat(tree, "new")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 4


def check_deep_mknod(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Mknod(1000, 1000, tree.path + b"/fifo", FIFO_MODE, 0)
    assert call_status(helper, request) == 0
    st = deep_stat(tree, "fifo")
    assert stat.S_ISFIFO(st.st_mode)
    assert st.st_uid == 1000


def check_deep_mkdir(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Mkdir(1000, 1000, tree.path + b"/sub", 0o750)
    assert call_status(helper, request) == 0
    st = deep_stat(tree, "sub")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750


def check_deep_mkdir_name_max(helper: HelperProcess, tree: DeepTree) -> None:
    name = b"n" * 255
    request = p.Mkdir(0, 0, tree.path + b"/" + name, 0o755)
    assert call_status(helper, request) == 0
    assert stat.S_ISDIR(deep_stat(tree, name.decode()).st_mode)


def check_deep_symlink(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Symlink(0, 0, b"file", tree.path + b"/sym")
    assert call_status(helper, request) == 0
    assert os.readlink("sym", dir_fd=tree.fd) == "file"


def check_deep_link(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Link(tree.path + b"/file", tree.path + b"/hard")
    assert call_status(helper, request) == 0
    assert deep_stat(tree, "hard").st_ino == deep_stat(tree, "file").st_ino


def check_deep_link_to_top(helper: HelperProcess, tree: DeepTree) -> None:
    assert call_status(helper, p.Link(tree.path + b"/file", b"/top")) == 0
    assert (tree.root / "top").stat().st_ino == deep_stat(tree, "file").st_ino


def check_deep_lstat(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Lstat(tree.path + b"/link"))
    st = parse_stat(reply.payload)
    assert st.st_ino == deep_stat(tree, "link").st_ino
    assert stat.S_ISLNK(st.st_mode)


def check_deep_readlink(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Readlink(tree.path + b"/link", 4096))
    assert parse_string(reply.payload) == b"file"


def check_deep_statfs(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Statfs(tree.path + b"/file"))
    assert parse_statfs(reply.payload).f_blocks == os.statvfs(tree.root).f_blocks


def check_deep_chmod(helper: HelperProcess, tree: DeepTree) -> None:
    assert call_status(helper, p.Chmod(tree.path + b"/file", 0o600)) == 0
    assert stat.S_IMODE(deep_stat(tree, "file").st_mode) == 0o600


def check_deep_chown(helper: HelperProcess, tree: DeepTree) -> None:
    assert call_status(helper, p.Chown(tree.path + b"/link", 1234, 5678)) == 0
    st = deep_stat(tree, "link")
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def check_deep_truncate(helper: HelperProcess, tree: DeepTree) -> None:
    assert call_status(helper, p.Truncate(tree.path + b"/file", 5)) == 0
    assert deep_stat(tree, "file").st_size == 5


def check_deep_utime(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Utime(tree.path + b"/file", 10, 20, 30, 40)
    assert call_status(helper, request) == 0
    assert deep_stat(tree, "file").st_mtime_ns == 30_000_000_040


def check_deep_rename(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Rename(tree.path + b"/file", tree.path + b"/renamed")
    assert call_status(helper, request) == 0
    assert deep_exists(tree, "renamed")
    assert not deep_exists(tree, "file")


def check_deep_rename_to_top(helper: HelperProcess, tree: DeepTree) -> None:
    assert call_status(helper, p.Rename(tree.path + b"/file", b"/top")) == 0
    assert (tree.root / "top").read_bytes() == b"hello world"
    assert not deep_exists(tree, "file")


def check_deep_rename_from_top(helper: HelperProcess, tree: DeepTree) -> None:
    (tree.root / "top").write_bytes(b"top")
    assert call_status(helper, p.Rename(b"/top", tree.path + b"/down")) == 0
    assert deep_stat(tree, "down").st_size == 3
    assert not (tree.root / "top").exists()


def check_deep_remove(helper: HelperProcess, tree: DeepTree) -> None:
    assert call_status(helper, p.Remove(tree.path + b"/file")) == 0
    assert not deep_exists(tree, "file")


def check_deep_remove_dir(helper: HelperProcess, tree: DeepTree) -> None:
    os.mkdir("empty", dir_fd=tree.fd)
    assert call_status(helper, p.Remove(tree.path + b"/empty")) == 0
    assert not deep_exists(tree, "empty")


def check_deep_lgetxattr(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Lgetxattr(100, tree.path + b"/file", b"user.k"))
    assert parse_string(reply.payload) == b"abc"


def check_deep_llistxattr(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Llistxattr(100, tree.path + b"/file"))
    assert parse_string(reply.payload) == b"user.k\0"


def check_deep_lsetxattr(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Lsetxattr(tree.path + b"/file", b"user.new", b"value", 5, 0)
    assert call_status(helper, request) == 0
    assert deep_xattrs(tree, "file")["user.new"] == b"value"


def check_deep_lremovexattr(helper: HelperProcess, tree: DeepTree) -> None:
    request = p.Lremovexattr(tree.path + b"/file", b"user.k")
    assert call_status(helper, request) == 0
    assert deep_xattrs(tree, "file") == {}


def check_deep_getversion(helper: HelperProcess, tree: DeepTree) -> None:
    reply = helper.client.call(p.Getversion(tree.path + b"/file"))
    fd = os.open("file", os.O_RDONLY, dir_fd=tree.fd)
    try:
        generation = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
    finally:
        os.close(fd)
    assert reply.status == 0
    assert parse_u64(reply.payload) == parse_u64(generation)


DEEP_CHECKS: list[Callable[[HelperProcess, DeepTree], None]] = [
    check_deep_open,
    check_deep_create,
    check_deep_mknod,
    check_deep_mkdir,
    check_deep_mkdir_name_max,
    check_deep_symlink,
    check_deep_link,
    check_deep_link_to_top,
    check_deep_lstat,
    check_deep_readlink,
    check_deep_statfs,
    check_deep_chmod,
    check_deep_chown,
    check_deep_truncate,
    check_deep_utime,
    check_deep_rename,
    check_deep_rename_to_top,
    check_deep_rename_from_top,
    check_deep_remove,
    check_deep_remove_dir,
    check_deep_lgetxattr,
    check_deep_llistxattr,
    check_deep_lsetxattr,
    check_deep_lremovexattr,
    check_deep_getversion,
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize(
    "check",
    DEEP_CHECKS,
    ids=[check.__name__.removeprefix("check_") for check in DEEP_CHECKS],
)
def test_long_path_requests_work(
    helper_command: list[str],
    deep_tree: DeepTree,
    check: Callable[[HelperProcess, DeepTree], None],
    sandbox: str,
) -> None:
    extra = ["--sandbox", sandbox]
    with running_helper(helper_command, deep_tree.root, extra) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        check(helper, deep_tree)


@pytest.mark.parametrize("deep", [False, True])
def test_name_over_name_max_rejected(
    helper_command: list[str], deep_tree: DeepTree, deep: bool
) -> None:
    parent = deep_tree.path if deep else b""
    long_name = parent + b"/" + b"n" * 256
    with running_helper(helper_command, deep_tree.root) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        mkdir = p.Mkdir(0, 0, long_name, 0o755)
        assert call_status(helper, mkdir) == -errno.ENAMETOOLONG
        assert helper.client.call(p.Lstat(long_name)).status == -errno.ENAMETOOLONG
        opened = helper.client.call(p.Open(long_name, os.O_RDONLY))
        close_reply(opened)
        assert opened.status == -errno.ENAMETOOLONG


def test_symlink_target_over_path_max(
    helper_command: list[str], deep_tree: DeepTree
) -> None:
    # A symlink's target is limited to PATH_MAX on any local file system.
    request = p.Symlink(0, 0, deep_tree.path, b"/toolong")
    with running_helper(helper_command, deep_tree.root) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        assert call_status(helper, request) == -errno.ENAMETOOLONG
    assert not (deep_tree.root / "toolong").exists()


@pytest.mark.parametrize("sandbox", ["namespace", "none", "chroot"])
def test_readonly_rejects_long_link_rename(
    helper_command: list[str], deep_tree: DeepTree, sandbox: str
) -> None:
    # Under chroot no read-only mount backs the policy up, so the policy
    # alone must reject every request that changes the export.
    extra = ["--readonly", "--sandbox", sandbox]
    with running_helper(helper_command, deep_tree.root, extra) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        link = p.Link(deep_tree.path + b"/file", deep_tree.path + b"/hard")
        assert call_status(helper, link) == -errno.EROFS
        rename = p.Rename(deep_tree.path + b"/file", b"/top")
        assert call_status(helper, rename) == -errno.EROFS
    assert not deep_exists(deep_tree, "hard")
    assert deep_exists(deep_tree, "file")
    assert not (deep_tree.root / "top").exists()
