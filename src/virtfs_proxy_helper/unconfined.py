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
the object itself that way and act on that descriptor, directly or
through its /proc/self/fd link, so nothing can swap the path between the
check and the call.

The same handlers serve --sandbox chroot, inside the chroot, where they
close a hole that chroot alone leaves. If a host process moves a directory
out of the export while a lookup walks "..", a plain lookup climbs past
the chroot. openat2 notices the rename instead and fails with EAGAIN,
which libc.openat2 retries.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

from . import libc, longpaths, protocol
from .operations import (
    _O_TMPFILE_ONLY,
    STATFS_REPLY,
    Operations,
    Result,
    _to_id,
    check_opened,
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
        kernel_root: bool = False,
    ):
        super().__init__(proc_fd_dir, getversion_supported, policy, root_fd)
        self.export_fd = root_fd
        # Inside a chroot, the kernel's own resolution handles paths too long
        # for openat2 correctly, while chunks resolved under RESOLVE_IN_ROOT
        # would stop absolute symlinks and ".." at each chunk's directory.
        self.plain: Operations | None = None
        if kernel_root:
            self.plain = Operations(proc_fd_dir, getversion_supported, policy, root_fd)

    # Resolution.

    @contextmanager
    def _parent(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield a descriptor of the directory holding `path`, and the last name."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        if len(path) >= longpaths.PATH_MAX and not longpaths.is_long(path):
            raise OSError(errno.ENAMETOOLONG, "a name in the path is too long")
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
        # NOTE: too long for one call, so each chunk and the last name resolve
        # under the directory before them: ".." and absolute symlinks stop
        # there instead of at the export's root. That is safe but differs
        # from a local filesystem.
        with self._parent(path) as (parent, name):
            return libc.openat2(parent, name, flags, _FENCE, mode)

    def _probe(self, path: bytes, flags: int) -> int:
        return self._openat2(path, flags)

    @contextmanager
    def _object(self, path: bytes) -> Iterator[int]:
        """Yield an O_PATH descriptor of the object `path` resolves to."""
        fd = self._openat2(path, _OBJECT)
        try:
            yield fd
        finally:
            os.close(fd)

    def call_long(self, kind: int, request: object) -> Result:
        if self.plain is not None:
            # NOTE: this leaves paths over PATH_MAX in a chroot to the kernel's
            # lookup, which a host process moving directories out of the
            # export mid-lookup can lead past the root.
            return self.plain.call_long(kind, request)
        # Every handler here resolves long paths itself.
        return self.handlers[kind](request)

    # Descriptors.

    def create(self, request: protocol.Create) -> int:
        flags = to_signed32(request.flags) | os.O_CLOEXEC
        mode = request.mode & 0o7777
        with identity(_to_id(request.uid), _to_id(request.gid)):
            if flags & _O_TMPFILE_ONLY:
                return self._openat2(request.path, flags, mode)
            # O_PATH makes the kernel ignore O_CREAT and O_EXCL, so such an
            # open would reach special files unchecked.
            if not flags & os.O_CREAT or flags & os.O_PATH:
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
        return check_opened(fd, flags, True)

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
        # chmod through the /proc link changes the object the link names.
        with self._object(request.path) as fd:
            os.chmod(b"%d" % fd, request.mode & 0o7777, dir_fd=self.proc_fd_dir)

    def truncate(self, request: protocol.Truncate) -> None:
        with self._object(request.path) as fd:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, "is a directory")
            if not stat.S_ISREG(mode):
                # truncate(2) fails FIFOs and devices with EINVAL, and
                # opening them for writing could block or run a driver.
                raise OSError(errno.EINVAL, "not a regular file")
            flags = os.O_WRONLY | os.O_CLOEXEC
            writable = os.open(b"%d" % fd, flags, dir_fd=self.proc_fd_dir)
        try:
            os.ftruncate(writable, to_signed64(request.length))
        finally:
            os.close(writable)

    def statfs(self, request: protocol.Statfs) -> bytes:
        with self._object(request.path) as fd:
            fs = libc.fstatfs(fd)
        return STATFS_REPLY.pack(*fs)

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
    """Raise OSError unless this kernel has openat2."""
    probe = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(libc.openat2(probe, b"/", os.O_PATH, libc.RESOLVE_IN_ROOT))
    finally:
        os.close(probe)
