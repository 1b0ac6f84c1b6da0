#!/usr/bin/env python3
"""Boot a throwaway Linux guest that mounts a directory exported by a 9p proxy helper.

The host runs the helper as root and QEMU as uid/gid 65534, as in production. The
guest is the host's Debian kernel with a busybox initramfs whose /init mounts the
share at /mnt, runs a workload script there and powers off. Mode "local" serves the
share from QEMU itself (-fsdev local, security_model=passthrough) without a helper,
as a baseline. QEMU then runs as root, because passthrough sets owners itself.

    python3 guest/vm.py --helper /usr/lib/qemu/virtfs-proxy-helper --mode socket \\
        --export /tmp/share --workload guest/workload.sh
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

if __package__ in (None, ""):
    # Run as "python3 guest/vm.py": make the guest package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.initramfs import (  # noqa: E402
    DEFAULT_MSIZE,
    END_MARKER_RE,
    MOUNT_TAG,
    START_MARKER,
    InitramfsError,
    build_base_initramfs,
    build_workload_initramfs,
    find_kernel_release,
)

QEMU = "qemu-system-x86_64"
QEMU_UID = 65534
QEMU_GID = 65534
KEY_VALUE_RE = re.compile(r"^([a-z0-9_]+)=(.*)$", re.MULTILINE)

Mode = Literal["socket", "fd", "local"]


class GuestError(RuntimeError):
    """A guest run that ended before its workload finished, with the logs so far."""

    def __init__(self, message: str, console: str = "", helper_stderr: str = ""):
        super().__init__(message)
        self.console = console
        self.helper_stderr = helper_stderr

    def __str__(self) -> str:
        text = super().__str__()
        if self.console:
            text += "\n--- guest console (last 40 lines) ---\n" + _tail(self.console)
        if self.helper_stderr:
            text += "\n--- helper stderr (last 40 lines) ---\n"
            text += _tail(self.helper_stderr)
        return text


class GuestTimeout(GuestError):
    """A guest run that did not finish within its timeout."""


@dataclass
class GuestResult:
    """The outcome of one guest run."""

    stdout: str
    """Workload output, stdout and stderr merged, with "\\n" line ends."""
    status: int
    """Exit status of the workload script."""
    helper_returncode: int
    """Negative when the harness had to kill the helper, as with subprocess. Always 0
    in local mode, which has no helper."""
    helper_stderr: str
    """The helper's log (stderr in --nodaemon mode), with its stdout merged in."""
    qemu_returncode: int
    qemu_stderr: str
    console: str
    """The whole serial console, boot messages included."""
    elapsed: float
    """Seconds from starting the helper to QEMU's exit."""

    def values(self) -> dict[str, str]:
        """Return the workload's "key=value" lines as a dict (the last one wins)."""
        return parse_key_values(self.stdout)


def parse_key_values(text: str) -> dict[str, str]:
    """Parse lines of the form "key=value" where key is [a-z0-9_]+."""
    return {match[1]: match[2] for match in KEY_VALUE_RE.finditer(text)}


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _prepare_run_dir(release: str, workload: bytes) -> Path:
    """Make a 0755 temporary dir holding the kernel and initrd, readable by QEMU.

    QEMU runs as uid 65534, which may not be able to reach the repo's cache or read
    /boot/vmlinuz-* (some distributions install it with mode 0600), so both files
    are copied here.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="vm-"))
    try:
        run_dir.chmod(0o755)
        shutil.copyfile(f"/boot/vmlinuz-{release}", run_dir / "vmlinuz")
        base = build_base_initramfs(release)
        with open(run_dir / "initrd.img", "wb") as initrd:
            initrd.write(base.read_bytes())
            initrd.write(build_workload_initramfs(workload))
        for name in ("vmlinuz", "initrd.img"):
            (run_dir / name).chmod(0o644)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


class _Reader(threading.Thread):
    """A thread that reads a pipe into memory, so the child never blocks writing."""

    def __init__(self, stream: IO[bytes], echo: IO[str] | None = None) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._echo = echo
        self._chunks: list[bytes] = []

    def run(self) -> None:
        with self._stream:
            while chunk := os.read(self._stream.fileno(), 65536):
                self._chunks.append(chunk)
                if self._echo is not None:
                    self._echo.write(chunk.decode(errors="replace").replace("\r", ""))
                    self._echo.flush()

    def text(self) -> str:
        self.join(timeout=5)
        data = b"".join(self._chunks).decode(errors="replace")
        return data.replace("\r\n", "\n").replace("\r", "")


def _start_reader(stream: IO[bytes] | None, echo: IO[str] | None = None) -> _Reader:
    assert stream is not None
    reader = _Reader(stream, echo)
    reader.start()
    return reader


def _stop(process: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """Terminate a process that this module started, then kill it if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_for_socket(
    path: Path, helper: subprocess.Popen[bytes], deadline: float
) -> None:
    while not path.exists():
        if helper.poll() is not None:
            raise GuestError(
                f"helper exited with status {helper.returncode} before creating {path}"
            )
        if time.monotonic() > deadline:
            raise GuestTimeout(f"timed out waiting for the helper to create {path}")
        time.sleep(0.01)
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise GuestError(f"{path} is not a socket")


def qemu_command(
    run_dir: Path, fsdev: str, msize: int, unprivileged: bool = True
) -> list[str]:
    """Return the QEMU command line, run as uid/gid 65534 through setpriv unless
    unprivileged is false."""
    append = (
        "console=ttyS0 quiet panic=-1 tsc=reliable no_timer_check "
        f"8250.nr_uarts=1 vm_msize={msize}"
    )
    setpriv = [
        "setpriv", f"--reuid={QEMU_UID}", f"--regid={QEMU_GID}", "--clear-groups",
        "--",
    ]  # fmt: skip
    return (setpriv if unprivileged else []) + [
        QEMU, "-accel", "tcg", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(run_dir / "vmlinuz"),
        "-initrd", str(run_dir / "initrd.img"),
        "-append", append,
        "-fsdev", fsdev,
        "-device", f"virtio-9p-pci,fsdev=fs0,mount_tag={MOUNT_TAG}",
    ]  # fmt: skip


@dataclass
class _Helper:
    """A started helper and the -fsdev option that connects QEMU to it."""

    process: subprocess.Popen[bytes]
    log: _Reader
    fsdev: str
    qemu_socket: socket.socket | None
    """QEMU's end of the socketpair in fd mode, to be inherited by QEMU."""

    def stop(self) -> None:
        _stop(self.process)
        if self.qemu_socket is not None:
            self.qemu_socket.close()


def _start_helper(
    command: Sequence[str], mode: Mode, export: Path, run_dir: Path, deadline: float
) -> _Helper:
    """Start the helper, and in socket mode wait until it listens."""
    if mode == "socket":
        socket_path = run_dir / "proxy.sock"
        process = subprocess.Popen(
            [*command, "--nodaemon", "-u", str(QEMU_UID), "-g", str(QEMU_GID),
             "-s", str(socket_path), "-p", str(export)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        helper = _Helper(
            process,
            _start_reader(process.stdout),
            f"proxy,id=fs0,socket={socket_path}",
            None,
        )
        try:
            _wait_for_socket(socket_path, process, deadline)
        except GuestError as error:
            helper.stop()
            error.helper_stderr = helper.log.text()
            raise
        return helper

    helper_end, qemu_end = socket.socketpair()
    with helper_end:
        # The helper inherits its end under the same fd number. Moving it to a fixed
        # number such as 3 would need preexec_fn, which can clobber the pipe that
        # subprocess uses to report exec errors.
        try:
            process = subprocess.Popen(
                [*command, "--nodaemon", "--fd", str(helper_end.fileno()),
                 "--path", str(export)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(helper_end.fileno(),),
            )  # fmt: skip
        except BaseException:
            qemu_end.close()
            raise
    return _Helper(
        process,
        _start_reader(process.stdout),
        f"proxy,id=fs0,sock_fd={qemu_end.fileno()}",
        qemu_end,
    )


def run_guest(
    helper: Sequence[str],
    mode: Mode,
    export: Path | str,
    workload: Path | str | bytes,
    *,
    timeout: float = 300.0,
    helper_exit_timeout: float = 10.0,
    msize: int = DEFAULT_MSIZE,
    echo: IO[str] | None = None,
) -> GuestResult:
    """Boot a guest that mounts `export` through `helper` and runs `workload` there.

    helper is the helper command without its options, for example
    ["/usr/lib/qemu/virtfs-proxy-helper"]. mode "socket" lets the helper listen on a
    Unix socket, and mode "fd" hands it one end of a socketpair. Mode "local" ignores
    helper and has QEMU, as root, serve export itself. workload is a shell
    script path or its bytes. After QEMU exits, the helper gets helper_exit_timeout
    seconds to exit by itself before it is terminated. echo, if given, receives the
    serial console as it arrives. Raises GuestTimeout after `timeout` seconds and
    GuestError when the guest ends without finishing the workload. Needs root.
    """
    if os.geteuid() != 0:
        raise GuestError("run_guest needs root: the helper must run as root")
    if mode not in ("socket", "fd", "local"):
        raise ValueError(f"invalid mode {mode!r}: expected 'socket', 'fd' or 'local'")
    export = Path(export).resolve()
    if not export.is_dir():
        raise GuestError(f"export dir not found: {export}")
    if not isinstance(workload, bytes):
        workload = Path(workload).read_bytes()

    run_dir = _prepare_run_dir(find_kernel_release(), workload)
    try:
        start = time.monotonic()
        deadline = start + timeout
        if mode == "local":
            # QEMU's option syntax escapes a comma in a value by doubling it.
            path = str(export).replace(",", ",,")
            fsdev = f"local,id=fs0,path={path},security_model=passthrough"
            return _run_qemu(
                None, fsdev, run_dir, msize, start, deadline, echo, helper_exit_timeout
            )
        helper_run = _start_helper(helper, mode, export, run_dir, deadline)
        try:
            return _run_qemu(
                helper_run,
                helper_run.fsdev,
                run_dir,
                msize,
                start,
                deadline,
                echo,
                helper_exit_timeout,
            )
        finally:
            helper_run.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_qemu(
    helper: _Helper | None,
    fsdev: str,
    run_dir: Path,
    msize: int,
    start: float,
    deadline: float,
    echo: IO[str] | None,
    helper_exit_timeout: float,
) -> GuestResult:
    """Run QEMU against a started helper, or None in local mode, until it exits,
    and collect the result."""
    qemu_socket = None if helper is None else helper.qemu_socket
    qemu_fds = () if qemu_socket is None else (qemu_socket.fileno(),)
    qemu = subprocess.Popen(
        qemu_command(run_dir, fsdev, msize, unprivileged=helper is not None),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=qemu_fds,
    )
    try:
        # Close the parent's copy so that the helper reads EOF when QEMU exits.
        if qemu_socket is not None:
            qemu_socket.close()
        console_log = _start_reader(qemu.stdout, echo)
        qemu_log = _start_reader(qemu.stderr)
        try:
            qemu.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(qemu)
            if helper is not None:
                helper.stop()
            raise GuestTimeout(
                f"timed out: the guest did not finish within {deadline - start:.0f} s",
                console_log.text(),
                "" if helper is None else helper.log.text(),
            ) from None
        elapsed = time.monotonic() - start
    finally:
        _stop(qemu)

    helper_returncode = 0
    helper_stderr = ""
    if helper is not None:
        try:
            helper.process.wait(timeout=helper_exit_timeout)
        except subprocess.TimeoutExpired:
            helper.stop()
        helper_returncode = helper.process.returncode
        helper_stderr = helper.log.text()
    console = console_log.text()
    qemu_stderr = qemu_log.text()
    workload = _parse_console(console)
    if workload is None:
        raise GuestError(
            "guest ended without finishing the workload (QEMU exit status "
            f"{qemu.returncode}, helper exit code {helper_returncode}); "
            f"QEMU stderr: {qemu_stderr.strip() or '(empty)'}",
            console,
            helper_stderr,
        )
    output, status = workload
    return GuestResult(
        stdout=output,
        status=status,
        helper_returncode=helper_returncode,
        helper_stderr=helper_stderr,
        qemu_returncode=qemu.returncode,
        qemu_stderr=qemu_stderr,
        console=console,
        elapsed=elapsed,
    )


def _parse_console(console: str) -> tuple[str, int] | None:
    """Return the workload output and exit status between the console markers."""
    start = console.find(START_MARKER + "\n")
    if start < 0:
        return None
    end = END_MARKER_RE.search(console, start)
    if end is None:
        return None
    return console[start + len(START_MARKER) + 1 : end.start()], int(end[1])


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Boot a QEMU guest that mounts the export dir through a 9p proxy "
        "helper and runs a workload script in it, then print the workload output. "
        "Needs root.",
        epilog="Exit status: the workload's status if it failed, else 1 if the "
        "helper exited with a non-zero code, else 0. 2 when the guest did not "
        "finish the workload.",
    )
    parser.add_argument(
        "--helper",
        default="",
        help="helper command, split like a shell command line, "
        "for example /usr/lib/qemu/virtfs-proxy-helper; required unless --mode local",
    )
    parser.add_argument(
        "--mode",
        choices=("socket", "fd", "local"),
        default="socket",
        help="socket: the helper listens on a Unix socket (-s); fd: the helper gets "
        "one end of a socketpair (--fd); local: no helper, QEMU runs as root and "
        "serves the export itself. Default: socket",
    )
    parser.add_argument("--export", required=True, type=Path, help="dir to share")
    parser.add_argument(
        "--workload", required=True, type=Path, help="shell script to run in /mnt"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds before QEMU and the helper are killed. Default: 300",
    )
    parser.add_argument(
        "--msize",
        type=int,
        default=DEFAULT_MSIZE,
        help=f"9p msize mount option in bytes. Default: {DEFAULT_MSIZE}",
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="echo the whole serial console to stderr as it arrives",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    if args.mode != "local" and not args.helper:
        parser.error("--helper is required unless --mode is local")

    try:
        result = run_guest(
            shlex.split(args.helper),
            args.mode,
            args.export,
            args.workload,
            timeout=args.timeout,
            msize=args.msize,
            echo=sys.stderr if args.console else None,
        )
    except (GuestError, InitramfsError) as error:
        print(f"vm.py: {error}", file=sys.stderr)
        return 2

    sys.stdout.write(result.stdout)
    print(
        f"vm.py: workload exit status {result.status}, helper exit code "
        f"{result.helper_returncode}, {result.elapsed:.1f} s",
        file=sys.stderr,
    )
    if result.helper_stderr.strip():
        print(
            "vm.py: helper stderr:\n" + result.helper_stderr.rstrip(), file=sys.stderr
        )
    if result.status != 0:
        return result.status
    return 0 if result.helper_returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
