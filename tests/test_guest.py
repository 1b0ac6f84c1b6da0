"""End-to-end tests: a QEMU guest mounts a dir through the proxy helper.

Each helper and mode boots one guest that runs guest/workload.sh, then the tests
check the workload's "key=value" lines and the files it left in the exported dir.
Our helper runs in both socket modes; QEMU's C helper runs the same workload once,
which shows that the expected values are the reference behaviour. Needs root, QEMU
and a Debian kernel; scripts/install-deps installs them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
WORKLOAD = REPO_DIR / "guest" / "workload.sh"

sys.path.insert(0, str(REPO_DIR))

from guest import initramfs, vm  # noqa: E402
from harness import C_HELPER, our_helper  # noqa: E402

pytestmark = pytest.mark.guest

HELPERS = {"ours": our_helper(), "c": [C_HELPER]}
RUNS = [("ours", "socket"), ("ours", "fd"), ("c", "socket")]

# Values that guest/workload.sh must print. big_sha256 and df_total_kb vary by run and
# are compared with the host side below.
EXPECTED_VALUES = {
    "create": "yes",
    "write_size": "21",
    "read": "hello from the guest",
    "append_lines": "2",
    "append_size": "33",
    "rename_old_gone": "yes",
    "rename_new": "second line",
    "link_count": "2",
    "link_same_inode": "yes",
    "readlink": "renamed.txt",
    "symlink_read": "hello from the guest",
    "unlink": "yes",
    "chmod": "640",
    "chown": "1000:1000",
    "chown_back": "0:0",
    "owned": "1000:1000",
    "truncate_shrink": "10",
    "truncate_content": "0123456789",
    "truncate_grow": "1000",
    "mtime": "981173106",
    "mkdir": "yes",
    "rmdir": "yes",
    "mkfifo": "yes",
    "fifo_type": "fifo",
    "df_filesystem": "share",
    "df_total_positive": "yes",
    "big_size": "33554432",
    "many_entries": "1000",
    "failures": "0",
}


@dataclass
class GuestRun:
    result: vm.GuestResult
    values: dict[str, str]
    export: Path
    workdir: Path
    """The dir that the workload made and left in the export."""


@pytest.fixture(scope="module", params=RUNS, ids=["-".join(run) for run in RUNS])
def guest_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GuestRun:
    helper, mode = request.param
    if os.geteuid() != 0:
        pytest.fail("the guest tests start the helper as root; run them as root")
    for tool in (vm.QEMU, "setpriv", HELPERS[helper][0]):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: run scripts/install-deps")
    export = tmp_path_factory.mktemp(f"export-{helper}-{mode}")
    result = vm.run_guest(HELPERS[helper], mode, export, WORKLOAD, timeout=300)
    print(f"guest run with the {helper} helper in {mode} mode: {result.elapsed:.1f} s")
    return GuestRun(result, result.values(), export, export / "vm-workload")


def test_workload_exit_status(guest_run: GuestRun) -> None:
    assert guest_run.result.status == 0, guest_run.result.stdout


@pytest.mark.parametrize(("key", "expected"), EXPECTED_VALUES.items())
def test_workload_value(guest_run: GuestRun, key: str, expected: str) -> None:
    assert guest_run.values.get(key) == expected, guest_run.result.stdout


def test_helper_exit_code(guest_run: GuestRun) -> None:
    assert guest_run.result.helper_returncode == 0, guest_run.result.helper_stderr


def test_console_without_kernel_errors(guest_run: GuestRun) -> None:
    console = guest_run.result.console
    assert "Oops" not in console
    assert "BUG:" not in console
    assert "Call Trace" not in console


def test_host_file_contents(guest_run: GuestRun) -> None:
    workdir = guest_run.workdir
    assert (
        workdir / "renamed.txt"
    ).read_bytes() == b"hello from the guest\nsecond line\n"
    assert (workdir / "created.txt").read_bytes() == b""
    assert not (workdir / "file.txt").exists()
    assert not (workdir / "unlinked.txt").exists()


def test_host_hard_link(guest_run: GuestRun) -> None:
    original = (guest_run.workdir / "renamed.txt").stat()
    link = (guest_run.workdir / "hardlink.txt").stat()
    assert original.st_nlink == 2
    assert link.st_ino == original.st_ino


def test_host_symlink(guest_run: GuestRun) -> None:
    symlink = guest_run.workdir / "symlink.txt"
    assert symlink.is_symlink()
    assert os.readlink(symlink) == "renamed.txt"


def test_host_chmod_mode(guest_run: GuestRun) -> None:
    mode = (guest_run.workdir / "mode.txt").stat().st_mode
    assert stat.S_IMODE(mode) == 0o640


def test_host_owner_ids(guest_run: GuestRun) -> None:
    owned = (guest_run.workdir / "owned.txt").stat()
    chowned_back = (guest_run.workdir / "chown.txt").stat()
    assert (owned.st_uid, owned.st_gid) == (1000, 1000)
    assert (chowned_back.st_uid, chowned_back.st_gid) == (0, 0)


def test_host_truncated_file(guest_run: GuestRun) -> None:
    data = (guest_run.workdir / "truncate.txt").read_bytes()
    assert len(data) == 1000
    assert data == b"0123456789" + b"\0" * 990


def test_host_mtime(guest_run: GuestRun) -> None:
    # touch -d '2001-02-03 04:05:06' in the guest, whose time zone is UTC.
    assert (guest_run.workdir / "mtime.txt").stat().st_mtime == 981173106


def test_host_directories(guest_run: GuestRun) -> None:
    assert (guest_run.workdir / "made.d").is_dir()
    assert not (guest_run.workdir / "removed.d").exists()


def test_host_fifo(guest_run: GuestRun) -> None:
    mode = (guest_run.workdir / "fifo").lstat().st_mode
    assert stat.S_ISFIFO(mode)


def test_host_big_file_checksum(guest_run: GuestRun) -> None:
    big_file = guest_run.workdir / "big.bin"
    digest = hashlib.sha256(big_file.read_bytes()).hexdigest()
    assert big_file.stat().st_size == 32 * 1024 * 1024
    assert digest == guest_run.values.get("big_sha256")


def test_host_many_entries(guest_run: GuestRun) -> None:
    names = set(os.listdir(guest_run.workdir / "many.d"))
    assert names == {f"entry-{i}" for i in range(1000)}


def test_df_total_matches_host(guest_run: GuestRun) -> None:
    host = os.statvfs(guest_run.export)
    host_total_kb = host.f_blocks * host.f_frsize // 1024
    guest_total_kb = int(guest_run.values["df_total_kb"])
    # QEMU's v9fs_fill_statfs (hw/9pfs/9p.c) multiplies the block size by
    # (msize - 24) // f_bsize and divides the block count by that factor, rounding
    # down, so the guest's total is less than msize bytes below the host's.
    assert guest_total_kb <= host_total_kb
    assert host_total_kb - guest_total_kb <= initramfs.DEFAULT_MSIZE // 1024 + 1
