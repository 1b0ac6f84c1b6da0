"""Attacks on the helper by a compromised QEMU, checked against a host area.

Each test places a "host" directory next to the export, with a canary file
and directory whose content, times, owner, mode and xattrs must not change.
A fanotify watch on the host area and on the two directories above the
export reports any open, read or change there by the helper, even one that
leaves no trace in stat. Every attack ends with `assert_contained`: nothing
outside the export was touched, the helper keeps no descriptor of it, and
the helper still replies. Each attack runs under both sandboxes.

Symlink targets name the host area by its real absolute path. The export
contains a decoy copy of those paths, so a confined helper acts on the
decoy and succeeds: the reply shows that the request was carried out, and
the checks show where.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import re
import shutil
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import HelperProcess, running_helper
from virtfs_proxy_helper import libc
from virtfs_proxy_helper import protocol as p
from virtfs_proxy_helper.client import Reply, parse_stat, parse_string

# Generous, because the tests share a noisy 2-core machine. A healthy helper
# replies in milliseconds.
REPLY_TIMEOUT = 10.0

CANARY_DATA = b"host secret\n"
DECOY_DATA = b"decoy inside the export\n"
EXPORT_DATA = b"export file\n"
# An owner that neither the helper nor a guest request uses, so that a
# CHOWN reaching the host area would show.
HOST_OWNER = (4242, 4343)
# An atime older than the ctime makes every read update it, even on a
# relatime mount, so a read of a file shows in stat as well as in the watch.
HOST_ATIME_NS = 1_000_000_000_000_000_000
HOST_MTIME_NS = 1_100_000_000_000_000_000

# Filesystems whose inodes carry a generation number, by statfs f_type:
# ext2/3/4, btrfs, xfs and reiserfs. Only there does GETVERSION look the
# path up.
GENERATION_FILESYSTEMS = frozenset({0xEF53, 0x9123683E, 0x58465342, 0x52654973})

# CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_SETGID,
# CAP_SETUID and CAP_MKNOD (bits 0, 1, 3, 4, 6, 7 and 27).
KEPT_CAPS = f"{0b1101_1011 | 1 << 27:016x}"

SANDBOXES = ["namespace", "chroot"]

# A prefix that makes any path longer than PATH_MAX (4096), so that the
# helper resolves it a chunk at a time. It ends in /dir, so "/.." follows.
LONG_PREFIX = b"/dir" + b"/." * 2100


def sandboxes(chroot_gap: str | None = None) -> list[object]:
    """Return the sandbox parameters, with chroot marked xfail if it has a gap."""
    if chroot_gap is None:
        return list(SANDBOXES)
    gap = pytest.mark.xfail(strict=True, reason=chroot_gap)
    return ["namespace", pytest.param("chroot", marks=gap)]


# fanotify, through ctypes: the standard library has no binding.

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_FAN_CLOEXEC = 0x1
_FAN_NONBLOCK = 0x2
# FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME (Linux 5.9): events
# carry the directory and name they concern, and creates and deletes are
# reported too.
_FAN_REPORT_FID_NAME = 0x200 | 0x400 | 0x800
_FAN_MARK_ADD = 0x1
_FAN_ONDIR = 0x40000000
_FAN_EVENT_ON_CHILD = 0x08000000
_FAN_EVENT_INFO_TYPE_DFID_NAME = 2
_AT_FDCWD = -100
# event_len, vers, reserved, metadata_len, mask, fd, pid.
_FAN_METADATA = struct.Struct("=IBBHQii")
# info_type, pad, len; then for a DFID_NAME record the fsid, the file
# handle's size and type, the handle and the name.
_FAN_INFO_HEADER = struct.Struct("=BBH")
_FAN_FID_HEADER = struct.Struct("=8sIi")
_FAN_EVENTS = {
    0x1: "ACCESS",
    0x2: "MODIFY",
    0x4: "ATTRIB",
    0x8: "CLOSE_WRITE",
    0x10: "CLOSE_NOWRITE",
    0x20: "OPEN",
    0x40: "MOVED_FROM",
    0x80: "MOVED_TO",
    0x100: "CREATE",
    0x200: "DELETE",
    0x400: "DELETE_SELF",
    0x800: "MOVE_SELF",
    0x1000: "OPEN_EXEC",
}
_FAN_Q_OVERFLOW = 0x4000
_FAN_ALL_EVENTS = sum(_FAN_EVENTS)


def _check_libc(result: int, call: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{call} failed: {os.strerror(code)}")
    return result


def _event_name(data: bytes, start: int, end: int) -> str:
    """Return the name in an event's DFID_NAME record, or "" if it has none."""
    offset = start
    while offset < end:
        kind, _, length = _FAN_INFO_HEADER.unpack_from(data, offset)
        if kind == _FAN_EVENT_INFO_TYPE_DFID_NAME:
            handle_at = offset + _FAN_INFO_HEADER.size
            _, handle_size, _ = _FAN_FID_HEADER.unpack_from(data, handle_at)
            name_at = handle_at + _FAN_FID_HEADER.size + handle_size
            return data[name_at : offset + length].split(b"\0")[0].decode()
        offset += length
    return ""


class HelperWatch:
    """fanotify marks that record what one process does in a few directories.

    Only events caused by `pid` count, so that a find or a backup that
    walks the same directories does not fail a test on a shared machine.
    The marks on `with_entries` also report opens, reads and changes of the
    entries directly inside them. The marks on `itself_only` report the
    directory itself and entries created, removed or renamed in it, because
    their other entries, such as the export, are the helper's to use.
    """

    def __init__(self, pid: int, with_entries: list[Path], itself_only: list[Path]):
        self.pid = pid
        flags = _FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_REPORT_FID_NAME
        self.fd = _check_libc(_LIBC.fanotify_init(flags, os.O_RDONLY), "fanotify_init")
        marks = [(path, _FAN_EVENT_ON_CHILD) for path in with_entries]
        marks += [(path, 0) for path in itself_only]
        try:
            for path, extra in marks:
                mask = _FAN_ALL_EVENTS | _FAN_ONDIR | extra
                result = _LIBC.fanotify_mark(
                    self.fd, _FAN_MARK_ADD, mask, _AT_FDCWD, os.fsencode(path)
                )
                _check_libc(result, f"fanotify_mark on {path}")
        except BaseException:
            os.close(self.fd)
            raise

    def read_events(self) -> list[str]:
        """Return the watched process's events so far, as "name: EVENTS"."""
        events = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                fields = _FAN_METADATA.unpack_from(data, offset)
                length, _, _, metadata_length, mask, _, pid = fields
                end = offset + length
                if mask & _FAN_Q_OVERFLOW:
                    events.append("queue overflow: events were lost")
                elif pid == self.pid:
                    name = _event_name(data, offset + metadata_length, end)
                    kinds = "|".join(
                        label for bit, label in _FAN_EVENTS.items() if mask & bit
                    )
                    events.append(f"{name}: {kinds}")
                offset = end

    def close(self) -> None:
        os.close(self.fd)


# The host area, and what must stay the same in it.


@dataclass(frozen=True)
class HostArea:
    """A directory next to the export, with a canary file and directory."""

    root: Path
    # The directories above the export, which an attacker would also aim
    # at: the test's tmp_path and pytest's base directory above it.
    aimed: tuple[Path, ...]

    @property
    def canary(self) -> Path:
        return self.root / "canary"

    @property
    def canary_dir(self) -> Path:
        return self.root / "canary-dir"


@pytest.fixture
def host(tmp_path: Path) -> HostArea:
    area = HostArea(tmp_path / "host", (tmp_path, tmp_path.parent))
    area.root.mkdir()
    area.canary.write_bytes(CANARY_DATA)
    os.setxattr(area.canary, "user.canary", b"host")
    area.canary_dir.mkdir()
    (area.canary_dir / "inner").write_bytes(CANARY_DATA)
    modes = {
        area.canary_dir / "inner": 0o600,
        area.canary_dir: 0o750,
        area.canary: 0o640,
        area.root: 0o750,
    }
    for path, mode in modes.items():
        os.chown(path, *HOST_OWNER)
        os.chmod(path, mode)
        os.utime(path, ns=(HOST_ATIME_NS, HOST_MTIME_NS))
    return area


EntryState = tuple[int, int, int, int, int, int, int | None, int, int, object, object]


def list_noatime(directory: Path) -> list[str]:
    """List `directory` through an O_NOATIME descriptor, leaving its atime."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def entry_state(path: Path) -> EntryState:
    """Return what an attack could change about `path`, reading it with
    O_NOATIME so that the check itself changes no atime."""
    content: object = None
    # readlink(2) updates a symlink's atime and has no O_NOATIME. Reading
    # first makes stat show the atime that reading leaves, every time.
    if path.is_symlink():
        content = os.readlink(path)

    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        content = list_noatime(path)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        try:
            content = os.read(fd, 1 << 20)
        finally:
            os.close(fd)

    # Any process that lists a directory updates its atime, and the watch
    # records the helper's own reads, so directory atimes are left out.
    atime = None if stat.S_ISDIR(st.st_mode) else st.st_atime_ns
    xattrs = sorted(
        (name, os.getxattr(path, name, follow_symlinks=False))
        for name in os.listxattr(path, follow_symlinks=False)
    )
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_nlink,
        st.st_ino,
        atime,
        st.st_mtime_ns,
        st.st_ctime_ns,
        content,
        xattrs,
    )


def tree_state(root: Path) -> dict[str, EntryState]:
    """Return `entry_state` of `root` and of everything below it."""
    state = {}
    pending = [root]
    while pending:
        path = pending.pop()
        entry = entry_state(path)
        state[str(path.relative_to(root))] = entry
        if stat.S_ISDIR(entry[0]):
            pending.extend(path / name for name in list_noatime(path))
    return state


def host_state(host: HostArea) -> dict[str, object]:
    """Return the state of the host area and of the aimed directories.

    The aimed directories hold other tests' files, so only the directories
    themselves (listing, times, owner, mode) are compared, not their trees.
    """
    state: dict[str, object] = {"host": tree_state(host.root)}
    for directory in host.aimed:
        state[str(directory)] = entry_state(directory)
    return state


def inodes_below(*roots: Path) -> set[tuple[int, int]]:
    """Return (st_dev, st_ino) of `roots` and of every entry below them."""
    found = set()
    for root in roots:
        st = os.lstat(root)
        found.add((st.st_dev, st.st_ino))
        for directory, subdirs, files in os.walk(root):
            for name in subdirs + files:
                st = os.lstat(Path(directory, name))
                found.add((st.st_dev, st.st_ino))
    return found


def helper_inodes(pid: int) -> dict[str, tuple[int, int]]:
    """Return (st_dev, st_ino) of each descriptor the helper holds."""
    inodes = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        inodes[fd] = (st.st_dev, st.st_ino)
    return inodes


# The export: decoys of the host paths, and symlinks that aim outside.


def mirror_of(export: Path, host_path: Path) -> Path:
    """Return where absolute `host_path` resolves inside a confined export."""
    return export / host_path.relative_to("/")


def make_decoy(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "canary").write_bytes(DECOY_DATA)
    os.setxattr(directory / "canary", "user.canary", b"decoy")
    (directory / "canary-dir").mkdir()
    (directory / "canary-dir" / "inner").write_bytes(DECOY_DATA)


def symlink_targets(host: HostArea) -> dict[str, str]:
    """Return the export's symlinks, by name, and their targets."""
    root = str(host.root)
    canary = str(host.canary)
    return {
        "hostdir": root,
        "sibling-dir": "../host",
        "canary": canary,
        "sibling": "../host/canary",
        "climb": "../" * 12 + canary.lstrip("/"),
        "passwd": "/etc/passwd",
        "proc-root": "/proc/self/root" + canary,
        "canary-dir": str(host.canary_dir),
        # Dangling: CREATE without O_EXCL creates the target of these.
        "planted": root + "/planted",
        "planted-rel": "../host/planted",
        "planted-parent": str(host.aimed[1] / "planted"),
        "planted-etc": "/etc/planted",
        "planted-proc": "/proc/self/root" + root + "/planted",
    }


def build_export(export: Path, host: HostArea) -> None:
    """Fill `export` afresh: a file, a directory, decoys and symlinks.

    Removes whatever is in it first, keeping the export's own inode, which
    is the helper's root.
    """
    for entry in export.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (export / "file").write_bytes(EXPORT_DATA)
    (export / "dir").mkdir()
    make_decoy(mirror_of(export, host.root))
    make_decoy(export / "host")
    (export / "etc").mkdir()
    (export / "etc" / "passwd").write_bytes(DECOY_DATA)
    for name, target in symlink_targets(host).items():
        os.symlink(target, export / name)


@pytest.fixture
def built_export(export: Path, host: HostArea) -> Path:
    build_export(export, host)
    return export


@pytest.fixture
def plain_export(export: Path) -> Path:
    (export / "file").write_bytes(EXPORT_DATA)
    (export / "dir").mkdir()
    os.symlink("file", export / "link")
    return export


# Starting the helper, and the checks every attack ends with.


@dataclass
class Session:
    """A helper under attack, its export and the host area around it."""

    helper: HelperProcess
    # The helper's own pid, which differs from helper.pid under strace.
    pid: int
    export: Path
    host: HostArea
    watch: HelperWatch
    before: dict[str, object]

    def call(self, request: p.Request) -> Reply:
        return self.helper.client.call(request)


def traced_child(pid: int) -> int:
    """Return the pid of the only child of `pid`: the process strace runs."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return int(children.read().split()[0])


@contextmanager
def attack(
    command: list[str],
    export: Path,
    host: HostArea,
    sandbox: str,
    options: tuple[str, ...] = (),
    traced: bool = False,
    watched_pid: int | None = None,
) -> Iterator[Session]:
    """Start the helper on `export`, then record and watch the host area.

    With `traced`, `command` is strace followed by the helper's command.
    The watch records the helper's events, or those of `watched_pid`.
    """
    extra = ["--sandbox", sandbox, *options]
    with running_helper(command, export, extra) as helper:
        helper.client.sock.settimeout(REPLY_TIMEOUT)
        # One round trip guarantees that start-up (confinement, capabilities,
        # seccomp) is done before the first attack.
        assert helper.client.call(p.Lstat(b"/")).status == 0
        pid = traced_child(helper.pid) if traced else helper.pid
        before = host_state(host)
        watch = HelperWatch(
            pid if watched_pid is None else watched_pid,
            [host.root, host.canary_dir],
            list(host.aimed),
        )
        try:
            yield Session(helper, pid, export, host, watch, before)
        finally:
            watch.close()


def assert_contained(session: Session) -> None:
    """Assert that nothing outside the export was touched, and that the
    helper keeps no descriptor of it and still replies."""
    assert session.watch.read_events() == []
    assert host_state(session.host) == session.before
    outside = inodes_below(session.host.root) | {
        (os.lstat(path).st_dev, os.lstat(path).st_ino) for path in session.host.aimed
    }
    descriptors = helper_inodes(session.pid)
    on_outside = {fd: inode for fd, inode in descriptors.items() if inode in outside}
    assert on_outside == {}
    assert session.helper.process.poll() is None
    assert session.call(p.Lstat(b"/")).status == 0


class _Descriptor:
    """The expected reply is a descriptor of a file inside the export."""


class _InsideStat:
    """The expected reply is an LSTAT of a file inside the export."""


DESCRIPTOR = _Descriptor()
INSIDE_STAT = _InsideStat()
Expected = int | bytes | _Descriptor | _InsideStat


def check_reply(session: Session, label: str, reply: Reply, expected: Expected) -> None:
    """Check a reply against `expected`: a descriptor or an LSTAT of a file
    inside the export, a status (0 or -errno), or the bytes of a one-string
    payload."""
    try:
        if isinstance(expected, _Descriptor):
            assert reply.fd is not None, f"{label}: status {reply.status}"
            st = os.fstat(reply.fd)
            inside = inodes_below(session.export)
            assert (st.st_dev, st.st_ino) in inside, label
        elif isinstance(expected, _InsideStat):
            # stat(2) generates no fanotify event, so the reply's inode is the
            # only sign of where the helper looked.
            assert reply.status == 0, label
            st = parse_stat(reply.payload)
            inside = inodes_below(session.export)
            assert (st.st_dev, st.st_ino) in inside, label
        elif isinstance(expected, bytes):
            assert reply.status == 0, label
            assert parse_string(reply.payload) == expected, label
        else:
            assert reply.status == expected, label
    finally:
        if reply.fd is not None:
            os.close(reply.fd)


def plant_and_remove(directory: Path) -> None:
    (directory / "planted").touch()
    (directory / "planted").unlink()


# What a helper that escaped would do to the host area, done by the test.
HOST_TOUCHES: dict[str, Callable[[HostArea], object]] = {
    "read": lambda h: h.canary.read_bytes(),
    "list": lambda h: os.listdir(h.canary_dir),
    "chmod": lambda h: os.chmod(h.canary, 0o640),
    "plant": lambda h: plant_and_remove(h.aimed[1]),
}


@pytest.mark.parametrize("touch", list(HOST_TOUCHES))
def test_containment_check_detects_touch(
    helper_command: list[str], plain_export: Path, host: HostArea, touch: str
) -> None:
    # Without this, a check that never fails would let every attack pass.
    # The watch follows this process, which plays the escaped helper.
    with attack(
        helper_command, plain_export, host, "namespace", watched_pid=os.getpid()
    ) as session:
        HOST_TOUCHES[touch](host)
        with pytest.raises(AssertionError):
            assert_contained(session)


def generation_supported(root: Path) -> bool:
    return libc.statfs(os.fsencode(root)).f_type in GENERATION_FILESYSTEMS


# Paths that name the host area's directory if resolved outside the export.
# Each maps the host area's absolute path to the path sent.
CLIMBS: dict[str, Callable[[bytes], bytes]] = {
    "abs-link": lambda root: b"/hostdir",
    "rel-link": lambda root: b"/sibling-dir",
    "dotdot": lambda root: b"/../../../.." + root,
    "rel-dotdot": lambda root: b"../../../.." + root,
    "dir-dotdot": lambda root: b"/dir/../../../../.." + root,
    # Over PATH_MAX, so the helper resolves them a chunk at a time.
    "long-dotdot": lambda root: b"/" + b"../" * 1400 + root.lstrip(b"/"),
    "long-link": lambda root: b"/dir" + b"/." * 2100 + b"/../hostdir",
    "proc-root": lambda root: b"/proc/self/root" + root,
}

VALUE = b"v"
ClimbOp = tuple[str, Callable[[bytes], p.Request], Expected]
CLIMBING_OPS: list[ClimbOp] = [
    ("LSTAT", lambda d: p.Lstat(d + b"/canary"), INSIDE_STAT),
    ("OPEN read", lambda d: p.Open(d + b"/canary", os.O_RDONLY), DESCRIPTOR),
    ("OPEN write", lambda d: p.Open(d + b"/canary", os.O_RDWR), DESCRIPTOR),
    (
        "OPEN truncate",
        lambda d: p.Open(d + b"/canary", os.O_WRONLY | os.O_TRUNC),
        DESCRIPTOR,
    ),
    (
        "OPEN directory",
        lambda d: p.Open(d + b"/canary-dir", os.O_RDONLY | os.O_DIRECTORY),
        DESCRIPTOR,
    ),
    (
        "CREATE new",
        lambda d: p.Create(
            d + b"/planted", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0
        ),
        DESCRIPTOR,
    ),
    (
        "CREATE existing",
        lambda d: p.Create(d + b"/canary", os.O_CREAT | os.O_RDWR, 0o644, 0, 0),
        DESCRIPTOR,
    ),
    ("MKNOD", lambda d: p.Mknod(0, 0, d + b"/fifo", stat.S_IFIFO | 0o600, 0), 0),
    ("MKDIR", lambda d: p.Mkdir(0, 0, d + b"/newdir", 0o755), 0),
    ("SYMLINK", lambda d: p.Symlink(0, 0, b"/etc/shadow", d + b"/newlink"), 0),
    ("LINK from", lambda d: p.Link(d + b"/canary", b"/stolen"), 0),
    ("LINK into", lambda d: p.Link(b"/file", d + b"/planted"), 0),
    ("RENAME from", lambda d: p.Rename(d + b"/canary", b"/stolen"), 0),
    ("RENAME into", lambda d: p.Rename(b"/file", d + b"/canary"), 0),
    ("CHMOD", lambda d: p.Chmod(d + b"/canary", 0o4777), 0),
    ("CHOWN", lambda d: p.Chown(d + b"/canary", 1000, 1000), 0),
    ("TRUNCATE", lambda d: p.Truncate(d + b"/canary", 0), 0),
    ("UTIME", lambda d: p.Utime(d + b"/canary", 0, 0, 0, 0), 0),
    ("STATFS", lambda d: p.Statfs(d + b"/canary"), 0),
    ("GETVERSION", lambda d: p.Getversion(d + b"/canary"), 0),
    (
        "LSETXATTR",
        lambda d: p.Lsetxattr(d + b"/canary", b"user.attack", VALUE, 1, 0),
        0,
    ),
    ("LGETXATTR", lambda d: p.Lgetxattr(100, d + b"/canary", b"user.canary"), b"decoy"),
    ("LLISTXATTR", lambda d: p.Llistxattr(100, d + b"/canary"), b"user.canary\0"),
    ("LREMOVEXATTR", lambda d: p.Lremovexattr(d + b"/canary", b"user.canary"), 0),
    ("READLINK", lambda d: p.Readlink(d + b"/canary", 100), -errno.EINVAL),
    ("REMOVE", lambda d: p.Remove(d + b"/canary"), 0),
    ("REMOVE inner", lambda d: p.Remove(d + b"/canary-dir/inner"), 0),
    ("REMOVE directory", lambda d: p.Remove(d + b"/canary-dir"), -errno.ENOTEMPTY),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("climb", list(CLIMBS))
def test_climbing_paths_stay_inside(
    helper_command: list[str],
    built_export: Path,
    host: HostArea,
    sandbox: str,
    climb: str,
) -> None:
    directory = CLIMBS[climb](os.fsencode(host.root))
    with attack(helper_command, built_export, host, sandbox) as session:
        for label, build, expected in CLIMBING_OPS:
            if label == "GETVERSION" and not generation_supported(built_export):
                # Elsewhere GETVERSION returns 0 without looking the path up.
                expected = 0
            elif climb == "proc-root":
                # No procfs inside the export, so its magic links are absent.
                expected = -errno.ENOENT
            check_reply(session, label, session.call(build(directory)), expected)
            build_export(built_export, host)
        assert_contained(session)


# Requests on a symlink itself, whose target is outside.

LinkOp = tuple[str, Callable[[bytes], p.Request], Expected, Expected]
# Each op: label, request on the link, the reply when the target resolves
# to a decoy, and the reply when it resolves to nothing.
FINAL_LINK_OPS: list[LinkOp] = [
    ("OPEN read", lambda s: p.Open(s, os.O_RDONLY), DESCRIPTOR, -errno.ENOENT),
    ("OPEN write", lambda s: p.Open(s, os.O_RDWR), DESCRIPTOR, -errno.ENOENT),
    (
        "OPEN truncate",
        lambda s: p.Open(s, os.O_WRONLY | os.O_TRUNC),
        DESCRIPTOR,
        -errno.ENOENT,
    ),
    (
        "OPEN nofollow",
        lambda s: p.Open(s, os.O_RDONLY | os.O_NOFOLLOW),
        -errno.ELOOP,
        -errno.ELOOP,
    ),
    (
        "CREATE",
        lambda s: p.Create(s, os.O_CREAT | os.O_RDWR, 0o644, 0, 0),
        DESCRIPTOR,
        -errno.ENOENT,
    ),
    (
        "CREATE excl",
        lambda s: p.Create(s, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0),
        -errno.EEXIST,
        -errno.EEXIST,
    ),
    ("CHMOD", lambda s: p.Chmod(s, 0o777), 0, -errno.ENOENT),
    ("TRUNCATE", lambda s: p.Truncate(s, 0), 0, -errno.ENOENT),
    ("STATFS", lambda s: p.Statfs(s), 0, -errno.ENOENT),
    ("GETVERSION", lambda s: p.Getversion(s), 0, -errno.ENOENT),
    # The rest act on the link itself, never on its target.
    ("LSTAT", lambda s: p.Lstat(s), INSIDE_STAT, INSIDE_STAT),
    ("CHOWN", lambda s: p.Chown(s, 1000, 1000), 0, 0),
    ("UTIME", lambda s: p.Utime(s, 0, 0, 0, 0), 0, 0),
    (
        "LSETXATTR user",
        lambda s: p.Lsetxattr(s, b"user.attack", VALUE, 1, 0),
        -errno.EPERM,
        -errno.EPERM,
    ),
    (
        "LSETXATTR trusted",
        lambda s: p.Lsetxattr(s, b"trusted.attack", VALUE, 1, 0),
        -errno.EPERM,
        -errno.EPERM,
    ),
    ("LINK from", lambda s: p.Link(s, b"/stolen"), 0, 0),
    ("LINK onto", lambda s: p.Link(b"/file", s), -errno.EEXIST, -errno.EEXIST),
    ("RENAME from", lambda s: p.Rename(s, b"/moved"), 0, 0),
    ("RENAME onto", lambda s: p.Rename(b"/file", s), 0, 0),
    ("REMOVE", lambda s: p.Remove(s), 0, 0),
]


def link_paths(name: str) -> dict[str, bytes]:
    """Return the paths of the export's symlink `name`, short and long."""
    return {
        "short": b"/" + name.encode(),
        "long": LONG_PREFIX + b"/../" + name.encode(),
    }


# Symlink name in the export, and whether its target resolves to a decoy.
FINAL_LINKS = [
    ("canary", True),
    ("sibling", True),
    ("climb", True),
    ("passwd", True),
    ("proc-root", False),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize(
    ("name", "resolves"), FINAL_LINKS, ids=[name for name, _ in FINAL_LINKS]
)
def test_symlink_to_host_stays_inside(
    helper_command: list[str],
    built_export: Path,
    host: HostArea,
    sandbox: str,
    name: str,
    resolves: bool,
) -> None:
    target = os.fsencode(symlink_targets(host)[name])
    with attack(helper_command, built_export, host, sandbox) as session:
        for form, path in link_paths(name).items():
            # READLINK hands out the target string, and nothing else.
            reply = session.call(p.Readlink(path, 4096))
            check_reply(session, f"READLINK {form}", reply, target)
            for label, build, on_decoy, on_nothing in FINAL_LINK_OPS:
                expected = on_decoy if resolves else on_nothing
                if label == "GETVERSION" and not generation_supported(built_export):
                    expected = 0
                reply = session.call(build(path))
                check_reply(session, f"{label} {form}", reply, expected)
                build_export(built_export, host)
        assert_contained(session)


# Dangling symlinks whose target is a new name outside the export.

# Symlink name, and where its target is created inside the export, as a
# function of the export and the host area (None: nowhere, ENOENT).
DANGLING_LINKS: list[tuple[str, Callable[[Path, HostArea], Path | None]]] = [
    ("planted", lambda e, h: mirror_of(e, h.root) / "planted"),
    ("planted-rel", lambda e, h: e / "host" / "planted"),
    ("planted-parent", lambda e, h: mirror_of(e, h.aimed[1]) / "planted"),
    ("planted-etc", lambda e, h: e / "etc" / "planted"),
    ("planted-proc", lambda e, h: None),
]

CREATE_FLAGS = [
    ("CREATE", os.O_CREAT | os.O_RDWR),
    ("CREATE truncate", os.O_CREAT | os.O_WRONLY | os.O_TRUNC),
]

DanglingOp = tuple[str, Callable[[bytes], p.Request], int]
DANGLING_OPS: list[DanglingOp] = [
    ("OPEN", lambda s: p.Open(s, os.O_RDWR), -errno.ENOENT),
    ("CHMOD", lambda s: p.Chmod(s, 0o777), -errno.ENOENT),
    ("TRUNCATE", lambda s: p.Truncate(s, 0), -errno.ENOENT),
    ("STATFS", lambda s: p.Statfs(s), -errno.ENOENT),
    # These do not follow a final symlink: the name exists.
    ("MKDIR", lambda s: p.Mkdir(0, 0, s, 0o755), -errno.EEXIST),
    ("MKNOD", lambda s: p.Mknod(0, 0, s, stat.S_IFIFO | 0o600, 0), -errno.EEXIST),
    ("SYMLINK", lambda s: p.Symlink(0, 0, b"x", s), -errno.EEXIST),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_dangling_symlink_creates_inside(
    helper_command: list[str], built_export: Path, host: HostArea, sandbox: str
) -> None:
    with attack(helper_command, built_export, host, sandbox) as session:
        for name, created_at in DANGLING_LINKS:
            created = created_at(built_export, host)
            for form, path in link_paths(name).items():
                for label, flags in CREATE_FLAGS:
                    request = p.Create(path, flags, 0o4755, 1000, 1000)
                    expected = -errno.ENOENT if created is None else DESCRIPTOR
                    where = f"{label} {name} {form}"
                    check_reply(session, where, session.call(request), expected)
                    if created is not None:
                        assert created.is_file(), where
                    build_export(built_export, host)
                for label, build, code in DANGLING_OPS:
                    reply = session.call(build(path))
                    check_reply(session, f"{label} {name} {form}", reply, code)
        assert_contained(session)


# Creating names in the directories above the export.

AIMED_OPS: list[tuple[str, Callable[[bytes], p.Request], Expected]] = [
    (
        "CREATE",
        lambda d: p.Create(
            d + b"/planted", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0
        ),
        DESCRIPTOR,
    ),
    ("MKDIR", lambda d: p.Mkdir(0, 0, d + b"/planted-dir", 0o755), 0),
    ("MKNOD", lambda d: p.Mknod(0, 0, d + b"/planted-fifo", stat.S_IFIFO, 0), 0),
    ("SYMLINK", lambda d: p.Symlink(0, 0, b"/", d + b"/planted-link"), 0),
    ("LINK", lambda d: p.Link(b"/file", d + b"/planted-hard"), 0),
    ("RENAME", lambda d: p.Rename(b"/dir", d + b"/planted-moved"), 0),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_aimed_dirs_get_nothing(
    helper_command: list[str],
    built_export: Path,
    host: HostArea,
    sandbox: str,
    long: bool,
) -> None:
    climb = b"/" + b"../" * (1400 if long else 8)
    with attack(helper_command, built_export, host, sandbox) as session:
        for aimed in host.aimed:
            directory = climb + os.fsencode(aimed).lstrip(b"/")
            for label, build, expected in AIMED_OPS:
                check_reply(session, label, session.call(build(directory)), expected)
                build_export(built_export, host)
        assert_contained(session)


# A host process swaps a directory of the export for a symlink between two
# requests, as a host user who can write the export could.

# Each target: the symlink's target, and the decoy it resolves to inside.
SWAP_TARGETS: dict[
    str, tuple[Callable[[HostArea], str], Callable[[Path, HostArea], Path]]
] = {
    "absolute": (lambda h: str(h.root), lambda e, h: mirror_of(e, h.root)),
    "relative": (lambda h: "../host", lambda e, h: e / "host"),
    "climbing": (
        lambda h: "../" * 12 + str(h.root).lstrip("/"),
        lambda e, h: mirror_of(e, h.root),
    ),
}

SWAP_OPS: list[tuple[str, p.Request, Expected]] = [
    ("LSTAT", p.Lstat(b"/dir/canary"), INSIDE_STAT),
    ("OPEN secret", p.Open(b"/dir/canary", os.O_RDONLY), DESCRIPTOR),
    (
        "OPEN directory",
        p.Open(b"/dir/canary-dir", os.O_RDONLY | os.O_DIRECTORY),
        DESCRIPTOR,
    ),
    (
        "CREATE",
        p.Create(b"/dir/f", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0),
        DESCRIPTOR,
    ),
    ("MKDIR", p.Mkdir(0, 0, b"/dir/x", 0o755), 0),
    ("MKNOD", p.Mknod(0, 0, b"/dir/fifo", stat.S_IFIFO | 0o600, 0), 0),
    ("SYMLINK", p.Symlink(0, 0, b"/", b"/dir/link"), 0),
    ("CHMOD", p.Chmod(b"/dir/canary", 0o777), 0),
    ("TRUNCATE", p.Truncate(b"/dir/canary", 0), 0),
    ("LSETXATTR", p.Lsetxattr(b"/dir/canary", b"user.attack", VALUE, 1, 0), 0),
    ("LINK", p.Link(b"/dir/canary-dir/inner", b"/stolen"), 0),
    ("RENAME", p.Rename(b"/dir/canary", b"/moved"), 0),
    ("REMOVE", p.Remove(b"/dir/canary-dir/inner"), 0),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("target", list(SWAP_TARGETS))
def test_dir_swapped_for_symlink(
    helper_command: list[str],
    built_export: Path,
    host: HostArea,
    sandbox: str,
    target: str,
) -> None:
    link_target, decoy = SWAP_TARGETS[target]
    with attack(helper_command, built_export, host, sandbox) as session:
        reply = session.call(p.Lstat(b"/dir"))
        assert stat.S_ISDIR(parse_stat(reply.payload).st_mode)
        (built_export / "dir").rmdir()
        os.symlink(link_target(host), built_export / "dir")
        for label, request, expected in SWAP_OPS:
            check_reply(session, label, session.call(request), expected)
        assert_contained(session)
    # The symlink resolved to the decoy, which received the new file.
    assert (decoy(built_export, host) / "f").is_file()


# A host process moves a directory out of the export while the helper
# walks `..` up from inside it.

MOVED_OUT_GAP = (
    "in chroot mode, paths longer than PATH_MAX are left to the kernel's "
    "lookup, which does not stop `..` at the export when a host writer moves "
    "a directory out during the lookup"
)
# On a 2-core VM the chroot helper escapes dozens of times in this time,
# the first within about a second. A confined helper uses all of it.
RACE_SECONDS = 3.0
# Requests per write: pipelining raises the rate of tries.
RACE_PIPELINE = 20
# A deep walk below /a keeps the lookup inside it long enough for the
# rename to land during it.
RACE_DEPTH = 100
# A directory name for padding a path over PATH_MAX with few components.
PADDING = b"p" * 200


def race_path(kind: str, host: HostArea) -> bytes:
    """Return a path that climbs from /a/d/.../d to the host's root, then
    names the canary, in the form `kind` sends."""
    path = b"a/" + b"/".join([b"d"] * RACE_DEPTH) + b"/.." * (RACE_DEPTH + 60)
    path += os.fsencode(host.canary)
    if kind == "long":
        # Padding that resolves back to the root puts the chunk boundary
        # inside /a, so the helper keeps a descriptor there between chunks.
        path = (PADDING + b"/../") * 19 + path
    return path if kind == "relative" else b"/" + path


# Each op: the request, and the form of its path. The relative OPEN skips
# the openat2 fence, which only takes absolute paths. The long OPEN is
# resolved a chunk at a time, with a descriptor kept between chunks.
RACE_OPS: dict[str, tuple[Callable[[bytes], p.Request], str]] = {
    "chmod": (lambda path: p.Chmod(path, 0o666), "absolute"),
    "open-relative": (lambda path: p.Open(path, os.O_RDONLY), "relative"),
    "open-long": (lambda path: p.Open(path, os.O_RDONLY), "long"),
}


class RenameLoop(threading.Thread):
    """Renames `source` to `destination` and back until stopped."""

    def __init__(self, source: Path, destination: Path):
        super().__init__(daemon=True)
        self.source = source
        self.destination = destination
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            os.rename(self.source, self.destination)
            os.rename(self.destination, self.source)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


RACE_CASES = [
    pytest.param(
        op,
        sandbox,
        marks=(
            # Not strict: the race may not come off within RACE_SECONDS.
            pytest.mark.xfail(strict=False, reason=MOVED_OUT_GAP)
            if (op, sandbox) == ("open-long", "chroot")
            else ()
        ),
    )
    for op in RACE_OPS
    for sandbox in SANDBOXES
]


@pytest.mark.parametrize(("op", "sandbox"), RACE_CASES)
def test_dir_moved_out_mid_request(
    helper_command: list[str],
    export: Path,
    host: HostArea,
    tmp_path: Path,
    sandbox: str,
    op: str,
) -> None:
    build, kind = RACE_OPS[op]
    request = build(race_path(kind, host))
    (export / "a" / "/".join(["d"] * RACE_DEPTH)).mkdir(parents=True)
    (export / os.fsdecode(PADDING)).mkdir()
    (tmp_path / "moved").mkdir()
    # No decoy here: inside the export the path names nothing, so any
    # success means the lookup left the export.
    escaped: list[Reply] = []
    # The helper refuses to send a descriptor while an earlier reply is
    # unread, which would hide an escaped OPEN, so OPENs go one at a time.
    pipeline = 1 if isinstance(request, p.Open) else RACE_PIPELINE
    frames = p.encode_request(request) * pipeline
    with attack(helper_command, export, host, sandbox) as session:
        client = session.helper.client
        flipper = RenameLoop(export / "a", tmp_path / "moved" / "a")
        flipper.start()
        try:
            deadline = time.monotonic() + RACE_SECONDS
            while not escaped and time.monotonic() < deadline:
                client.send_raw(frames)
                for _ in range(pipeline):
                    if isinstance(request, p.Open):
                        reply = client.read_fd_reply()
                    else:
                        reply = client.read_frame_reply()
                    if reply.status >= 0:
                        escaped.append(reply)
        finally:
            flipper.stop()
            for reply in escaped:
                if reply.fd is not None:
                    os.close(reply.fd)
        assert escaped == []
        assert_contained(session)


# Any process on the host renames a file of its own while the helper
# resolves `..`: openat2 then fails with EAGAIN, which means "retry".

EAGAIN_GAP = (
    "in chroot mode every lookup goes through openat2, whose bounded retries "
    "a nonstop rename loop can exhaust on a path with hundreds of `..`; QEMU "
    "itself never sends `..`"
)
EAGAIN_SECONDS = 2.0


@pytest.mark.parametrize("sandbox", sandboxes(chroot_gap=EAGAIN_GAP))
def test_host_renames_no_eagain(
    helper_command: list[str],
    plain_export: Path,
    host: HostArea,
    tmp_path: Path,
    sandbox: str,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a").touch()
    # Each `..` lets openat2 notice a rename anywhere on the system, so many
    # of them make the failure frequent enough to show within the tries.
    frames = p.encode_request(p.Open(b"/dir/.." * 500 + b"/file", os.O_RDONLY))
    failed: list[int] = []
    with attack(helper_command, plain_export, host, sandbox) as session:
        client = session.helper.client
        renamer = RenameLoop(elsewhere / "a", elsewhere / "b")
        renamer.start()
        try:
            deadline = time.monotonic() + EAGAIN_SECONDS
            while not failed and time.monotonic() < deadline:
                client.send_raw(frames * RACE_PIPELINE)
                for _ in range(RACE_PIPELINE):
                    reply = client.read_fd_reply()
                    if reply.fd is not None:
                        os.close(reply.fd)
                    # ETOOMANYREFS is the refusal of a descriptor while
                    # earlier replies are unread, not a failed lookup.
                    if reply.status not in (0, -errno.ETOOMANYREFS):
                        failed.append(reply.status)
        finally:
            renamer.stop()
        assert failed == []
        assert_contained(session)


# Device nodes made through the helper, then opened through it.

DEVICES = {
    "mem": (stat.S_IFCHR, os.makedev(1, 1)),
    "null": (stat.S_IFCHR, os.makedev(1, 3)),
    "zero": (stat.S_IFCHR, os.makedev(1, 5)),
    "loop": (stat.S_IFBLK, os.makedev(7, 0)),
}

DEVICE_OPS: list[tuple[str, Callable[[bytes], p.Request]]] = [
    ("OPEN read", lambda d: p.Open(d, os.O_RDONLY)),
    ("OPEN write", lambda d: p.Open(d, os.O_RDWR)),
    ("OPEN nonblock", lambda d: p.Open(d, os.O_WRONLY | os.O_NONBLOCK)),
    ("CREATE", lambda d: p.Create(d, os.O_CREAT | os.O_RDWR, 0o600, 0, 0)),
    ("CREATE no O_CREAT", lambda d: p.Create(d, os.O_RDWR, 0o600, 0, 0)),
    ("GETVERSION", lambda d: p.Getversion(d)),
]

# One openat or openat2 line of `strace -f -yy`: pid, the directory
# descriptor's path, the path, the flags, the result and its errno name.
STRACE_LINE = re.compile(
    r"^(?P<pid>\d+)\s+openat2?\((?:\d+|AT_FDCWD)(?:<(?P<dir>[^>]*)>)?,\s*"
    r'"(?P<path>(?:[^"\\]|\\.)*)",\s*(?P<flags>.*)\)\s+=\s+(?P<result>-?\d+)'
    r"(?:<.*>)?(?:\s+(?P<errno>E[A-Z0-9]+))?"
)


def device_opens(trace: str, names: set[str]) -> list[str]:
    """Return the traced opens without O_PATH of a file named in `names`.

    The helper reopens its O_PATH probe as openat(<its /proc/self/fd>, "N"),
    so the path of each descriptor is remembered to resolve such a reopen.
    An O_CREAT|O_EXCL open that fails with EEXIST opens nothing.
    """
    paths: dict[tuple[str, str], str] = {}
    offending = []
    for line in trace.splitlines():
        match = STRACE_LINE.match(line)
        if match is None:
            continue
        path = match["path"]
        if match["dir"] is not None and re.fullmatch(r"/proc/\d+/fd", match["dir"]):
            path = paths.get((match["pid"], path), path)
        flags = match["flags"]
        named = os.path.basename(path) in names
        exclusive = "O_EXCL" in flags and match["errno"] == "EEXIST"
        if named and "O_PATH" not in flags and not exclusive:
            offending.append(line)
        if int(match["result"]) >= 0:
            paths[(match["pid"], match["result"])] = path
    return offending


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_device_nodes_never_opened(
    helper_command: list[str], export: Path, host: HostArea, sandbox: str
) -> None:
    (export / "file").write_bytes(EXPORT_DATA)
    strace = shutil.which("strace")
    command = helper_command
    trace_file = host.aimed[0] / "trace"
    if strace is not None:
        command = [strace, "-f", "-yy", "-qq", "-e", "trace=openat,openat2"]
        command += ["-o", str(trace_file), *helper_command]
    names = {f"attack-{name}" for name in DEVICES}
    enxio = -errno.ENXIO
    traced = strace is not None

    with attack(command, export, host, sandbox, traced=traced) as session:
        for name, (kind, rdev) in DEVICES.items():
            node = f"/attack-{name}".encode()
            mknod = p.Mknod(0, 0, node, kind | 0o666, rdev)
            check_reply(session, f"MKNOD {name}", session.call(mknod), 0)
            os.symlink(f"attack-{name}", export / f"to-{name}")
            for path in (node, f"/to-{name}".encode()):
                for label, build in DEVICE_OPS:
                    expected = enxio
                    if label == "GETVERSION" and not generation_supported(export):
                        expected = 0
                    reply = session.call(build(path))
                    check_reply(session, f"{label} {path!r}", reply, expected)

        reply = session.call(p.Open(b"/file", os.O_RDONLY))
        check_reply(session, "OPEN file", reply, DESCRIPTOR)
        assert_contained(session)

        nodes = set()
        for name in names:
            st = os.lstat(export / name)
            nodes.add((st.st_dev, st.st_ino))
        descriptors = helper_inodes(session.pid)
        on_nodes = {fd: inode for fd, inode in descriptors.items() if inode in nodes}
        assert on_nodes == {}
        status, _ = session.helper.close()
        assert status == 0

    if strace is None:
        pytest.skip("strace is not installed: replies checked, opens not traced")
    trace = trace_file.read_text(errors="backslashreplace")
    # The regular file's open shows that the trace records opens at all.
    assert device_opens(trace, {"file"}) != []
    assert device_opens(trace, names) == []


# --nosuid: setuid and setgid bits, and file capabilities.

NOSUID_REQUESTS: list[tuple[str, p.Request, bytes]] = [
    (
        "CREATE new",
        p.Create(b"/new", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o4755, 1000, 1000),
        b"/new",
    ),
    (
        "CREATE existing",
        p.Create(b"/file", os.O_CREAT | os.O_RDWR, 0o6755, 0, 0),
        b"/file",
    ),
    ("MKDIR", p.Mkdir(1000, 1000, b"/sgid", 0o2755), b"/sgid"),
    ("MKNOD", p.Mknod(0, 0, b"/node", stat.S_IFREG | 0o4755, 0), b"/node"),
    ("CHMOD", p.Chmod(b"/file", 0o4755), b"/file"),
    ("CHMOD type bits", p.Chmod(b"/file", stat.S_IFREG | 0o6755), b"/file"),
    ("CHMOD all bits", p.Chmod(b"/file", 0xFFFFFFFF), b"/file"),
    ("CHMOD via symlink", p.Chmod(b"/link", 0o4755), b"/file"),
    ("CHMOD long path", p.Chmod(LONG_PREFIX + b"/../file", 0o4755), b"/file"),
]

# A version 2 capability xattr that grants CAP_SETUID (bit 7) when run.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 7, 0, 0, 0)

CAPABILITY_REQUESTS: list[tuple[str, bytes, bytes]] = [
    ("file", b"/file", b"security.capability"),
    ("trailing NUL", b"/file", b"security.capability\0"),
    ("directory", b"/dir", b"security.capability"),
    ("long path", LONG_PREFIX + b"/../file", b"security.capability"),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_nosuid_lstat_shows_no_setid(
    helper_command: list[str], plain_export: Path, host: HostArea, sandbox: str
) -> None:
    with attack(helper_command, plain_export, host, sandbox, ("--nosuid",)) as session:
        for label, request, checked in NOSUID_REQUESTS:
            expected: Expected = 0
            if isinstance(request, p.Create):
                expected = DESCRIPTOR
            check_reply(session, label, session.call(request), expected)
            mode = parse_stat(session.call(p.Lstat(checked)).payload).st_mode
            assert mode & (stat.S_ISUID | stat.S_ISGID) == 0, label
        assert_contained(session)


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_nosuid_rejects_file_capabilities(
    helper_command: list[str], plain_export: Path, host: HostArea, sandbox: str
) -> None:
    with attack(helper_command, plain_export, host, sandbox, ("--nosuid",)) as session:
        for label, path, name in CAPABILITY_REQUESTS:
            request = p.Lsetxattr(path, name, CAPABILITY, len(CAPABILITY), 0)
            check_reply(session, label, session.call(request), -errno.EPERM)
        assert_contained(session)
    for path in (plain_export / "file", plain_export / "dir"):
        assert "security.capability" not in os.listxattr(path)


# --readonly: every request that changes the export.

READONLY_MUTATIONS: list[p.Request] = [
    p.Create(b"/new", os.O_CREAT | os.O_RDWR, 0o644, 0, 0),
    p.Create(b"/file", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, 0, 0),
    p.Create(b"/", os.O_TMPFILE | os.O_RDWR, 0o644, 0, 0),
    p.Mknod(0, 0, b"/fifo", stat.S_IFIFO | 0o600, 0),
    p.Mkdir(0, 0, b"/newdir", 0o755),
    p.Symlink(0, 0, b"file", b"/newlink"),
    p.Link(b"/file", b"/hard"),
    p.Chmod(b"/file", 0o600),
    p.Chmod(b"/link", 0o600),
    p.Chown(b"/file", 1000, 1000),
    p.Truncate(b"/file", 0),
    p.Truncate(b"/link", 0),
    p.Utime(b"/file", 1, 0, 1, 0),
    p.Rename(b"/file", b"/moved"),
    p.Remove(b"/file"),
    p.Remove(b"/dir"),
    p.Lsetxattr(b"/file", b"user.attack", VALUE, 1, 0),
    p.Lremovexattr(b"/file", b"user.export"),
    p.Open(b"/file", os.O_WRONLY),
    p.Open(b"/file", os.O_RDWR),
    p.Open(b"/file", os.O_RDONLY | os.O_TRUNC),
    p.Open(b"/file", os.O_ACCMODE),
    # Over PATH_MAX, so each one goes through the chunked resolution.
    p.Mkdir(0, 0, LONG_PREFIX + b"/../newdir", 0o755),
    p.Chmod(LONG_PREFIX + b"/../file", 0o600),
    p.Truncate(LONG_PREFIX + b"/../file", 0),
    p.Remove(LONG_PREFIX + b"/../file"),
    p.Lsetxattr(LONG_PREFIX + b"/../file", b"user.attack", VALUE, 1, 0),
]


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_readonly_every_mutation_erofs(
    helper_command: list[str], plain_export: Path, host: HostArea, sandbox: str
) -> None:
    os.setxattr(plain_export / "file", "user.export", b"x")
    tree = tree_state(plain_export)
    with attack(
        helper_command, plain_export, host, sandbox, ("--readonly",)
    ) as session:
        for request in READONLY_MUTATIONS:
            label = f"{type(request).__name__} {request!r:.60}"
            check_reply(session, label, session.call(request), -errno.EROFS)
        assert_contained(session)
    assert tree_state(plain_export) == tree


READONLY_FD_GAP = (
    "chroot mode has no read-only mount, so a descriptor handed out under "
    "--readonly can be reopened or used for writing"
)


def reopen_for_writing(fd: int) -> None:
    os.close(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY))


def create_below(fd: int) -> None:
    os.close(os.open("planted", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))


READONLY_FD_USES: dict[str, tuple[p.Request, Callable[[int], None]]] = {
    "reopen": (p.Open(b"/file", os.O_RDONLY), reopen_for_writing),
    "openat": (p.Open(b"/dir", os.O_RDONLY | os.O_DIRECTORY), create_below),
}


@pytest.mark.parametrize("sandbox", sandboxes(chroot_gap=READONLY_FD_GAP))
@pytest.mark.parametrize("use", list(READONLY_FD_USES))
def test_readonly_descriptor_cannot_write(
    helper_command: list[str],
    plain_export: Path,
    host: HostArea,
    sandbox: str,
    use: str,
) -> None:
    request, write = READONLY_FD_USES[use]
    tree = tree_state(plain_export)
    with attack(
        helper_command, plain_export, host, sandbox, ("--readonly",)
    ) as session:
        reply = session.call(request)
        assert reply.fd is not None
        try:
            with pytest.raises(OSError) as raised:
                write(reply.fd)
        finally:
            os.close(reply.fd)
        assert raised.value.errno == errno.EROFS
        assert_contained(session)
    assert tree_state(plain_export) == tree


# Descriptors handed out: `..` from the export's root.

HANDED_OUT_GAP = (
    "chroot mode hands out descriptors on the host's mount, where `..` from "
    "the export's root leads to the directory above it"
)


@pytest.mark.parametrize("sandbox", sandboxes(chroot_gap=HANDED_OUT_GAP))
@pytest.mark.parametrize("path", [b"/", b"/dir"], ids=["root", "dir"])
def test_handed_out_dir_stays_inside(
    helper_command: list[str],
    plain_export: Path,
    host: HostArea,
    sandbox: str,
    path: bytes,
) -> None:
    root = os.lstat(plain_export)
    with attack(helper_command, plain_export, host, sandbox) as session:
        reply = session.call(p.Open(path, os.O_RDONLY | os.O_DIRECTORY))
        assert reply.fd is not None
        try:
            parent = os.open("../..", os.O_PATH | os.O_DIRECTORY, dir_fd=reply.fd)
        finally:
            os.close(reply.fd)
        try:
            st = os.fstat(parent)
        finally:
            os.close(parent)
        assert (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino)
        assert_contained(session)


# Descriptors that the peer attaches to its requests.

# Below SCM_MAX_FD (253), the kernel's maximum for one message.
ATTACHED_COUNTS = [1, 250]
ATTACHED_ROUNDS = 10

ATTACHED_REQUESTS: list[tuple[str, bytes, bool]] = [
    ("LSTAT", p.encode_request(p.Lstat(b"/file")), False),
    ("OPEN", p.encode_request(p.Open(b"/file", os.O_RDONLY)), True),
    (
        "CREATE",
        p.encode_request(p.Create(b"/file", os.O_CREAT | os.O_RDWR, 0o644, 0, 0)),
        True,
    ),
    ("failing MKDIR", p.encode_request(p.Mkdir(0, 0, b"/dir", 0o755)), False),
    ("malformed LSTAT", p.HEADER.pack(p.T_LSTAT, 1) + b"\x01", False),
    ("unknown type", p.HEADER.pack(999, 2) + b"ab", False),
]

ATTACHED_KINDS = {
    "dir": lambda h: os.open(h.root, os.O_RDONLY | os.O_DIRECTORY),
    "file": lambda h: os.open(h.canary, os.O_RDONLY | os.O_NOATIME),
}


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("count", ATTACHED_COUNTS)
@pytest.mark.parametrize("kind", list(ATTACHED_KINDS))
def test_attached_host_fds_dropped(
    helper_command: list[str],
    plain_export: Path,
    host: HostArea,
    sandbox: str,
    count: int,
    kind: str,
) -> None:
    passed = ATTACHED_KINDS[kind](host)
    try:
        with attack(helper_command, plain_export, host, sandbox) as session:
            passed_st = os.fstat(passed)
            passed_inode = (passed_st.st_dev, passed_st.st_ino)
            rights = [
                (
                    socket.SOL_SOCKET,
                    socket.SCM_RIGHTS,
                    array.array("i", [passed] * count),
                )
            ]
            client = session.helper.client
            for _ in range(ATTACHED_ROUNDS):
                for label, frame, fd_reply in ATTACHED_REQUESTS:
                    client.sock.sendmsg([frame], rights)
                    if fd_reply:
                        reply = client.read_fd_reply()
                    else:
                        reply = client.read_frame_reply()
                    if reply.fd is not None:
                        os.close(reply.fd)
                    descriptors = helper_inodes(session.pid)
                    assert passed_inode not in descriptors.values(), label
            assert_contained(session)
    finally:
        os.close(passed)


# A flood of pipelined requests.

FLOOD_REQUESTS = 100_000
# Frames sent in one write before reading their replies. The replies of one
# batch must fit in the socket buffers, and each OPEN reply keeps a
# descriptor in flight until it is read.
FLOOD_BATCH = 500
FLOOD_RSS_GROWTH_KIB = 4096


def flood_cycle(index: int) -> list[tuple[str, bytes]]:
    """Return one cycle of the flood, as (label, frame) pairs."""
    name = b"/flood-%d" % index
    return [
        ("LSTAT file", p.encode_request(p.Lstat(b"/file"))),
        ("OPEN file", p.encode_request(p.Open(b"/file", os.O_RDONLY))),
        ("MKDIR", p.encode_request(p.Mkdir(0, 0, name, 0o755))),
        ("LSTAT dir", p.encode_request(p.Lstat(name))),
        ("REMOVE", p.encode_request(p.Remove(name))),
        ("truncated LSTAT", p.HEADER.pack(p.T_LSTAT, 1) + b"\x05"),
        ("unknown type", p.HEADER.pack(999, 0)),
        ("overrun OPEN", p.HEADER.pack(p.T_OPEN, 4) + b"\x10\x00ab"),
        ("LSTAT missing", p.encode_request(p.Lstat(b"/missing"))),
        ("LSTAT file", p.encode_request(p.Lstat(b"/file"))),
    ]


FD_REPLY_LABELS = frozenset({"OPEN file", "overrun OPEN"})
FLOOD_STATUSES = {
    "MKDIR": 0,
    "REMOVE": 0,
    "truncated LSTAT": -errno.EINVAL,
    "unknown type": -errno.EOPNOTSUPP,
    "overrun OPEN": -errno.EINVAL,
    "LSTAT missing": -errno.ENOENT,
}


def flood_reply_correct(label: str, reply: Reply, file_ino: int) -> bool:
    """Return whether `reply` is the correct reply to the request `label`."""
    if label == "OPEN file":
        # Pipelined, an OPEN gets ETOOMANYREFS while earlier replies are
        # unread, so that no peer can hoard descriptors in flight.
        if reply.fd is None:
            return reply.status == -errno.ETOOMANYREFS
        return os.fstat(reply.fd).st_ino == file_ino
    if label == "LSTAT file":
        return reply.status == 0 and parse_stat(reply.payload).st_ino == file_ino
    if label == "LSTAT dir":
        return reply.status == 0 and stat.S_ISDIR(parse_stat(reply.payload).st_mode)
    return reply.status == FLOOD_STATUSES[label]


class Flood:
    """Sends the flood in batches and counts the replies that are wrong."""

    def __init__(self, session: Session, file_ino: int):
        self.client = session.helper.client
        self.file_ino = file_ino
        self.cycles = 0
        self.wrong: list[tuple[str, Reply]] = []

    def send_batch(self) -> None:
        items: list[tuple[str, bytes]] = []
        while len(items) < FLOOD_BATCH:
            items.extend(flood_cycle(self.cycles))
            self.cycles += 1
        self.client.send_raw(b"".join(frame for _, frame in items))
        for label, _ in items:
            if label in FD_REPLY_LABELS:
                reply = self.client.read_fd_reply()
            else:
                reply = self.client.read_frame_reply()
            try:
                correct = flood_reply_correct(label, reply, self.file_ino)
            finally:
                if reply.fd is not None:
                    os.close(reply.fd)
            # A few examples explain a failure, and all would flood the output.
            if not correct and len(self.wrong) < 10:
                self.wrong.append((label, reply))


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS line for pid {pid}")


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_flood_keeps_answering(
    helper_command: list[str], plain_export: Path, host: HostArea, sandbox: str
) -> None:
    file_ino = os.lstat(plain_export / "file").st_ino
    with attack(helper_command, plain_export, host, sandbox) as session:
        flood = Flood(session, file_ino)
        # One batch first, so that the baseline includes the helper's
        # buffers and imports, which grow once.
        flood.send_batch()
        assert session.call(p.Lstat(b"/")).status == 0
        fds_before = sorted(os.listdir(f"/proc/{session.pid}/fd"))
        rss_before = vm_rss_kib(session.pid)
        start = time.monotonic()
        for _ in range(FLOOD_REQUESTS // FLOOD_BATCH):
            flood.send_batch()
        elapsed = time.monotonic() - start
        # The helper closes each descriptor after sending it, so one more
        # round trip is needed before its table can be compared.
        assert session.call(p.Lstat(b"/")).status == 0
        fds_after = sorted(os.listdir(f"/proc/{session.pid}/fd"))
        rss_after = vm_rss_kib(session.pid)
        print(
            f"flood, {sandbox}: {FLOOD_REQUESTS} requests in {elapsed:.2f} s, "
            f"{FLOOD_REQUESTS / elapsed:.0f} requests/s, "
            f"VmRSS {rss_before} -> {rss_after} KiB"
        )
        assert flood.wrong == []
        assert fds_after == fds_before
        assert rss_after - rss_before < FLOOD_RSS_GROWTH_KIB
        assert_contained(session)
    assert sorted(os.listdir(plain_export)) == ["dir", "file", "link"]


# The helper's confinement after an attack.


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_confinement_holds_after_attacks(
    helper_command: list[str], built_export: Path, host: HostArea, sandbox: str
) -> None:
    root = os.fsencode(host.root)
    with attack(helper_command, built_export, host, sandbox) as session:
        # The replies are checked by test_climbing_paths_stay_inside.
        for climb in CLIMBS.values():
            for _, build, _ in CLIMBING_OPS:
                reply = session.call(build(climb(root)))
                if reply.fd is not None:
                    os.close(reply.fd)
            build_export(built_export, host)
        status = session.helper.status()
        assert status["Seccomp"] == "2"
        assert status["NoNewPrivs"] == "1"
        assert status["CapBnd"] == "0000000000000000"
        assert status["CapEff"] == KEPT_CAPS
        assert status["CapPrm"] == KEPT_CAPS
        assert status["Uid"].split() == ["0", "0", "0", "0"]
        if sandbox == "namespace":
            with open(f"/proc/{session.helper.pid}/mountinfo") as mountinfo:
                mounts = mountinfo.read().splitlines()
            assert len(mounts) == 1
        assert_contained(session)
