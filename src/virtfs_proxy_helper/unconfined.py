"""Request handlers for --sandbox none: no chroot, openat2 for every path.

Theory of operation: without a namespace or chroot, the kernel's root is
the host's, so no path from the peer may reach a system call as it is.
Every request instead starts from an O_PATH descriptor of the export and
resolves with openat2(2) under RESOLVE_IN_ROOT, which treats the export as
"/" for absolute paths, absolute symlinks and "..", and under
RESOLVE_NO_MAGICLINKS. Requests that act on a final symlink itself
(LSTAT, CHOWN, REMOVE, the xattr calls...) open the parent directory that
way and call the *at variant on the last name, which is never "/", "." or
"..". Requests that follow a final symlink (CHMOD, TRUNCATE, STATFS) open
the object itself that way and act on it through its /proc/self/fd link,
so nothing can swap the path between the check and the call.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

from . import libc, longpaths, protocol
from .operations import (
    _MASK64,
    _O_TMPFILE_ONLY,
    Operations,
    Result,
    _check_type,
    _to_id,
    readlink_room,
    stat_payload,
    string_payload,
)
from .policy import ExportPolicy
from .privileges import identity
from .protocol import to_signed32, to_signed64

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")

_FENCE = libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS
_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_OBJECT = os.O_PATH | os.O_CLOEXEC


class UnconfinedOperations(Operations):
    """Operations that resolve every path under `root_fd` with openat2."""

    def __init__(
        self,
        proc_fd_dir: int,
        getversion_supported: bool,
        policy: ExportPolicy | None,
        root_fd: int,
    ):
        super().__init__(proc_fd_dir, getversion_supported, policy, root_fd)
        self.export_fd = root_fd

    # Resolution.

    @contextmanager
    def _parent(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield a descriptor of the directory holding `path`, and the last name."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        directory, name = longpaths.split_last(path)
        if name.rstrip(b"/") in (b"", b".", b".."):
            # The object is a directory named by the whole path.
            directory, name = path, b"."
        fd: int | None = None
        try:
            for chunk in longpaths.chunks(directory or b"/"):
                start = self.export_fd if fd is None else fd
                next_fd = libc.openat2(start, chunk, _DIRECTORY, _FENCE)
                if fd is not None:
                    os.close(fd)
                fd = next_fd
            assert fd is not None
            yield fd, name
        finally:
            if fd is not None:
                os.close(fd)

    def _openat2(self, path: bytes, flags: int, mode: int = 0) -> int:
        if not longpaths.is_long(path):
            return libc.openat2(self.export_fd, path, flags, _FENCE, mode)
        # Too long for one call: the last name resolves from its directory,
        # so `..` and absolute symlinks in it stop at that directory.
        with self._parent(path) as (parent, name):
            return libc.openat2(parent, name, flags, _FENCE, mode)

    def _probe(self, path: bytes, flags: int) -> int:
        return self._openat2(path, flags)

    @contextmanager
    def _object(self, path: bytes) -> Iterator[bytes]:
        """Yield a /proc path that names the object `path` resolves to."""
        fd = self._openat2(path, _OBJECT)
        try:
            yield b"/proc/self/fd/%d" % fd
        finally:
            os.close(fd)

    def call_long(self, kind: int, request: object) -> Result:
        # Every handler here resolves long paths itself.
        return self.handlers[kind](request)

    # Descriptors.

    def create(self, request: protocol.Create) -> int:
        flags = to_signed32(request.flags) | os.O_CLOEXEC
        mode = request.mode & 0o7777
        with identity(_to_id(request.uid), _to_id(request.gid)):
            if flags & _O_TMPFILE_ONLY:
                return self._openat2(request.path, flags, mode)
            if not flags & os.O_CREAT:
                return self.open_checked(request.path, flags)
            try:
                with self._parent(request.path) as (parent, name):
                    return os.open(name, flags | os.O_EXCL, mode, dir_fd=parent)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
            try:
                return self.open_checked(request.path, flags & ~os.O_CREAT, True)
            except FileNotFoundError:
                return self._create_through_symlink(request.path, flags, mode)

    def _create_through_symlink(self, path: bytes, flags: int, mode: int) -> int:
        fd = self._openat2(path, flags | os.O_NONBLOCK, mode)
        try:
            _check_type(os.fstat(fd).st_mode, flags, True)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # Requests on the last name, inside its directory.

    def mknod(self, request: protocol.Mknod) -> None:
        with (
            identity(_to_id(request.uid), _to_id(request.gid)),
            self._parent(request.path) as (parent, name),
        ):
            mode = request.mode & 0o177777
            os.mknod(name, mode, request.rdev, dir_fd=parent)

    def mkdir(self, request: protocol.Mkdir) -> None:
        with (
            identity(_to_id(request.uid), _to_id(request.gid)),
            self._parent(request.path) as (parent, name),
        ):
            os.mkdir(name, request.mode & 0o7777, dir_fd=parent)

    def symlink(self, request: protocol.Symlink) -> None:
        with (
            identity(_to_id(request.uid), _to_id(request.gid)),
            self._parent(request.path) as (parent, name),
        ):
            os.symlink(request.target, name, dir_fd=parent)

    def link(self, request: protocol.Link) -> None:
        with ExitStack() as stack:
            old_dir, old_name = stack.enter_context(self._parent(request.oldpath))
            new_dir, new_name = stack.enter_context(self._parent(request.newpath))
            os.link(
                old_name,
                new_name,
                src_dir_fd=old_dir,
                dst_dir_fd=new_dir,
                follow_symlinks=False,
            )

    def rename(self, request: protocol.Rename) -> None:
        _reject_root(request.oldpath)
        _reject_root(request.newpath)
        with ExitStack() as stack:
            old_dir, old_name = stack.enter_context(self._parent(request.oldpath))
            new_dir, new_name = stack.enter_context(self._parent(request.newpath))
            os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)

    def remove(self, request: protocol.Remove) -> None:
        _reject_root(request.path)
        with self._parent(request.path) as (parent, name):
            try:
                os.unlink(name, dir_fd=parent)
            except IsADirectoryError:
                os.rmdir(name, dir_fd=parent)

    def chown(self, request: protocol.Chown) -> None:
        uid, gid = _to_id(request.uid), _to_id(request.gid)
        with self._parent(request.path) as (parent, name):
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)

    def utime(self, request: protocol.Utime) -> None:
        atime = (to_signed64(request.atime_sec), to_signed64(request.atime_nsec))
        mtime = (to_signed64(request.mtime_sec), to_signed64(request.mtime_nsec))
        with self._parent(request.path) as (parent, name):
            libc.lutimens(name, atime, mtime, parent)

    def lstat(self, request: protocol.Lstat) -> bytes:
        with self._parent(request.path) as (parent, name):
            return stat_payload(os.stat(name, dir_fd=parent, follow_symlinks=False))

    def readlink(self, request: protocol.Readlink) -> bytes:
        room = readlink_room(request.bufsize)
        with self._parent(request.path) as (parent, name):
            return string_payload(os.readlink(name, dir_fd=parent)[:room])

    # Requests that follow a final symlink act on the resolved object.

    def chmod(self, request: protocol.Chmod) -> None:
        with self._object(request.path) as target:
            os.chmod(target, request.mode & 0o7777)

    def truncate(self, request: protocol.Truncate) -> None:
        with self._object(request.path) as target:
            os.truncate(target, to_signed64(request.length))

    def statfs(self, request: protocol.Statfs) -> bytes:
        with self._object(request.path) as target:
            fs = libc.statfs(target)
        return protocol.STATFS.pack(*(field & _MASK64 for field in fs))

    # The xattr calls have no *at form, so they run from inside the parent.

    def lgetxattr(self, request: protocol.Lgetxattr) -> bytes:
        with self._parent(request.path) as (parent, name):
            return self._at(parent, super().lgetxattr, request._replace(path=name))

    def llistxattr(self, request: protocol.Llistxattr) -> bytes:
        with self._parent(request.path) as (parent, name):
            return self._at(parent, super().llistxattr, request._replace(path=name))

    def lsetxattr(self, request: protocol.Lsetxattr) -> None:
        with self._parent(request.path) as (parent, name):
            self._at(parent, super().lsetxattr, request._replace(path=name))

    def lremovexattr(self, request: protocol.Lremovexattr) -> None:
        with self._parent(request.path) as (parent, name):
            self._at(parent, super().lremovexattr, request._replace(path=name))

    def _at(
        self, parent: int, handler: Callable[[RequestT], ResultT], request: RequestT
    ) -> ResultT:
        os.fchdir(parent)
        try:
            return handler(request)
        finally:
            os.fchdir(self.export_fd)


def _reject_root(path: bytes) -> None:
    # The export root is a mount point or process root in the other modes,
    # which the kernel refuses to remove or rename with EBUSY.
    if path and not path.strip(b"/"):
        raise OSError(errno.EBUSY, "the export root cannot be removed or renamed")


def check_supported() -> None:
    """Raise OSError unless this kernel has openat2 and /proc for none mode."""
    probe = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(libc.openat2(probe, b"/", os.O_PATH, libc.RESOLVE_IN_ROOT))
    finally:
        os.close(probe)
    if not os.path.isdir("/proc/self/fd"):
        raise OSError(errno.ENOENT, "/proc is not mounted")
