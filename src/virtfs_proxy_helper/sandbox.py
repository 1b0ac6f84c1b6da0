"""Start-up steps that connect to QEMU and shut the helper into the export.

Theory of operation: everything that needs the host's view of the
filesystem happens first: binding the named socket, accepting QEMU, and
opening /proc/self/fd. Then the process chroots into the export, so every
path a request carries resolves inside it, and finally it drops all
capabilities but the few that file operations on behalf of other users
need. The order matches QEMU's C helper.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct

from . import libc, unconfined
from .operations import GETVERSION_FILESYSTEMS, Operations
from .policy import ExportPolicy
from .privileges import limit_capabilities

logger = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, and the name needs a terminating NUL.
MAX_SOCKET_PATH = 107


_PEERCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


class SetupError(Exception):
    """A start-up step failed; the message names the step and the cause."""


def _step_failed(step: str, err: OSError) -> SetupError:
    name = os.strerror(err.errno) if err.errno else str(err)
    return SetupError(f"{step} failed: {name}")


def listen_and_accept(
    path: str, uid: int, gid: int, check_peer: bool = True
) -> socket.socket:
    """Create a unix socket at `path`, accept one client, remove the listener.

    The socket file is made group-accessible only (umask 007) and owned by
    uid:gid, so that the unprivileged QEMU can connect to it. With
    `check_peer`, a client whose uid is neither `uid` nor 0 is turned away
    and the helper waits for the next one.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o007)
        try:
            listener.bind(path)
        except OSError as err:
            raise _step_failed(f"binding socket {path}", err) from err
        finally:
            os.umask(old_umask)
        try:
            os.chown(path, uid, gid)
            listener.listen(1)
        except OSError as err:
            raise _step_failed(f"preparing socket {path}", err) from err
        logger.info("waiting for QEMU to connect to %s", path)
        while True:
            try:
                connection, _ = listener.accept()
            except OSError as err:
                raise _step_failed(f"accepting a connection on {path}", err) from err
            if not check_peer or _peer_allowed(connection, uid):
                return connection
            connection.close()
    finally:
        listener.close()


def _peer_allowed(connection: socket.socket, uid: int) -> bool:
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    peer_pid, peer_uid, _ = _PEERCRED.unpack(creds)
    # Root can already do whatever the helper can, so it is not turned away.
    if peer_uid in (uid, 0):
        return True
    logger.warning(
        "rejected a connection from pid %d, uid %d: only uid %d may connect "
        "(--no-peer-check allows any); waiting for the next one",
        peer_pid,
        peer_uid,
        uid,
    )
    return False


def adopt_socket(fd: int) -> socket.socket:
    """Wrap an inherited descriptor, which must be a connected unix stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise _step_failed(f"using descriptor {fd} as a socket", err) from err
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SetupError(f"descriptor {fd} is not a unix stream socket")
    return sock


SANDBOXES = ("namespace", "chroot", "none")


def _open_proc_fds() -> int | None:
    try:
        return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        logger.warning(
            "cannot open /proc/self/fd (%s); OPEN will check file types only "
            "after a non-blocking open, so device nodes get opened",
            os.strerror(err.errno or 0),
        )
        return None


def _pivot_into(path: str, readonly: bool) -> None:
    """Make `path` the root of a new mount namespace.

    The export is bind-mounted onto itself so it can become the root, with
    nodev and nosuid added, and ro under --readonly. These flags hold in the
    helper's namespace only, and the descriptors it passes on carry them:
    the kernel then refuses device opens and writes itself, whatever the
    request handlers let through.
    """
    target = os.fsencode(path)
    libc.unshare(libc.CLONE_NEWNS)
    # Private first, so that nothing below propagates back to the host.
    libc.mount(None, b"/", libc.MS_REC | libc.MS_PRIVATE)
    libc.mount(target, target, libc.MS_BIND | libc.MS_REC)
    flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_NODEV | libc.MS_NOSUID
    libc.mount(None, target, flags | (libc.MS_RDONLY if readonly else 0))
    os.chdir(target)
    # pivot_root(".", ".") stacks the old root on top of the new one, and the
    # lazy unmount then removes it, so no path leads back to the host.
    libc.pivot_root(b".", b".")
    libc.umount2(b".", libc.MNT_DETACH)
    os.chdir("/")


def _chroot_into(path: str) -> None:
    os.chroot(path)
    os.chdir("/")


def _drop_supplementary_groups() -> None:
    try:
        os.setgroups([])
    except PermissionError as err:
        # A user namespace whose /proc/PID/setgroups contains "deny" forbids it.
        logger.warning("cannot drop supplementary groups: %s", err.strerror)


def close_inherited_descriptors(keep: set[int]) -> None:
    """Close every descriptor from 3 up except those in `keep`, so nothing
    the parent left open, such as a host directory, reaches the export."""
    start = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def enter_export(
    path: str, sandbox: str = "namespace", policy: ExportPolicy | None = None
) -> Operations:
    """Confine the process to `path`, drop privileges, return the handlers.

    `sandbox` is "namespace" (a private mount namespace whose root is the
    export, falling back to chroot where the kernel refuses one), "chroot"
    or "none".
    """
    policy = policy or ExportPolicy()
    if sandbox == "none":
        return _stay_unconfined(path, policy)
    # Opened before the export becomes the root, which hides /proc.
    proc_fd_dir = _open_proc_fds()
    in_namespace = False
    try:
        if sandbox == "namespace":
            try:
                _pivot_into(path, policy.readonly)
                in_namespace = True
            except OSError as err:
                logger.warning(
                    "cannot set up a mount namespace (%s); falling back to chroot",
                    err.strerror,
                )
                _chroot_into(path)
        else:
            _chroot_into(path)
    except OSError as err:
        raise _step_failed(f"confining the helper to {path}", err) from err
    try:
        fs_type = libc.statfs(b"/").f_type
    except OSError as err:
        raise _step_failed("examining the export", err) from err
    os.umask(0)
    try:
        # Root's supplementary groups would let a guest user's new files
        # keep a setgid bit for groups that user is not in.
        _drop_supplementary_groups()
        limit_capabilities()
    except OSError as err:
        raise _step_failed("dropping privileges", err) from err
    getversion = fs_type in GETVERSION_FILESYSTEMS
    root_fd = _open_root_for_openat2()
    if in_namespace:
        # The export is a bind mount there, and the kernel stops ".." at a
        # bind mount's root even for a directory moved out of it.
        return Operations(proc_fd_dir, getversion, policy, root_fd)
    if root_fd is None or proc_fd_dir is None:
        logger.warning(
            "chroot without openat2 or /proc: a host user who can move "
            "directories out of the export can make lookups escape it"
        )
        return Operations(proc_fd_dir, getversion, policy, root_fd)
    # In a chroot, a directory moved out of the export mid-lookup lets ".."
    # climb past the root, so every path goes through openat2.
    return unconfined.UnconfinedOperations(
        proc_fd_dir, getversion, policy, root_fd, kernel_root=True
    )


def _open_root_for_openat2() -> int | None:
    root_fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(libc.openat2(root_fd, b"/", os.O_PATH, libc.RESOLVE_IN_ROOT))
    except OSError as err:
        os.close(root_fd)
        logger.warning(
            "openat2 is not available (%s); OPEN relies on the sandbox alone",
            err.strerror,
        )
        return None
    else:
        return root_fd


def _stay_unconfined(path: str, policy: ExportPolicy) -> Operations:
    """Serve `path` without a namespace or chroot, resolving with openat2."""
    try:
        unconfined.check_supported()
        root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        proc_fd_dir = os.open(
            "/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        )
        os.fchdir(root_fd)
        fs_type = libc.statfs(os.fsencode(path)).f_type
    except OSError as err:
        raise _step_failed(
            f"--sandbox none on {path} (needs openat2 and /proc)", err
        ) from err
    os.umask(0)
    try:
        _drop_supplementary_groups()
        limit_capabilities()
    except OSError as err:
        raise _step_failed("dropping privileges", err) from err
    getversion = fs_type in GETVERSION_FILESYSTEMS
    return unconfined.UnconfinedOperations(proc_fd_dir, getversion, policy, root_fd)
