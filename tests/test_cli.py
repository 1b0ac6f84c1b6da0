"""Command-line tests: the installed helper run as a subprocess, as root.

Usage errors must exit with status 1 before the helper binds a socket or forks.
The mode tests start the helper for real, send it an LSTAT as QEMU would,
and check how it exits.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import our_helper, running_helper, wait_for_path
from virtfs_proxy_helper.client import Client, parse_stat
from virtfs_proxy_helper.protocol import Lstat

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the helper must run as root")

HELPER = our_helper()
PROG = "virtfs-proxy-helper"
ERROR_PREFIX = f"{PROG}: error: "
# The uid of nobody and gid of nogroup on Debian systems.
NOBODY = 65534
# Longer than any run of the helper should take, so that a hung helper fails
# the test instead of stalling the suite.
TIMEOUT = 30


def run_helper(
    args: list[str], pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        HELPER + args,
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@contextmanager
def started_helper(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start the helper with stderr piped, and kill it if it still runs afterwards."""
    process = subprocess.Popen(
        HELPER + args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def connect_when_listening(
    path: Path, process: subprocess.Popen[bytes], timeout: float = 10
) -> socket.socket:
    """Connect to the helper's socket, retrying while it is bound but not listening."""
    wait_for_path(path, process, timeout)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            sock.close()
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return sock


def check_lstat_of_export(client: Client, export: Path) -> None:
    """Assert that an LSTAT of "/" describes the export directory."""
    reply = client.call(Lstat(b"/"))
    assert reply.status == 0
    attributes = parse_stat(reply.payload)
    assert stat.S_ISDIR(attributes.st_mode)
    assert attributes.st_ino == os.stat(export).st_ino


# Each case: command-line arguments and the error message after ERROR_PREFIX.
# {export} is a directory, {file} a regular file, {file_fd} a descriptor open on
# it, {tmp} a directory that does not contain "sock" or "missing", and
# {long_socket} a path of 108 bytes.
USAGE_ERRORS = [
    pytest.param(["-f", "0"], "--path is required", id="no-path"),
    pytest.param(
        ["-p", "{export}"], "one of --socket or --fd is required", id="no-socket-or-fd"
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{tmp}/sock", "-u", "0", "-g", "0", "-f", "0"],
        "--socket and --fd cannot be used together",
        id="socket-and-fd",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{tmp}/sock"],
        "--socket requires --uid and --gid",
        id="socket-without-ids",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{tmp}/sock", "-g", "0"],
        "--socket requires --uid and --gid",
        id="socket-without-uid",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{tmp}/sock", "-u", "0"],
        "--socket requires --uid and --gid",
        id="socket-without-gid",
    ),
    pytest.param(
        ["-p", "{tmp}/missing", "-f", "0"],
        "--path {tmp}/missing: No such file or directory",
        id="path-missing",
    ),
    pytest.param(
        ["-p", "{file}", "-f", "0"],
        "--path {file}: not a directory",
        id="path-is-file",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{file}", "-u", "0", "-g", "0"],
        "--socket {file}: already exists; remove it or pick another path",
        id="socket-exists",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{long_socket}", "-u", "0", "-g", "0"],
        "--socket {long_socket}: longer than the 107-byte limit for unix socket paths",
        id="socket-path-108-bytes",
    ),
    pytest.param(
        ["-p", "{export}", "-f", "999"],
        "--fd 999: Bad file descriptor",
        id="fd-not-open",
    ),
    pytest.param(
        ["-p", "{export}", "-f", "{file_fd}"],
        "--fd {file_fd}: not a socket",
        id="fd-is-file",
    ),
    pytest.param(
        ["-p", "{export}", "-f", "abc"],
        "argument -f/--fd: not a descriptor number: abc",
        id="fd-not-number",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{tmp}/sock", "-u", "no-such-user", "-g", "0"],
        "argument -u/--uid: no such user: no-such-user",
        id="unknown-user",
    ),
    pytest.param(
        ["-p", "{export}", "-s", "{tmp}/sock", "-u", "0", "-g", "no-such-group"],
        "argument -g/--gid: no such group: no-such-group",
        id="unknown-group",
    ),
    pytest.param(
        ["-p", "{export}", "-f", "0", "--bogus"],
        "unrecognized arguments: --bogus",
        id="unknown-option",
    ),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_usage_error_exits_1(
    args: list[str], message: str, export: Path, tmp_path: Path
) -> None:
    file = tmp_path / "file"
    file.write_text("not a directory\n")
    long_socket = str(tmp_path / "s")
    long_socket += "s" * (108 - len(long_socket))
    file_fd = os.open(file, os.O_RDONLY)
    try:
        values = {
            "export": str(export),
            "file": str(file),
            "file_fd": str(file_fd),
            "tmp": str(tmp_path),
            "long_socket": long_socket,
        }
        # With --nodaemon, a check that stops working leaves a helper that
        # times out here instead of a daemon that outlives the test.
        command = ["--nodaemon", *(arg.format(**values) for arg in args)]
        result = run_helper(command, pass_fds=(file_fd,))
    finally:
        os.close(file_fd)

    assert len(long_socket) == 108
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == ERROR_PREFIX + message.format(**values)
    assert lines[1].startswith(f"usage: {PROG} ")
    # The usage continues on indented lines and nothing follows it.
    assert all(line.startswith(" ") for line in lines[2:])
    assert not (tmp_path / "sock").exists()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_option(flag: str) -> None:
    result = run_helper([flag])
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: {PROG} ")
    options = [
        ("-p", "--path"),
        ("-f", "--fd"),
        ("-s", "--socket"),
        ("-u", "--uid"),
        ("-g", "--gid"),
        ("-n", "--nodaemon"),
    ]
    for short, long in options:
        # Matches "-p PATH, --path PATH" and the newer "-p, --path PATH".
        pattern = rf"(?<![\w-]){short}( \S+)?, {long}\b"
        assert re.search(pattern, result.stdout), f"{short}, {long} missing"


def test_socket_mode_serves_one_client(export: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "proxy.sock"
    ids = ["-u", str(NOBODY), "-g", str(NOBODY)]
    args = ["-n", *ids, "-s", str(socket_path), "-p", str(export)]
    with started_helper(args) as process:
        sock = connect_when_listening(socket_path, process)
        with sock:
            # The helper chowns before it listens, so the owner is final once
            # a connection succeeds.
            info = os.lstat(socket_path)
            assert stat.S_ISSOCK(info.st_mode)
            assert info.st_uid == NOBODY
            assert info.st_gid == NOBODY
            assert info.st_mode & 0o007 == 0
            check_lstat_of_export(Client(sock), export)

            # The reply proves the helper has accepted and closed its listener.
            second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with second, pytest.raises(ConnectionRefusedError):
                second.connect(str(socket_path))
        _, stderr_bytes = process.communicate(timeout=TIMEOUT)

    stderr = stderr_bytes.decode()
    assert process.returncode == 0
    assert "Started" in stderr
    assert "Done" in stderr


def test_socket_path_107_bytes_accepted(export: Path, tmp_path: Path) -> None:
    name_length = 107 - len(str(tmp_path)) - 1
    if name_length < 1:
        pytest.skip(f"temporary directory {tmp_path} is too long")
    socket_path = tmp_path / ("s" * name_length)
    assert len(str(socket_path)) == 107
    args = ["-n", "-u", "0", "-g", "0", "-s", str(socket_path), "-p", str(export)]
    with started_helper(args) as process:
        with connect_when_listening(socket_path, process) as sock:
            check_lstat_of_export(Client(sock), export)
        _, stderr_bytes = process.communicate(timeout=TIMEOUT)

    stderr = stderr_bytes.decode()
    assert process.returncode == 0
    assert "Done" in stderr


def test_socket_in_missing_directory(export: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "missing" / "proxy.sock"
    args = ["-n", "-u", "0", "-g", "0", "-s", str(socket_path), "-p", str(export)]
    result = run_helper(args)
    assert result.returncode == 1
    expected = f"binding socket {socket_path} failed: No such file or directory"
    assert expected in result.stderr


@pytest.mark.parametrize("requests", [0, 1], ids=["idle", "after-lstat"])
def test_fd_mode_exits_on_close(export: Path, requests: int) -> None:
    with running_helper(HELPER, export) as helper:
        for _ in range(requests):
            check_lstat_of_export(helper.client, export)
        status, stderr = helper.close(timeout=TIMEOUT)

    assert status == 0
    assert "Started" in stderr
    assert "Done" in stderr


def test_fd_mode_rejects_datagram_socket(export: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        fd = theirs.fileno()
        args = ["-n", "-f", str(fd), "-p", str(export)]
        result = run_helper(args, pass_fds=(fd,))
    assert result.returncode == 1
    assert f"descriptor {fd} is not a unix stream socket" in result.stderr


def find_socket_holder(inode: int) -> int:
    """Return the pid of the other process that has socket `inode` open."""
    link = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") == link for fd in fds):
                return int(entry)
        except OSError:
            # The process exited or closed the descriptor while being read.
            continue
    raise LookupError(f"no other process has {link} open")


def process_running(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie.

    The daemon's parent exits, so an init that does not reap orphans may
    leave it as a zombie after it exits.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Poll until `pid` stops running, and return False if `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_daemon_mode_detaches_and_serves(export: Path) -> None:
    ours, theirs = socket.socketpair()
    daemon_pid = None
    try:
        with theirs:
            fd = theirs.fileno()
            inode = os.fstat(fd).st_ino
            started = time.monotonic()
            # capture_output also checks that the daemon lets go of stdout and
            # stderr, because run() waits for both pipes to close.
            result = run_helper(["-f", str(fd), "-p", str(export)], pass_fds=(fd,))
            elapsed = time.monotonic() - started
        assert result.returncode == 0
        assert result.stdout == ""
        assert result.stderr == ""
        assert elapsed < 10

        # SO_PEERCRED on a socketpair names its creator, this process, so the
        # daemon is found by the descriptor it inherited instead.
        daemon_pid = find_socket_holder(inode)
        assert os.getsid(daemon_pid) == daemon_pid
        check_lstat_of_export(Client(ours), export)

        ours.close()
        assert wait_for_exit(daemon_pid, timeout=10), "daemon still runs after close"
    finally:
        ours.close()
        if daemon_pid is not None and process_running(daemon_pid):
            os.kill(daemon_pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name
)
def test_signal_stops_serving_helper(export: Path, signum: signal.Signals) -> None:
    with running_helper(HELPER, export) as helper, helper.client.sock:
        # A reply shows the helper is in its request loop with handlers set.
        check_lstat_of_export(helper.client, export)
        helper.process.send_signal(signum)
        _, stderr_bytes = helper.process.communicate(timeout=TIMEOUT)

    stderr = stderr_bytes.decode()
    assert helper.process.returncode == 0
    assert f"stopping on {signum.name}" in stderr
    assert "Done" in stderr


def test_sigterm_stops_accepting_helper(export: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "proxy.sock"
    args = ["-n", "-u", "0", "-g", "0", "-s", str(socket_path), "-p", str(export)]
    with started_helper(args) as process:
        wait_for_path(socket_path, process)
        # The handler is installed before the socket is bound.
        process.send_signal(signal.SIGTERM)
        _, stderr_bytes = process.communicate(timeout=TIMEOUT)

    stderr = stderr_bytes.decode()
    assert process.returncode == 0
    assert "stopping on SIGTERM" in stderr
    assert "Done" in stderr
