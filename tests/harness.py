"""Start a helper process, ours or QEMU's C one, and talk to it as QEMU would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from virtfs_proxy_helper.client import Client

C_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"


def our_helper() -> list[str]:
    """Return the command that runs this checkout's helper."""
    installed = shutil.which(
        "virtfs-proxy-helper", path=str(Path(sys.executable).parent)
    )
    if installed:
        return [installed]
    return [sys.executable, "-m", "virtfs_proxy_helper"]


class HelperProcess:
    """A running helper, the client connected to it, and its stderr."""

    def __init__(self, process: subprocess.Popen[bytes], client: Client):
        self.process = process
        self.client = client
        self.pid = process.pid

    def status(self) -> dict[str, str]:
        """Return the helper's /proc/PID/status fields."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        return fields

    def close(self, timeout: float = 10) -> tuple[int, str]:
        """Close the connection; return the helper's exit status and stderr."""
        self.client.sock.close()
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
            raise
        return self.process.returncode, stderr.decode(errors="backslashreplace")


@contextmanager
def running_helper(
    command: list[str], export: Path, extra: list[str] | None = None
) -> Iterator[HelperProcess]:
    """Run `command` in --fd mode on `export`, connected over a socketpair."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    args = command + ["--nodaemon", "--fd", str(fd), "--path", str(export)]
    process = subprocess.Popen(
        args + (extra or []), pass_fds=[fd], stderr=subprocess.PIPE
    )
    theirs.close()
    helper = HelperProcess(process, Client(ours))
    try:
        yield helper
    finally:
        ours.close()
        if process.poll() is None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()


def wait_for_path(
    path: Path, process: subprocess.Popen[bytes], timeout: float = 10
) -> None:
    """Wait until `path` exists, failing early if `process` exits."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise RuntimeError(f"helper exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
