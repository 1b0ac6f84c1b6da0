"""The seccomp filter, in child processes and around the helper's request loop.

The helper installs the filter at start-up, so every other test of the
helper process runs under it too; the tests here check the filter itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest

from harness import running_helper
from virtfs_proxy_helper import protocol as p
from virtfs_proxy_helper import seccomp
from virtfs_proxy_helper.client import status_of
from virtfs_proxy_helper.operations import FS_IOC_GETVERSION

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
FIONREAD = 0x541B

pytestmark = pytest.mark.skipif(
    not seccomp.available(), reason="the filter supports only 64-bit x86_64"
)

# The helper's command line entry point with its own filter turned off and
# one with a custom allow-list installed in its place, once start-up has
# confined the process. cli.py imported enter_export by name, so the
# replacement goes into cli's namespace.
CUSTOM_FILTER_HELPER = """\
import sys
from virtfs_proxy_helper import cli, sandbox, seccomp

def enter_export_then_filter(*args, **kwargs):
    operations = sandbox.enter_export(*args, **kwargs)
    seccomp.install({allowed!r})
    return operations

cli.enter_export = enter_export_then_filter
sys.exit(cli.main(sys.argv[1:] + ["--no-seccomp"]))
"""


def custom_filter_helper(allowed: Iterable[str]) -> list[str]:
    """Return a helper command whose request loop allows only `allowed`."""
    code = CUSTOM_FILTER_HELPER.format(allowed=tuple(allowed))
    return [sys.executable, "-c", code]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child Python that has `seccomp` imported."""
    source = "from virtfs_proxy_helper import seccomp\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# The filter in a child process.


def test_allowed_calls_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"data")
    result = run_python(f"""
        import os
        seccomp.install()
        os.getpid()
        os.lstat({str(tmp_path / "file")!r})
        os.close(os.open({str(tmp_path / "file")!r}, os.O_RDONLY))
        os.write(1, b"ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok"


@pytest.mark.parametrize(
    "call",
    ["os.getpriority(os.PRIO_PROCESS, 0)", "socket.socket()", "os.pipe()"],
)
def test_unlisted_call_fails_with_enosys(call: str) -> None:
    result = run_python(f"""
        import os, socket
        seccomp.install()
        try:
            {call}
        except OSError as err:
            os.write(1, str(err.errno).encode())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == str(errno.ENOSYS)


@pytest.mark.parametrize(
    "call",
    [
        "os.chroot('/')",
        "os.execv('/bin/true', ['true'])",
        # getpid through the x32 ABI, which shares the x86_64 arch value.
        "ctypes.CDLL(None).syscall(39 | 0x40000000)",
    ],
)
def test_killed_call_ends_with_sigsys(call: str) -> None:
    result = run_python(f"""
        import ctypes, os
        seccomp.install()
        {call}
        os.write(1, b"survived")
    """)
    assert result.returncode == -signal.SIGSYS
    assert result.stdout == ""


@pytest.fixture
def generation_file(tmp_path: Path) -> tuple[Path, int]:
    """A file and its inode generation, read without the filter."""
    path = tmp_path / "file"
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    try:
        value = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
    except OSError as err:
        pytest.skip(f"no inode generations on this filesystem: {err.strerror}")
    finally:
        os.close(fd)
    return path, int.from_bytes(value, sys.byteorder)


def test_getversion_ioctl_allowed(generation_file: tuple[Path, int]) -> None:
    path, generation = generation_file
    result = run_python(f"""
        import fcntl, os
        fd = os.open({str(path)!r}, os.O_RDONLY)
        seccomp.install()
        value = fcntl.ioctl(fd, seccomp.FS_IOC_GETVERSION, bytes(8))
        os.write(1, str(int.from_bytes(value, "little")).encode())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == str(generation)


def test_ioctl_request_upper_half_ignored(generation_file: tuple[Path, int]) -> None:
    # The kernel truncates the request to 32 bits, and so does the filter.
    path, _ = generation_file
    result = run_python(f"""
        import ctypes, os
        fd = os.open({str(path)!r}, os.O_RDONLY)
        buffer = ctypes.create_string_buffer(8)
        request = ctypes.c_ulong((1 << 32) | seccomp.FS_IOC_GETVERSION)
        seccomp.install()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(16, fd, request, buffer) != 0:
            os.write(1, str(ctypes.get_errno()).encode())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_other_ioctl_fails_with_enotty() -> None:
    result = run_python(f"""
        import fcntl, os
        read_end, write_end = os.pipe()
        os.write(write_end, b"abc")
        before = fcntl.ioctl(read_end, {FIONREAD}, bytes(4))
        seccomp.install()
        try:
            fcntl.ioctl(read_end, {FIONREAD}, bytes(4))
        except OSError as err:
            os.write(1, b"%d %d" % (before[0], err.errno))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"3 {errno.ENOTTY}"


def test_status_shows_filter() -> None:
    parent_end, child_end = socket.socketpair()
    with parent_end, child_end:
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import socket
                from virtfs_proxy_helper import seccomp
                sock = socket.socket(fileno={child_end.fileno()})
                seccomp.install()
                sock.send(b"r")
                sock.recv(1)
            """)],
            pass_fds=[child_end.fileno()],
        )  # fmt: skip
        child_end.close()
        assert parent_end.recv(1) == b"r"
        status = Path(f"/proc/{child.pid}/status").read_text()
    assert child.wait(timeout=10) == 0
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)


def test_other_architecture_unavailable() -> None:
    result = run_python("""
        import os
        seccomp.platform.machine = lambda: "aarch64"
        try:
            seccomp.install()
        except seccomp.SeccompUnavailable as err:
            os.write(1, str(err).encode())
        os.write(1, open("/proc/self/status").read().encode())
    """)
    assert result.returncode == 0, result.stderr
    assert "not aarch64" in result.stdout
    assert re.search(r"^NoNewPrivs:\s+0$", result.stdout, re.MULTILINE)


# The program, without installing it.


def test_numbers_match_kernel_headers() -> None:
    if not UNISTD_64.exists():
        pytest.skip(f"{UNISTD_64} not installed (linux-libc-dev)")
    defined = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD_64.read_text()))
    for name, number in seccomp.SYSCALL_NUMBERS.items():
        assert defined.get(name) == str(number), name


def test_unknown_name_rejected() -> None:
    with pytest.raises(ValueError, match="no_such_call"):
        seccomp.build_program(["write", "no_such_call"])


def test_killed_name_rejected() -> None:
    with pytest.raises(ValueError, match="execve"):
        seccomp.build_program(["write", "execve"])


def test_jumps_stay_in_program() -> None:
    program = seccomp.build_program(seccomp.REQUEST_LOOP_SYSCALLS)
    for index, (code, jt, jf, _) in enumerate(program):
        if code & 0x07 == 0x05:
            assert index + 1 + max(jt, jf) < len(program), index
    assert program[-1] == seccomp.ret(seccomp.DEFAULT_ACTION)


# The helper's request loop under the filter.


def test_helper_runs_under_filter(helper_command: list[str], export: Path) -> None:
    with running_helper(helper_command, export) as helper:
        assert helper.client.call(p.Lstat(b"/")).status == 0
        status = helper.status()
    assert status["Seccomp"] == "2"
    assert status["Seccomp_filters"] == "1"
    assert status["NoNewPrivs"] == "1"


def test_no_seccomp_option(helper_command: list[str], export: Path) -> None:
    with running_helper(helper_command, export, ["--no-seccomp"]) as helper:
        assert helper.client.call(p.Lstat(b"/")).status == 0
        status = helper.status()
    assert status["Seccomp"] == "0"
    assert status["NoNewPrivs"] == "0"


def test_unlisted_call_becomes_error_reply(export: Path) -> None:
    allowed = set(seccomp.REQUEST_LOOP_SYSCALLS) - {"mkdir"}
    with running_helper(custom_filter_helper(allowed), export) as helper:
        reply = helper.client.call(p.Mkdir(0, 0, b"/made", 0o755))
        assert status_of(reply) == -errno.ENOSYS
        assert helper.client.call(p.Lstat(b"/")).status == 0
        returncode, stderr = helper.close()
    assert returncode == 0, stderr
    assert not (export / "made").exists()
