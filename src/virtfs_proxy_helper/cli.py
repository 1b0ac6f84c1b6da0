"""Command line: the options of QEMU's C helper, and the start-up sequence."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import pwd
import signal
import stat
import sys
from types import FrameType
from typing import NoReturn

from . import __version__, logs, protocol, seccomp
from .policy import ExportPolicy, IdMap, IdRange
from .sandbox import (
    MAX_SOCKET_PATH,
    SANDBOXES,
    SetupError,
    adopt_socket,
    close_inherited_descriptors,
    enter_export,
    listen_and_accept,
)
from .server import Server

logger = logging.getLogger(__name__)

PROG = "virtfs-proxy-helper"

DESCRIPTION = """\
Serve a directory to QEMU's 9p "proxy" filesystem driver. The helper runs
as root, confines itself to PATH, keeps only the capabilities that file
operations need, and serves QEMU's requests over a unix socket. Give
either --fd (a socket QEMU already holds the other end of) or --socket
with --uid and --gid (a named socket QEMU connects to)."""


class UsageError(Exception):
    """The command line is invalid; the message names what to fix."""


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived; derived from BaseException so that no
    request handler's error path catches it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _user_id(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {value}") from None


def _group_id(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {value}") from None


def _id_range(value: str) -> IdRange:
    parts = value.split(":")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"invalid range {value!r}: expected GUEST:HOST:COUNT, three numbers"
        )
    guest, host, count = map(int, parts)
    # The last id, 0xFFFFFFFF, means "unchanged" on the wire, never an owner.
    if count == 0 or max(guest, host) + count > protocol.NO_ID:
        raise argparse.ArgumentTypeError(f"invalid range {value!r}: out of bounds")
    return IdRange(guest, host, count)


def _descriptor(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a descriptor number: {value}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION)
    _add_c_helper_options(parser.add_argument_group("options of QEMU's C helper"))
    _add_sandbox_options(parser.add_argument_group("confinement and export policy"))
    _add_id_options(parser.add_argument_group("guest id mapping"))
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest severity to log; debug traces every request (default: info)",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser


def _add_c_helper_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("-p", "--path", help="directory to export (required)")
    parser.add_argument(
        "-f",
        "--fd",
        type=_descriptor,
        metavar="N",
        help="inherited descriptor of a connected unix stream socket",
    )
    parser.add_argument(
        "-s",
        "--socket",
        metavar="PATH",
        help="create a unix socket at PATH and serve the first client",
    )
    parser.add_argument(
        "-u",
        "--uid",
        type=_user_id,
        metavar="UID",
        help="owner of the --socket file, a number or user name",
    )
    parser.add_argument(
        "-g",
        "--gid",
        type=_group_id,
        metavar="GID",
        help="group of the --socket file, a number or group name",
    )
    parser.add_argument(
        "-n",
        "--nodaemon",
        action="store_true",
        help="stay in the foreground and log to stderr instead of syslog",
    )


def _add_sandbox_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--sandbox",
        choices=SANDBOXES,
        default="namespace",
        help="how to confine the helper to PATH: namespace (default) makes "
        "PATH the root of a private mount namespace, falling back to chroot "
        "where the kernel does not allow one; chroot does what QEMU's C helper "
        "does; none resolves every path with openat2 instead (Linux 5.6+)",
    )
    parser.add_argument(
        "--readonly",
        action="store_true",
        help="reject every request that would change PATH, with EROFS",
    )
    parser.add_argument(
        "--nosuid",
        action="store_true",
        help="strip setuid and setgid bits from modes guests set, and refuse "
        "file capabilities (security.capability)",
    )
    parser.add_argument(
        "--nodev",
        action="store_true",
        help="reject requests to create character and block device nodes, with EPERM",
    )

    parser.add_argument(
        "--no-peer-check",
        action="store_true",
        help="with --socket, accept a client of any uid, not only --uid or root",
    )
    parser.add_argument(
        "--no-seccomp",
        action="store_true",
        help="do not limit the request loop's system calls with a seccomp "
        "filter (for debugging)",
    )


def _add_id_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--map-uid",
        type=_id_range,
        action="append",
        default=[],
        metavar="GUEST:HOST:COUNT",
        help="store guest uids GUEST..GUEST+COUNT-1 as host uids from HOST; "
        "repeatable. Guest uids outside every range are rejected (EINVAL) "
        "unless --squash-uid is given",
    )
    parser.add_argument(
        "--map-gid",
        type=_id_range,
        action="append",
        default=[],
        metavar="GUEST:HOST:COUNT",
        help="the same for group ids",
    )
    parser.add_argument(
        "--squash-uid",
        type=_user_id,
        metavar="UID",
        help="store every guest uid that no --map-uid range covers as this "
        "host uid; with no ranges, every guest uid",
    )
    parser.add_argument(
        "--squash-gid",
        type=_group_id,
        metavar="GID",
        help="the same for group ids",
    )


def check_options(options: argparse.Namespace) -> None:
    """Reject option combinations and paths that cannot work."""
    if options.path is None:
        raise UsageError("--path is required")
    if options.socket is None and options.fd is None:
        raise UsageError("one of --socket or --fd is required")
    if options.socket is not None and options.fd is not None:
        raise UsageError("--socket and --fd cannot be used together")
    try:
        mode = os.stat(options.path).st_mode
    except OSError as err:
        raise UsageError(f"--path {options.path}: {err.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"--path {options.path}: not a directory")
    if options.socket is not None:
        _check_socket_path(options)
    else:
        _check_descriptor(options.fd)


def _check_socket_path(options: argparse.Namespace) -> None:
    if options.uid is None or options.gid is None:
        raise UsageError("--socket requires --uid and --gid")
    if len(os.fsencode(options.socket)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"--socket {options.socket}: longer than the {MAX_SOCKET_PATH}-byte "
            "limit for unix socket paths"
        )
    if os.path.lexists(options.socket):
        raise UsageError(
            f"--socket {options.socket}: already exists; remove it or pick another path"
        )


def _check_descriptor(fd: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise UsageError(f"--fd {fd}: {err.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--fd {fd}: not a socket")


def daemonize() -> None:
    """Detach from the terminal as daemon(3) does: fork, setsid, chdir /,
    and point stdin, stdout and stderr at /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


def _install_seccomp() -> None:
    try:
        seccomp.install()
    except seccomp.SeccompUnavailable as err:
        logger.warning("no seccomp filter: %s", err)
    except OSError as err:
        logger.warning("no seccomp filter: the kernel rejected it (%s)", err.strerror)


def run(options: argparse.Namespace) -> int:
    """Connect, enter the export and serve; return the exit status."""
    policy = ExportPolicy(
        options.readonly,
        options.nosuid,
        options.nodev,
        IdMap(tuple(options.map_uid), options.squash_uid),
        IdMap(tuple(options.map_gid), options.squash_gid),
    )
    try:
        if options.socket is not None:
            check_peer = not options.no_peer_check
            sock = listen_and_accept(
                options.socket, options.uid, options.gid, check_peer
            )
        else:
            sock = adopt_socket(options.fd)
        operations = enter_export(options.path, options.sandbox, policy)
    except SetupError as err:
        logger.error("%s; exiting", err)
        return 1
    if not options.no_seccomp:
        _install_seccomp()
    try:
        clean = Server(sock, operations).serve()
    finally:
        sock.close()
    return 0 if clean else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        options = parser.parse_args(argv)
        check_options(options)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        parser.print_usage(sys.stderr)
        return 1

    keep = set() if options.fd is None else {options.fd}
    close_inherited_descriptors(keep)
    if not options.nodaemon:
        daemonize()
    logs.configure(options.nodaemon, getattr(logging, options.log_level.upper()))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    logger.info("Started, exporting %s", options.path)
    try:
        status = run(options)
    except Terminated as signame:
        logger.info("stopping on %s", signame)
        status = 0
    logger.info("Done")
    return status


def entry_point() -> NoReturn:
    sys.exit(main())
