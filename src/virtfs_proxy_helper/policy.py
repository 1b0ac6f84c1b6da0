"""Export policy: --readonly, --nosuid and --nodev, applied to requests.

Each option replaces the handlers of the request types it restricts with a
checking wrapper, so an export without options pays nothing. The checks
work on the decoded request alone, before any system call, and refuse with
the errno a local filesystem mounted with the same option would give.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import protocol
from .protocol import to_signed32

Handler = Callable[[Any], Any]

# Requests that change the export, refused with EROFS under --readonly.
MUTATING_TYPES = frozenset(
    {
        protocol.T_CREATE,
        protocol.T_MKNOD,
        protocol.T_MKDIR,
        protocol.T_SYMLINK,
        protocol.T_LINK,
        protocol.T_CHMOD,
        protocol.T_CHOWN,
        protocol.T_TRUNCATE,
        protocol.T_UTIME,
        protocol.T_RENAME,
        protocol.T_REMOVE,
        protocol.T_LSETXATTR,
        protocol.T_LREMOVEXATTR,
    }
)

_SETID_BITS = stat.S_ISUID | stat.S_ISGID
# File capabilities grant privileges on exec much as a setuid bit does.
_CAPABILITY_XATTR = b"security.capability"


@dataclass(frozen=True)
class ExportPolicy:
    """What guests may do to the export beyond ordinary permissions."""

    readonly: bool = False
    nosuid: bool = False
    nodev: bool = False

    def apply(self, handlers: dict[int, Handler]) -> None:
        """Wrap the entries of `handlers` that this policy restricts."""
        if self.readonly:
            for kind in MUTATING_TYPES:
                handlers[kind] = _refuse_readonly
            handlers[protocol.T_OPEN] = _readonly_open(handlers[protocol.T_OPEN])
        if self.nosuid:
            for kind in (protocol.T_CREATE, protocol.T_MKDIR, protocol.T_MKNOD):
                handlers[kind] = _without_setid(handlers[kind])
            handlers[protocol.T_CHMOD] = _without_setid(handlers[protocol.T_CHMOD])
            setxattr = handlers[protocol.T_LSETXATTR]
            handlers[protocol.T_LSETXATTR] = _without_file_caps(setxattr)
        if self.nodev:
            handlers[protocol.T_MKNOD] = _without_devices(handlers[protocol.T_MKNOD])


def _refuse_readonly(request: Any) -> None:
    raise OSError(errno.EROFS, "export is read-only")


def _readonly_open(open_handler: Handler) -> Handler:
    def open_for_reading(request: protocol.Open) -> Any:
        flags = to_signed32(request.flags)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, "export is read-only")
        return open_handler(request)

    return open_for_reading


def _without_setid(handler: Handler) -> Handler:
    # Dropping the bits from the requested mode is what a nosuid mount
    # effectively gives: the object exists, but grants no privilege.
    def strip_setid(request: Any) -> Any:
        return handler(request._replace(mode=request.mode & ~_SETID_BITS))

    return strip_setid


def _without_file_caps(handler: Handler) -> Handler:
    def refuse_file_caps(request: protocol.Lsetxattr) -> Any:
        if request.name == _CAPABILITY_XATTR:
            raise OSError(errno.EPERM, "file capabilities refused under --nosuid")
        return handler(request)

    return refuse_file_caps


def _without_devices(handler: Handler) -> Handler:
    def refuse_devices(request: protocol.Mknod) -> Any:
        if stat.S_ISCHR(request.mode) or stat.S_ISBLK(request.mode):
            raise OSError(errno.EPERM, "device nodes refused under --nodev")
        return handler(request)

    return refuse_devices
