"""Capabilities and per-request identity.

Theory of operation: the helper keeps real and saved uid 0 for its whole
life but holds only the capabilities that 9p passthrough needs. Requests
that create objects (CREATE, MKNOD, MKDIR, SYMLINK) run with the effective
gid and uid the guest asked for, so the kernel assigns ownership and applies
the directory's setgid rules exactly as for a local process of that user.
While switched, the effective set is cut to CAP_DAC_OVERRIDE: supplementary
groups stay root's, so without it the user could not reach directories
that its own groups would open to it. Switching back to root restores the
full kept set, and if switching back fails the process exits at once,
because going on would serve the next request with the wrong identity.
"""

from __future__ import annotations

import errno
import logging
import os

from . import libc

logger = logging.getLogger(__name__)

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_MKNOD = 27

KEPT_CAPABILITIES = (
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_MKNOD,
    CAP_SETUID,
)
KEPT_MASK = sum(1 << cap for cap in KEPT_CAPABILITIES)

CAPABILITY_NAMES = {
    CAP_CHOWN: "CAP_CHOWN",
    CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE",
    CAP_FOWNER: "CAP_FOWNER",
    CAP_FSETID: "CAP_FSETID",
    CAP_SETGID: "CAP_SETGID",
    CAP_MKNOD: "CAP_MKNOD",
    CAP_SETUID: "CAP_SETUID",
}

# The sets to hold as root and while switched to a guest's ids. They start
# as the full kept set and shrink to what the process was given at start.
_root_sets = libc.PreparedCapabilities(libc.CapabilitySets(KEPT_MASK, KEPT_MASK, 0))
_switched_sets = libc.PreparedCapabilities(
    libc.CapabilitySets(1 << CAP_DAC_OVERRIDE, KEPT_MASK, 0)
)

# Exit status when the helper cannot return to root after a request.
EXIT_IDENTITY_LOST = 3


def limit_capabilities() -> None:
    """Keep only the kept capabilities, and empty the bounding set.

    The helper never executes another program, so it needs nothing in the
    bounding set, and an empty one means no exec could regain anything.
    QEMU's C helper also leaves it empty. The bounding set goes first,
    because dropping from it needs CAP_SETPCAP, which the capset removes.
    A kept capability that the process does not have, as in a user
    namespace or under a service manager's limits, is logged and left
    out; requests that need it then fail with the kernel's errno.
    """
    global _root_sets, _switched_sets
    kept = KEPT_MASK & libc.capget().permitted
    missing = [name for cap, name in CAPABILITY_NAMES.items() if not kept >> cap & 1]
    if missing:
        logger.warning(
            "started without %s; requests that need them will fail",
            ", ".join(missing),
        )
    _drop_bounding_set()
    _root_sets = libc.PreparedCapabilities(libc.CapabilitySets(kept, kept, 0))
    _switched_sets = libc.PreparedCapabilities(
        libc.CapabilitySets(kept & 1 << CAP_DAC_OVERRIDE, kept, 0)
    )
    _root_sets.apply()


def _drop_bounding_set() -> None:
    for cap in range(64):
        try:
            if libc.prctl(libc.PR_CAPBSET_READ, cap) == 1:
                libc.prctl(libc.PR_CAPBSET_DROP, cap)
        except OSError as err:
            # EINVAL: cap is past the last capability this kernel supports.
            # EPERM: no CAP_SETPCAP, so the bounding set stays as it is.
            if err.errno == errno.EPERM:
                logger.warning("cannot empty the capability bounding set: %s", err)
                return
            if err.errno != errno.EINVAL:
                raise


class identity:
    """Run the block with effective uid and gid set, then return to root.

    A value of -1 leaves that id as it is, so (-1, -1) and (0, 0) switch
    nothing at all. A class, because every CREATE, MKNOD, MKDIR and SYMLINK
    enters one, and a generator-based context manager costs three times as
    much.
    """

    __slots__ = ("uid", "gid", "switched")

    def __init__(self, uid: int, gid: int):
        self.uid = uid
        self.gid = gid
        self.switched = False

    def __enter__(self) -> None:
        uid, gid = self.uid, self.gid
        if (uid == 0 or uid == -1) and (gid == 0 or gid == -1):
            return
        self.switched = True
        try:
            # The gid goes first: once the uid is not 0, CAP_SETGID is gone.
            os.setresgid(-1, gid, -1)
            os.setresuid(-1, uid, -1)
            _switched_sets.apply()
        except BaseException:
            _return_to_root()
            raise

    def __exit__(self, *exc_info: object) -> None:
        if self.switched:
            _return_to_root()


def _return_to_root() -> None:
    try:
        # Setting euid back to 0 is allowed because the real uid is 0, and
        # it brings CAP_SETGID back for the gid switch after it.
        os.setresuid(-1, 0, -1)
        os.setresgid(-1, 0, -1)
        _root_sets.apply()
    except OSError as err:
        logger.critical(
            "failed to switch back to root after a request (%s); exiting "
            "rather than serving with the wrong identity",
            err,
        )
        logging.shutdown()
        os._exit(EXIT_IDENTITY_LOST)
