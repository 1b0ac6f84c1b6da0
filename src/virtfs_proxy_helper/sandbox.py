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
import socket

from . import libc
from .operations import GETVERSION_FILESYSTEMS, Operations
from .privileges import limit_capabilities

logger = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, and the name needs a terminating NUL.
MAX_SOCKET_PATH = 107


class SetupError(Exception):
    """A start-up step failed; the message names the step and the cause."""


def _step_failed(step: str, err: OSError) -> SetupError:
    name = os.strerror(err.errno) if err.errno else str(err)
    return SetupError(f"{step} failed: {name}")


def listen_and_accept(path: str, uid: int, gid: int) -> socket.socket:
    """Create a unix socket at `path`, accept one connection, remove the listener.

    The socket file is made group-accessible only (umask 007) and owned by
    uid:gid, so that the unprivileged QEMU can connect to it.
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
        try:
            connection, _ = listener.accept()
        except OSError as err:
            raise _step_failed(f"accepting a connection on {path}", err) from err
    finally:
        listener.close()
    return connection


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


def enter_export(path: str) -> Operations:
    """Chroot into `path`, drop capabilities, and return the request handlers."""
    try:
        # Opened before chroot, which hides /proc, see Operations.open_checked.
        proc_fd_dir: int | None = os.open(
            "/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        )
    except OSError as err:
        logger.warning(
            "cannot open /proc/self/fd (%s); OPEN will check file types only "
            "after a non-blocking open, so device nodes get opened",
            os.strerror(err.errno or 0),
        )
        proc_fd_dir = None
    try:
        os.chroot(path)
    except OSError as err:
        raise _step_failed(f"chroot into {path}", err) from err
    try:
        os.chdir("/")
        fs_type = libc.statfs(b"/").f_type
    except OSError as err:
        raise _step_failed("examining the export after chroot", err) from err
    getversion_supported = fs_type in GETVERSION_FILESYSTEMS
    os.umask(0)
    try:
        limit_capabilities()
    except OSError as err:
        raise _step_failed("limiting capabilities", err) from err
    return Operations(proc_fd_dir, getversion_supported)
