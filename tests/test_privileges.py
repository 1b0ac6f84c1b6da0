"""Capability limits and identity switches, run in child processes as root."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from virtfs_proxy_helper.privileges import EXIT_IDENTITY_LOST

KEPT_CAPS = "00000000080000db"
DAC_OVERRIDE_ONLY = "0000000000000002"


def run_child(body: str) -> subprocess.CompletedProcess[str]:
    """Run `body` in a fresh Python process, so its privilege changes end with it."""
    prelude = textwrap.dedent(
        """
        import os
        from virtfs_proxy_helper import privileges

        def status():
            fields = {}
            with open("/proc/self/status") as lines:
                for line in lines:
                    key, _, value = line.partition(":")
                    fields[key] = value.split()
            return fields

        def show(label):
            fields = status()
            print(label, fields["Uid"][1], fields["Gid"][1], fields["CapEff"][0],
                  fields["CapPrm"][0])
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("uid", "gid", "inside"),
    [
        (1000, 1000, f"1000 1000 {DAC_OVERRIDE_ONLY}"),
        (1000, 0, f"1000 0 {DAC_OVERRIDE_ONLY}"),
        (0, 1000, f"0 1000 {DAC_OVERRIDE_ONLY}"),
        (-1, 1000, f"0 1000 {DAC_OVERRIDE_ONLY}"),
        (0, 0, f"0 0 {KEPT_CAPS}"),
        (-1, -1, f"0 0 {KEPT_CAPS}"),
    ],
)
def test_identity_switch_and_restore(uid: int, gid: int, inside: str) -> None:
    child = run_child(
        f"""
        privileges.limit_capabilities()
        show("before")
        with privileges.identity({uid}, {gid}):
            show("inside")
        show("after")
        """
    )
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[0] == f"before 0 0 {KEPT_CAPS} {KEPT_CAPS}"
    assert lines[1] == f"inside {inside} {KEPT_CAPS}"
    assert lines[2] == f"after 0 0 {KEPT_CAPS} {KEPT_CAPS}"


def test_identity_restored_after_exception() -> None:
    child = run_child(
        """
        privileges.limit_capabilities()
        try:
            with privileges.identity(1000, 1000):
                os.mkdir("/nonexistent/dir")
        except FileNotFoundError:
            show("after")
        """
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == f"after 0 0 {KEPT_CAPS} {KEPT_CAPS}"


def test_failed_restore_exits_process() -> None:
    # The kernel always lets a process with real uid 0 return to euid 0, so
    # the failure is simulated by making the restoring setresuid call fail.
    child = run_child(
        """
        import errno, logging
        logging.basicConfig()
        privileges.limit_capabilities()
        real_setresuid = os.setresuid

        def failing_setresuid(ruid, euid, suid):
            if euid == 0:
                raise OSError(errno.EPERM, "simulated")
            real_setresuid(ruid, euid, suid)

        os.setresuid = failing_setresuid
        with privileges.identity(1000, 1000):
            pass
        print("still running")
        """
    )
    assert child.returncode == EXIT_IDENTITY_LOST
    assert "still running" not in child.stdout
    assert "failed to switch back to root" in child.stderr


def test_bounding_set_emptied() -> None:
    child = run_child(
        """
        privileges.limit_capabilities()
        print(status()["CapBnd"][0], status()["CapInh"][0])
        """
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["0000000000000000", "0000000000000000"]
