"""ctypes bindings for the few Linux calls that Python's os module lacks.

Python has no capability API, and `os.utime` cannot pass UTIME_NOW or
UTIME_OMIT per field, and `os.statvfs` hides the filesystem type. These
bindings call glibc directly. Each one raises `OSError` with the call's
errno on failure, like the functions in `os`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, name: str, *args: object) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name} failed: {os.strerror(err)}", *args)
    return result


# Capabilities. Version 3 of the kernel interface carries 64 bits per set,
# split over two 32-bit words.
_CAP_VERSION_3 = 0x20080522
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CapDataPair = _CapData * 2


class CapabilitySets(NamedTuple):
    """The calling thread's capability sets, each as a 64-bit mask."""

    effective: int
    permitted: int
    inheritable: int


def capget() -> CapabilitySets:
    """Read the calling thread's capability sets."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = _CapDataPair()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    return CapabilitySets(
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def capset(sets: CapabilitySets) -> None:
    """Replace the calling thread's capability sets."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = _CapDataPair()
    for word in range(2):
        shift = 32 * word
        data[word].effective = (sets.effective >> shift) & 0xFFFFFFFF
        data[word].permitted = (sets.permitted >> shift) & 0xFFFFFFFF
        data[word].inheritable = (sets.inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


# prctl(2) is variadic, and the kernel rejects some options unless the unused
# arguments are zero, so all four are always passed.
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.prctl.restype = ctypes.c_int


def prctl(option: int, arg: int = 0) -> int:
    """Call prctl(2) with one argument and return its result."""
    return _check(_libc.prctl(option, arg, 0, 0, 0), "prctl")


# utimensat(2), for per-field UTIME_NOW and UTIME_OMIT.
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_Timespec),
    ctypes.c_int,
]


def lutimens(
    path: bytes,
    atime: tuple[int, int],
    mtime: tuple[int, int],
    dir_fd: int = AT_FDCWD,
) -> None:
    """Set a path's times without following a final symlink.

    Each time is (seconds, nanoseconds), where nanoseconds may be UTIME_NOW
    or UTIME_OMIT as utimensat(2) defines them.
    """
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    result = _libc.utimensat(dir_fd, path, times, AT_SYMLINK_NOFOLLOW)
    _check(result, "utimensat", path)


# statfs(2). On 64-bit Linux every field is a long except f_fsid, which is
# two ints; the padding at the end is f_flags and f_spare.
class _Statfs(ctypes.Structure):
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


class StatfsResult(NamedTuple):
    """The fields of struct statfs that the proxy protocol carries."""

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


_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]


def statfs(path: bytes) -> StatfsResult:
    """Call statfs(2) on `path`, which follows symlinks."""
    buf = _Statfs()
    _check(_libc.statfs(path, ctypes.byref(buf)), "statfs", path)
    return _statfs_result(buf)


def fstatfs(fd: int) -> StatfsResult:
    """Call fstatfs(2), which also accepts an O_PATH descriptor."""
    buf = _Statfs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    return _statfs_result(buf)


def _statfs_result(buf: _Statfs) -> StatfsResult:
    return StatfsResult(
        buf.f_type,
        buf.f_bsize,
        buf.f_blocks,
        buf.f_bfree,
        buf.f_bavail,
        buf.f_files,
        buf.f_ffree,
        buf.f_fsid[0],
        buf.f_fsid[1],
        buf.f_namelen,
        buf.f_frsize,
    )


# Mount namespaces: unshare(2), mount(2), umount2(2) and pivot_root(2). Python
# 3.11 has none of them, and glibc has no pivot_root wrapper.
CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
# Raw system call numbers, for the calls glibc 2.36 does not wrap. They
# differ between architectures, and only x86_64's are listed.
_SYSCALLS_KNOWN = platform.machine() == "x86_64"
_SYS_PIVOT_ROOT = 155

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.syscall.restype = ctypes.c_long


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces."""
    _check(_libc.unshare(flags), "unshare")


def mount(source: bytes | None, target: bytes, flags: int) -> None:
    """Call mount(2) with no filesystem type and no data."""
    _check(_libc.mount(source, target, None, flags, None), "mount", target)


def umount2(target: bytes, flags: int) -> None:
    _check(_libc.umount2(target, flags), "umount2", target)


def _require_syscall_numbers(name: str) -> None:
    if not _SYSCALLS_KNOWN:
        raise OSError(errno.ENOSYS, f"{name}: no system call number for this CPU")


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    _require_syscall_numbers("pivot_root")
    result = _libc.syscall(_SYS_PIVOT_ROOT, new_root, put_old)
    _check(result, "pivot_root", new_root)


# openat2(2), Linux 5.6 and later: path resolution with limits.
_SYS_OPENAT2 = 437
_OPENAT2_TRIES = 256
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """Open `path` relative to `dir_fd` with openat2(2)'s `resolve` limits."""
    _require_syscall_numbers("openat2")
    how = _OpenHow(flags, mode, resolve)
    # With RESOLVE_IN_ROOT the kernel fails a lookup that crossed ".." with
    # EAGAIN when any rename ran on the host meanwhile, because it cannot
    # tell whether the rename moved the path outside the root. A retry
    # resolves afresh. The bound only keeps a rename storm from looping
    # forever; EAGAIN then reaches the peer.
    for _ in range(_OPENAT2_TRIES):
        result = _libc.syscall(
            _SYS_OPENAT2,
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if result >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    return _check(result, "openat2", path)
