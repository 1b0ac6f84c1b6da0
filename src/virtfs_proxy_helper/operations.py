"""Filesystem operations behind each request type.

Each handler takes a decoded request and returns what its reply carries:
an open descriptor (OPEN, CREATE), None for a plain success (status
replies), or the payload bytes of a data reply. Failures raise `OSError`,
whose errno goes back to the peer unchanged. Paths are used as the peer
sent them: the process is chrooted into the export, so the kernel resolves
every path, `..` and symlink target included, inside it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

from . import libc, longpaths, protocol
from .policy import ExportPolicy
from .privileges import identity
from .protocol import to_signed32, to_signed64

# Filesystems whose inodes carry a generation number that FS_IOC_GETVERSION
# reads: ext2/3/4, btrfs, xfs and reiserfs, by their statfs f_type.
GETVERSION_FILESYSTEMS = frozenset({0xEF53, 0x9123683E, 0x58465342, 0x52654973})
FS_IOC_GETVERSION = 0x80087601

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_NS = 1_000_000_000
# Seconds beyond this make a nanosecond total that os.utime cannot convert.
_SECONDS_LIMIT = 1 << 32

# Flags that open a descriptor without opening the file itself: no device
# driver's open runs and no FIFO blocks, so the type can be checked first.
_PROBE_FLAGS = os.O_PATH | os.O_CLOEXEC
_PROBE_KEEPS = os.O_NOFOLLOW | os.O_DIRECTORY

_RESOLVE_FENCE = libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS

# The bit that O_TMPFILE adds to O_DIRECTORY.
_O_TMPFILE_ONLY = os.O_TMPFILE & ~os.O_DIRECTORY

Result = int | bytes | None


def _to_id(value: int) -> int:
    """Turn a u32 uid or gid into what os.* expects: -1 for "unchanged"."""
    return -1 if value == protocol.NO_ID else value


def _check_type(mode: int, flags: int, creating: bool) -> None:
    """Raise the errno for a file that OPEN or CREATE must not hand out."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        if creating:
            raise OSError(errno.EISDIR, "is a directory")
        return
    if stat.S_ISLNK(mode) and not flags & os.O_PATH:
        # Only O_NOFOLLOW stops at a symlink, and open(2) fails that with ELOOP.
        raise OSError(errno.ELOOP, "final component is a symlink")
    raise OSError(errno.ENXIO, "not a regular file or directory")


def _open_then_check(path: bytes, flags: int, mode: int, creating: bool) -> int:
    """Open non-blocking, so a FIFO cannot block, then check the type.

    Unlike the probe in `Operations.open_checked`, this runs a device
    node's open before rejecting it.
    """
    fd = os.open(path, flags | os.O_NONBLOCK, mode)
    return check_opened(fd, flags, creating)


def check_opened(fd: int, flags: int, creating: bool) -> int:
    """Return `fd`, opened with O_NONBLOCK added, if OPEN may hand it out.

    Otherwise close it and raise the errno of `_check_type`. O_NONBLOCK is
    cleared again unless `flags` asked for it.
    """
    try:
        _check_type(os.fstat(fd).st_mode, flags, creating)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


# protocol.STAT with the seconds signed, as they are in os.stat_result: the
# bytes are the same, and times before 1970 need no masking.
_STAT_REPLY = struct.Struct("=QQQIIIQQQQqQqQqQ")
assert _STAT_REPLY.size == protocol.STAT.size
# protocol.STATFS with the fields that struct statfs has signed kept signed.
# A negative f_fsid half goes out sign-extended to 64 bits.
STATFS_REPLY = struct.Struct("=qq5Q4q")
assert STATFS_REPLY.size == protocol.STATFS.size


def stat_payload(st: os.stat_result) -> bytes:
    """Pack an lstat result as the 116-byte LSTAT reply payload."""
    # Items 0-9 of a stat_result are st_mode to st_ctime with whole seconds,
    # floored like tv_sec, so the *_ns fields modulo 10**9 give tv_nsec.
    mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime = st[:10]
    return _STAT_REPLY.pack(
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


def readlink_room(bufsize_field: int) -> int:
    """Return how many target bytes fit in the peer's READLINK buffer."""
    # The peer's buffer has room for bufsize - 1 bytes and a NUL, as in
    # readlink(2) with a bufsize of bufsize - 1, which rejects 0.
    room = to_signed32(bufsize_field) - 1
    if room <= 0:
        raise OSError(errno.EINVAL, "readlink buffer too small")
    return room


def string_payload(value: bytes) -> bytes:
    """Encode `value` as a one-string payload, or fail with ENOBUFS."""
    if len(value) + 2 > protocol.MAX_PAYLOAD:
        raise OSError(errno.ENOBUFS, "reply does not fit in one frame")
    return protocol.encode_string(value)


class Operations:
    """The request handlers, with the little state they share.

    `root_fd` is an O_PATH descriptor of the export's root, for openat2; it
    is None where the kernel has no openat2.

    `proc_fd_dir` is a descriptor for this process's /proc/self/fd, opened
    before chroot. It reopens an O_PATH descriptor with real open flags, so
    OPEN can check a file's type before opening it. Without it (no /proc),
    files are opened non-blocking and checked after, which still keeps a
    FIFO from blocking but does run a device's open.
    """

    def __init__(
        self,
        proc_fd_dir: int | None,
        getversion_supported: bool,
        policy: ExportPolicy | None = None,
        root_fd: int | None = None,
    ):
        self.proc_fd_dir = proc_fd_dir
        self.root_fd = root_fd
        self.getversion_supported = getversion_supported
        self.handlers: dict[int, Callable[[Any], Result]] = {
            protocol.T_OPEN: self.open,
            protocol.T_CREATE: self.create,
            protocol.T_MKNOD: self.mknod,
            protocol.T_MKDIR: self.mkdir,
            protocol.T_SYMLINK: self.symlink,
            protocol.T_LINK: self.link,
            protocol.T_LSTAT: self.lstat,
            protocol.T_READLINK: self.readlink,
            protocol.T_STATFS: self.statfs,
            protocol.T_CHMOD: self.chmod,
            protocol.T_CHOWN: self.chown,
            protocol.T_TRUNCATE: self.truncate,
            protocol.T_UTIME: self.utime,
            protocol.T_RENAME: self.rename,
            protocol.T_REMOVE: self.remove,
            protocol.T_LGETXATTR: self.lgetxattr,
            protocol.T_LLISTXATTR: self.llistxattr,
            protocol.T_LSETXATTR: self.lsetxattr,
            protocol.T_LREMOVEXATTR: self.lremovexattr,
            protocol.T_GETVERSION: self.getversion,
        }
        if policy is not None:
            policy.apply(self.handlers)

    def call_long(self, kind: int, request: Any) -> Result:
        """Run a request whose paths may be longer than PATH_MAX."""
        if kind == protocol.T_LINK or kind == protocol.T_RENAME:
            # Their handlers resolve long paths themselves, behind any policy.
            return self.handlers[kind](request)
        if longpaths.is_long(request.path):
            return longpaths.call_in_parent(self.handlers[kind], request)
        return self.handlers[kind](request)

    # Descriptors.

    def open_checked(self, path: bytes, flags: int, creating: bool = False) -> int:
        """Open `path` with `flags` if it is a regular file or directory.

        Anything else fails with ENXIO, and where /proc is available it is
        never opened. With `creating`, an existing directory fails with
        EISDIR, as open(2) with O_CREAT does.
        """
        flags |= os.O_CLOEXEC
        if self.proc_fd_dir is None:
            return _open_then_check(path, flags, 0, creating)
        probe = self._probe(path, _PROBE_FLAGS | (flags & _PROBE_KEEPS))
        try:
            _check_type(os.fstat(probe).st_mode, flags, creating)
            # The probe already applied O_NOFOLLOW. Passed on, it would make
            # the kernel open the /proc link itself instead of the file.
            reopen_flags = flags & ~os.O_NOFOLLOW
            return os.open(b"%d" % probe, reopen_flags, dir_fd=self.proc_fd_dir)
        finally:
            os.close(probe)

    def _probe(self, path: bytes, flags: int) -> int:
        # A second fence behind the namespace or chroot for the one request
        # kind that hands a descriptor to QEMU: openat2 keeps `..` and
        # symlinks under the export's root and refuses /proc magic links,
        # should the export contain a procfs. Relative paths come from
        # longpaths, already resolved under the root, and have no such check.
        if self.root_fd is None or not path.startswith(b"/"):
            return os.open(path, flags)
        try:
            return libc.openat2(self.root_fd, path, flags, _RESOLVE_FENCE)
        except BlockingIOError:
            # Host renames kept openat2 failing with EAGAIN past its retries.
            # This class runs in a mount namespace, whose bind-mounted root
            # contains ".." by itself, so the plain lookup is still fenced.
            return os.open(path, flags)

    def open(self, request: protocol.Open) -> int:
        flags = to_signed32(request.flags)
        if flags & (os.O_CREAT | _O_TMPFILE_ONLY):
            # Creating needs a mode and an owner, which only CREATE carries.
            raise OSError(errno.EINVAL, "OPEN cannot create files")
        return self.open_checked(request.path, flags)

    def create(self, request: protocol.Create) -> int:
        flags = to_signed32(request.flags) | os.O_CLOEXEC
        mode = request.mode & 0o7777
        with identity(_to_id(request.uid), _to_id(request.gid)):
            if flags & _O_TMPFILE_ONLY:
                # O_TMPFILE implies O_DIRECTORY, so a special file fails
                # with ENOTDIR during lookup, before any open runs.
                return os.open(request.path, flags, mode)
            # O_PATH makes the kernel ignore O_CREAT and O_EXCL, so such an
            # open would reach special files unchecked.
            if not flags & os.O_CREAT or flags & os.O_PATH:
                return self.open_checked(request.path, flags)
            # With O_EXCL the kernel creates a new regular file or fails,
            # so nothing that already exists gets opened here.
            try:
                return os.open(request.path, flags | os.O_EXCL, mode)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
            try:
                return self.open_checked(request.path, flags & ~os.O_CREAT, True)
            except FileNotFoundError:
                # The name exists but does not resolve: a dangling symlink,
                # whose target open(2) creates when O_EXCL is not given.
                return _open_then_check(request.path, flags, mode, True)

    # Creating objects as the guest's user.

    def mknod(self, request: protocol.Mknod) -> None:
        with identity(_to_id(request.uid), _to_id(request.gid)):
            os.mknod(request.path, request.mode & 0o177777, request.rdev)

    def mkdir(self, request: protocol.Mkdir) -> None:
        with identity(_to_id(request.uid), _to_id(request.gid)):
            os.mkdir(request.path, request.mode & 0o7777)

    def symlink(self, request: protocol.Symlink) -> None:
        with identity(_to_id(request.uid), _to_id(request.gid)):
            os.symlink(request.target, request.path)

    # Plain path operations.

    def link(self, request: protocol.Link) -> None:
        if longpaths.is_long(request.oldpath) or longpaths.is_long(request.newpath):
            longpaths.link(request)
            return
        # link(2) does not follow a final symlink, and neither does this.
        os.link(request.oldpath, request.newpath, follow_symlinks=False)

    def rename(self, request: protocol.Rename) -> None:
        if longpaths.is_long(request.oldpath) or longpaths.is_long(request.newpath):
            longpaths.rename(request)
            return
        os.rename(request.oldpath, request.newpath)

    def remove(self, request: protocol.Remove) -> None:
        try:
            os.unlink(request.path)
        except IsADirectoryError:
            os.rmdir(request.path)

    def chmod(self, request: protocol.Chmod) -> None:
        os.chmod(request.path, request.mode & 0o7777)

    def chown(self, request: protocol.Chown) -> None:
        uid, gid = _to_id(request.uid), _to_id(request.gid)
        os.chown(request.path, uid, gid, follow_symlinks=False)

    def truncate(self, request: protocol.Truncate) -> None:
        os.truncate(request.path, to_signed64(request.length))

    def utime(self, request: protocol.Utime) -> None:
        atime = (to_signed64(request.atime_sec), to_signed64(request.atime_nsec))
        mtime = (to_signed64(request.mtime_sec), to_signed64(request.mtime_nsec))
        plain = 0 <= atime[1] < _NS and 0 <= mtime[1] < _NS
        if plain and abs(atime[0]) < _SECONDS_LIMIT > abs(mtime[0]):
            # Plain times (no UTIME_NOW or UTIME_OMIT, both above 10**9) whose
            # nanosecond totals fit os.utime: it makes the same utimensat call
            # for a third of the cost of the ctypes binding.
            times = (atime[0] * _NS + atime[1], mtime[0] * _NS + mtime[1])
            os.utime(request.path, ns=times, follow_symlinks=False)
        else:
            libc.lutimens(request.path, atime, mtime)

    # Data replies.

    def lstat(self, request: protocol.Lstat) -> bytes:
        return stat_payload(os.lstat(request.path))

    def readlink(self, request: protocol.Readlink) -> bytes:
        room = readlink_room(request.bufsize)
        return string_payload(os.readlink(request.path)[:room])

    def statfs(self, request: protocol.Statfs) -> bytes:
        return STATFS_REPLY.pack(*libc.statfs(request.path))

    def getversion(self, request: protocol.Getversion) -> bytes:
        if not self.getversion_supported:
            return _U64.pack(0)
        fd = self.open_checked(request.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            result = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
        finally:
            os.close(fd)
        return result

    # Extended attributes. A size of 0 requests only the length.

    @staticmethod
    def _xattr_size(size_field: int) -> int:
        size = to_signed32(size_field)
        if size < 0:
            raise OSError(errno.EINVAL, "negative xattr buffer size")
        return size

    @staticmethod
    def _sized_reply(value: bytes, size: int) -> bytes:
        if size == 0:
            return _U32.pack(len(value))
        if len(value) > size:
            raise OSError(errno.ERANGE, "xattr buffer too small")
        return string_payload(value)

    def lgetxattr(self, request: protocol.Lgetxattr) -> bytes:
        size = self._xattr_size(request.size)
        value = os.getxattr(request.path, request.name, follow_symlinks=False)
        return self._sized_reply(value, size)

    def llistxattr(self, request: protocol.Llistxattr) -> bytes:
        size = self._xattr_size(request.size)
        names = os.listxattr(request.path, follow_symlinks=False)
        listing = b"".join(os.fsencode(name) + b"\0" for name in names)
        return self._sized_reply(listing, size)

    def lsetxattr(self, request: protocol.Lsetxattr) -> None:
        if to_signed32(request.size) != len(request.value):
            raise OSError(errno.EINVAL, "xattr size field disagrees with value")
        os.setxattr(
            request.path,
            request.name,
            request.value,
            to_signed32(request.flags),
            follow_symlinks=False,
        )

    def lremovexattr(self, request: protocol.Lremovexattr) -> None:
        os.removexattr(request.path, request.name, follow_symlinks=False)
