"""Export policy: --readonly, --nosuid, --nodev and id mapping.

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


# The id LSTAT reports for a host id that no range maps, as user namespaces
# report an unmapped id.
OVERFLOW_ID = 65534


@dataclass(frozen=True)
class IdRange:
    """`count` consecutive guest ids from `guest`, stored as host ids from `host`."""

    guest: int
    host: int
    count: int


@dataclass(frozen=True)
class IdMap:
    """Translation between guest and host user (or group) ids.

    A guest id outside every range becomes `squash` if that is set, and is
    rejected with EINVAL otherwise, as an unmapped id is in a user
    namespace. Host ids outside every range read back as OVERFLOW_ID.
    """

    ranges: tuple[IdRange, ...] = ()
    squash: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.ranges) or self.squash is not None

    def to_host(self, guest_id: int) -> int:
        if guest_id == protocol.NO_ID:
            return guest_id
        for r in self.ranges:
            if r.guest <= guest_id < r.guest + r.count:
                return r.host + guest_id - r.guest
        if self.squash is not None:
            return self.squash
        raise OSError(errno.EINVAL, f"guest id {guest_id} has no mapping")

    def to_guest(self, host_id: int) -> int:
        for r in self.ranges:
            if r.host <= host_id < r.host + r.count:
                return r.guest + host_id - r.host
        return OVERFLOW_ID


@dataclass(frozen=True)
class ExportPolicy:
    """The limits on guest requests beyond ordinary permissions."""

    readonly: bool = False
    nosuid: bool = False
    nodev: bool = False
    uids: IdMap = IdMap()
    gids: IdMap = IdMap()

    def apply(self, handlers: dict[int, Handler]) -> None:
        """Wrap the entries of `handlers` that this policy restricts."""
        if self.readonly:
            for kind in MUTATING_TYPES:
                handlers[kind] = _reject_readonly
            handlers[protocol.T_OPEN] = _readonly_open(handlers[protocol.T_OPEN])
        if self.nosuid:
            for kind in (protocol.T_CREATE, protocol.T_MKDIR, protocol.T_MKNOD):
                handlers[kind] = _without_setid(handlers[kind])
            handlers[protocol.T_CHMOD] = _without_setid(handlers[protocol.T_CHMOD])
            setxattr = handlers[protocol.T_LSETXATTR]
            handlers[protocol.T_LSETXATTR] = _without_file_caps(setxattr)
        if self.nodev:
            handlers[protocol.T_MKNOD] = _without_devices(handlers[protocol.T_MKNOD])
        if self.uids.active or self.gids.active:
            for kind in _ID_CARRYING_TYPES:
                handlers[kind] = _mapping_ids(handlers[kind], self.uids, self.gids)
            lstat = handlers[protocol.T_LSTAT]
            handlers[protocol.T_LSTAT] = _reporting_guest_ids(lstat, self)


def _reject_readonly(request: Any) -> None:
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
    def reject_file_caps(request: protocol.Lsetxattr) -> Any:
        if request.name == _CAPABILITY_XATTR:
            raise OSError(errno.EPERM, "file capabilities are rejected under --nosuid")
        return handler(request)

    return reject_file_caps


def _without_devices(handler: Handler) -> Handler:
    def reject_devices(request: protocol.Mknod) -> Any:
        if stat.S_ISCHR(request.mode) or stat.S_ISBLK(request.mode):
            raise OSError(errno.EPERM, "device nodes are rejected under --nodev")
        return handler(request)

    return reject_devices


# Requests whose uid and gid fields name owners to create or set.
_ID_CARRYING_TYPES = (
    protocol.T_CREATE,
    protocol.T_MKNOD,
    protocol.T_MKDIR,
    protocol.T_SYMLINK,
    protocol.T_CHOWN,
)


def _mapping_ids(handler: Handler, uids: IdMap, gids: IdMap) -> Handler:
    def map_ids(request: Any) -> Any:
        uid, gid = uids.to_host(request.uid), gids.to_host(request.gid)
        return handler(request._replace(uid=uid, gid=gid))

    return map_ids


def _reporting_guest_ids(handler: Handler, policy: ExportPolicy) -> Handler:
    def report_guest_ids(request: protocol.Lstat) -> bytes:
        fields = list(protocol.STAT.unpack(handler(request)))
        fields[_ST_UID] = policy.uids.to_guest(fields[_ST_UID])
        fields[_ST_GID] = policy.gids.to_guest(fields[_ST_GID])
        return protocol.STAT.pack(*fields)

    return report_guest_ids


# Positions of st_uid and st_gid in protocol.STAT.
_ST_UID = 4
_ST_GID = 5
