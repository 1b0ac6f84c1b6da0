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
import struct
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


class PreparedCapabilities:
    """Capability sets packed for capset(2) once, to set again and again.

    Identity switches set the same two states for every request, and
    packing the kernel's structures costs more than the call itself.
    """

    def __init__(self, sets: CapabilitySets):
        self.sets = sets
        self._header = _CapHeader(_CAP_VERSION_3, 0)
        self._header_pointer = ctypes.byref(self._header)
        self._data = _CapDataPair()
        for word in range(2):
            shift = 32 * word
            self._data[word].effective = (sets.effective >> shift) & 0xFFFFFFFF
            self._data[word].permitted = (sets.permitted >> shift) & 0xFFFFFFFF
            self._data[word].inheritable = (sets.inheritable >> shift) & 0xFFFFFFFF

    def apply(self) -> None:
        """Replace the calling thread's capability sets with these."""
        _check(_libc.capset(self._header_pointer, self._data), "capset")


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


# statfs(2). On 64-bit Linux every field of struct statfs is a long except
# f_fsid, which is two ints. _STATFS_FIELDS reads the ones the proxy protocol
# carries, which come first. f_flags and f_spare follow them.
_STATFS_FIELDS = struct.Struct("=qq5Q2iqq")
_STATFS_SIZE = 120
# One buffer serves every call, because the helper is single-threaded. That
# saves allocating a ctypes structure per STATFS request.
_statfs_buffer = ctypes.create_string_buffer(_STATFS_SIZE)


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


_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]


def statfs(path: bytes) -> StatfsResult:
    """Call statfs(2) on `path`, which follows symlinks."""
    _check(_libc.statfs(path, _statfs_buffer), "statfs", path)
    return StatfsResult._make(_STATFS_FIELDS.unpack_from(_statfs_buffer))


def fstatfs(fd: int) -> StatfsResult:
    """Call fstatfs(2), which also accepts an O_PATH descriptor."""
    _check(_libc.fstatfs(fd, _statfs_buffer), "fstatfs")
    return StatfsResult._make(_STATFS_FIELDS.unpack_from(_statfs_buffer))


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


# A handle on syscall(2) of its own, typed for openat2, so the arguments need
# no wrapping per call. Every call reuses one open_how, because the helper is
# single-threaded.
_openat2_syscall = _libc["syscall"]
_openat2_syscall.argtypes = [
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
]
_openat2_syscall.restype = ctypes.c_long
_open_how = _OpenHow()
_open_how_pointer = ctypes.byref(_open_how)
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """Open `path` relative to `dir_fd` with openat2(2)'s `resolve` limits."""
    _require_syscall_numbers("openat2")
    _open_how.flags = flags
    _open_how.mode = mode
    _open_how.resolve = resolve
    # With RESOLVE_IN_ROOT the kernel fails a lookup that crossed ".." with
    # EAGAIN when any rename ran on the host meanwhile, because it cannot
    # tell whether the rename moved the path outside the root. A retry
    # resolves afresh. The bound only keeps a rename storm from looping
    # forever; EAGAIN then reaches the peer.
    for _ in range(_OPENAT2_TRIES):
        result = _openat2_syscall(
            _SYS_OPENAT2, dir_fd, path, _open_how_pointer, _HOW_SIZE
        )
        if result >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    return _check(result, "openat2", path)
