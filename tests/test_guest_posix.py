"""POSIX conformance in a QEMU guest, compared between QEMU's C helper and ours.

guest/posix.sh runs once per helper and mode, each time on a fresh export. Both
helpers must print the same "key=value" lines, apart from the keys in
INTENDED_DIFFERENCES, and leave equal trees on the host. Because both could be wrong
in the same way, the main POSIX results are also checked against fixed values. Needs
root, QEMU and a Debian kernel; scripts/install-deps installs them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
WORKLOAD = REPO_DIR / "guest" / "posix.sh"

sys.path.insert(0, str(REPO_DIR))

from guest import vm  # noqa: E402
from harness import C_HELPER, our_helper  # noqa: E402

pytestmark = pytest.mark.guest

HELPERS = {"c": [C_HELPER], "ours": our_helper()}
# Run id: (helper, mode). The C run is the reference for every run of ours.
RUNS = {
    "c-socket": ("c", "socket"),
    "ours-socket": ("ours", "socket"),
    "ours-fd": ("ours", "fd"),
}
OUR_RUNS = [run_id for run_id, (helper, _) in RUNS.items() if helper == "ours"]
TIMING_RE = re.compile(r"^timing (\S+) (\S+) s$", re.MULTILINE)


@dataclass(frozen=True)
class IntendedDifference:
    c_value: str
    our_value: str
    reason: str


_LONG_PATHS = (
    "ours serves paths longer than PATH_MAX one chunk of components at a time, "
    "while the C helper passes QEMU's whole path to the kernel, which fails with "
    "ENAMETOOLONG once QEMU's path for the 80th level is longer than 4095 bytes"
)
INTENDED_DIFFERENCES = {
    "pathmax_depth": IntendedDifference("79", "85", _LONG_PATHS),
    "pathmax_stop": IntendedDifference("ENAMETOOLONG", "none", _LONG_PATHS),
    "pathmax_leaf": IntendedDifference("not reached", "ok leaf", _LONG_PATHS),
    "chown_after_root_sgid_create": IntendedDifference(
        "EPERM",
        "ok",
        "a create with uid 0 and gid 1001 leaves the C helper with only "
        "CAP_DAC_OVERRIDE effective, because setresuid() back to an unchanged "
        "euid 0 restores no capabilities, so its later CHOWNs fail; ours restores "
        "its full capability set after every request",
    ),
}

# POSIX and Linux results of the main checks of guest/posix.sh, so that a run fails
# even where both helpers agree.
EXPECTED_VALUES = {
    "user_identity": "uid=1000(user) gid=1000(user) groups=1000(user),1001(extra)",
    "mode_file_umask022": "644",
    "mode_dir_umask077": "700",
    "mode_chmod_sequence": "0 1 4755 2755 6644 1777 7777 400 644",
    "user_file_owner": "1000:1000",
    "user_dir_owner": "1000:1000",
    "user_symlink_owner": "1000:1000",
    "user_fifo_owner": "1000:1000",
    "user_mknod_char": "EPERM",
    "user_list_0700_dir": "EACCES",
    "user_stat_in_0700_dir": "EACCES",
    "user_read_0600_file": "EACCES",
    "user_write_0600_file": "EACCES",
    "user_read_supplementary_group": "ok",
    "user_read_group_class_denied": "EACCES",
    "user_write_own_file": "one two",
    "user_write_own_0400_file": "EACCES",
    "root_write_0400_file": "ok",
    "user_chmod_root_file": "EPERM",
    "user_chown_own_to_root": "EPERM",
    "user_chgrp_result": "1000:1001",
    "user_sgid_nonmember_mode": "755",
    "sticky_user_rm_root_file": "EPERM",
    "sticky_user_mv_root_file": "EPERM",
    "sticky_user_replace_root_file": "EPERM",
    "sticky_user_rm_own_file": "ok",
    "sticky_root_rm_user_file": "ok",
    "sticky_dir_owner_rm_root_file": "ok",
    "nonsticky_user_rm_root_file": "ok",
    "sgid_file_owner": "1000:1001",
    "sgid_subdir_owner": "1000:1001",
    "sgid_subdir_mode": "2755",
    "sgid_nested_subdir": "2755 1000:1001",
    "sgid_symlink_owner": "1000:1001",
    "sgid_renamed_in_keeps_group": "1000:1000",
    "plain_subdir_no_sgid": "755 1000:1000",
    "sgid_root_file_owner": "0:1001",
    "suid_after_user_write": "755",
    "suid_after_user_truncate": "755",
    "suid_after_root_chown": "755",
    "nlink_new_dir": "2",
    "nlink_dir_three_subdirs": "5",
    "nlink_dir_after_rmdir": "4",
    "hardlink_to_symlink_type": "symbolic link",
    "hardlink_to_symlink_nlink": "2",
    "rename_over_file_content": "source",
    "rename_over_empty_dir": "ok",
    "rename_dir_into_own_subdir": "EINVAL",
    "rename_keeps_inode": "same",
    "unlinked_open_gone": "yes",
    "unlinked_open_read": "still here",
    "symlink_dir_read": "inside",
    "symlink_dir_create_through": "through",
    "symlink_loop": "ELOOP",
    "name_256_bytes": "ENAMETOOLONG",
    "truncate_shrink": "4 0123",
    "fifo_roundtrip": "through-fifo",
    "mknod_char": "character special file 1,3",
    "deep_mkdir": "ok",
    "deep_dir_count": "61",
    "deep_leaf_read": "bottom",
    "deep_rm": "ok",
    "pathmax_cleanup": "0 0",
    "many_count": "3000",
    "many_after_rm_glob": "2889",
    "df_fields": "6",
    "df_filesystem": "share",
    "failures": "0",
}


@dataclass(frozen=True)
class HostEntry:
    """One path of an export as lstat(2) reports it on the host, without times or
    inodes."""

    kind: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int | None
    """None for dirs: their size follows the filesystem's block allocation."""
    target: str | None
    rdev: tuple[int, int] | None
    sha256: str | None


@dataclass
class PosixRun:
    result: vm.GuestResult
    values: dict[str, str]
    tree: dict[str, HostEntry]
    export: Path


def _host_entry(path: Path) -> HostEntry:
    st = path.lstat()
    mode = st.st_mode
    is_dir = stat.S_ISDIR(mode)
    is_device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
    digest = None
    if stat.S_ISREG(mode):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return HostEntry(
        kind=stat.filemode(mode)[0],
        mode=stat.S_IMODE(mode),
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        size=None if is_dir else st.st_size,
        target=os.readlink(path) if stat.S_ISLNK(mode) else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if is_device else None,
        sha256=digest,
    )


def host_tree(export: Path) -> dict[str, HostEntry]:
    """Map each path under export, relative to it and "." included, to its entry."""
    tree = {".": _host_entry(export)}
    for directory, dirnames, filenames in os.walk(export):
        for name in dirnames + filenames:
            path = Path(directory, name)
            tree[str(path.relative_to(export))] = _host_entry(path)
    return tree


def _boot(run_id: str, tmp_path_factory: pytest.TempPathFactory) -> PosixRun:
    helper, mode = RUNS[run_id]
    if os.geteuid() != 0:
        pytest.fail("the guest tests start the helper as root; run them as root")
    for tool in (vm.QEMU, "setpriv", HELPERS[helper][0]):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: run scripts/install-deps")
    export = tmp_path_factory.mktemp(f"posix-{run_id}")
    # The guest user (uid 1000) must reach the files under the share root.
    export.chmod(0o755)
    result = vm.run_guest(HELPERS[helper], mode, export, WORKLOAD, timeout=300)
    timings = ", ".join(
        f"{name} {seconds}" for name, seconds in TIMING_RE.findall(result.stdout)
    )
    print(f"posix.sh with the {helper} helper in {mode} mode: {result.elapsed:.1f} s")
    print(f"  seconds per section: {timings}")
    return PosixRun(result, result.values(), host_tree(export), export)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], PosixRun]:
    """Return a function that boots each run once per module.

    A failed boot is not retried: every later request for that run fails with the
    first error, so a broken guest costs one boot, not one per test.
    """
    runs: dict[str, PosixRun] = {}
    errors: dict[str, Exception] = {}

    def get(run_id: str) -> PosixRun:
        if run_id in errors:
            pytest.fail(f"the {run_id} guest run failed earlier: {errors[run_id]}")
        if run_id not in runs:
            try:
                runs[run_id] = _boot(run_id, tmp_path_factory)
            except Exception as error:
                errors[run_id] = error
                raise
        return runs[run_id]

    return get


@pytest.fixture(scope="module", params=list(RUNS))
def posix_run(
    request: pytest.FixtureRequest, boot: Callable[[str], PosixRun]
) -> PosixRun:
    return boot(request.param)


@pytest.fixture(scope="module", params=OUR_RUNS)
def our_run(
    request: pytest.FixtureRequest, boot: Callable[[str], PosixRun]
) -> PosixRun:
    return boot(request.param)


@pytest.fixture(scope="module")
def c_run(boot: Callable[[str], PosixRun]) -> PosixRun:
    return boot("c-socket")


def test_helper_exit_code(posix_run: PosixRun) -> None:
    assert posix_run.result.helper_returncode == 0, posix_run.result.helper_stderr


def test_console_without_kernel_errors(posix_run: PosixRun) -> None:
    console = posix_run.result.console
    assert "Oops" not in console
    assert "BUG:" not in console
    assert "Call Trace" not in console


@pytest.mark.parametrize(("key", "expected"), EXPECTED_VALUES.items())
def test_posix_value(posix_run: PosixRun, key: str, expected: str) -> None:
    assert posix_run.values.get(key) == expected, posix_run.result.stdout


def test_same_keys_as_c(our_run: PosixRun, c_run: PosixRun) -> None:
    assert our_run.values.keys() == c_run.values.keys()


def test_values_match_c(our_run: PosixRun, c_run: PosixRun) -> None:
    mismatches = {
        key: {"c": value, "ours": our_run.values.get(key)}
        for key, value in c_run.values.items()
        if key not in INTENDED_DIFFERENCES and our_run.values.get(key) != value
    }
    assert mismatches == {}


@pytest.mark.parametrize("key", INTENDED_DIFFERENCES)
def test_intended_difference(our_run: PosixRun, c_run: PosixRun, key: str) -> None:
    difference = INTENDED_DIFFERENCES[key]
    assert c_run.values.get(key) == difference.c_value, difference.reason
    assert our_run.values.get(key) == difference.our_value, difference.reason


def test_host_tree_matches_c(our_run: PosixRun, c_run: PosixRun) -> None:
    assert our_run.tree.keys() == c_run.tree.keys()
    mismatches = {
        path: {"c": entry, "ours": our_run.tree[path]}
        for path, entry in c_run.tree.items()
        if our_run.tree[path] != entry
    }
    assert mismatches == {}


# (kind as in `ls -l`, permission bits, uid, gid) of paths that the guest created,
# as the host must see them.
HOST_OWNERS = {
    "posix/home/own.f": ("-", 0o604, 1000, 1001),
    "posix/home/own.d": ("d", 0o755, 1000, 1000),
    "posix/home/own.l": ("l", 0o777, 1000, 1000),
    "posix/home/own.p": ("p", 0o644, 1000, 1000),
    "posix/home/root-in-home.f": ("-", 0o644, 0, 0),
    "posix/pub": ("d", 0o1777, 0, 0),
    "posix/pub/root.f": ("-", 0o666, 0, 0),
    "posix/pub/user4.f": ("-", 0o644, 1000, 1000),
    "posix/sgid.d": ("d", 0o2775, 0, 1001),
    "posix/sgid.d/file.f": ("-", 0o644, 1000, 1001),
    "posix/sgid.d/sub.d": ("d", 0o2755, 1000, 1001),
    "posix/sgid.d/sub.d/nested.d": ("d", 0o2755, 1000, 1001),
    "posix/sgid.d/root.f": ("-", 0o644, 0, 1001),
    "posix/suid-chown.f": ("-", 0o755, 1000, 0),
    "posix/char.c": ("c", 0o644, 0, 0),
    "posix/caps.f": ("-", 0o644, 0, 0),
}


@pytest.mark.parametrize(("path", "expected"), HOST_OWNERS.items())
def test_host_owner_and_mode(
    posix_run: PosixRun, path: str, expected: tuple[str, int, int, int]
) -> None:
    entry = posix_run.tree.get(path)
    assert entry is not None, f"{path} is missing from the export"
    assert (entry.kind, entry.mode, entry.uid, entry.gid) == expected


def test_host_removed_trees(posix_run: PosixRun) -> None:
    tree = posix_run.tree
    assert "posix/deep.d" not in tree
    assert not [path for path in tree if path.startswith("posix/pathmax.d/")]
    assert "posix/open.f" not in tree
    assert "posix/pub/user.f" not in tree


def test_host_special_files(posix_run: PosixRun) -> None:
    tree = posix_run.tree
    assert tree["posix/char.c"].rdev == (1, 3)
    assert tree["posix/block.b"].rdev == (7, 0)
    assert tree["posix/fifo.p"].kind == "p"
    assert tree["posix/sym-hard.l"].kind == "l"
    assert tree["posix/sym-hard.l"].nlink == 2
    assert tree["posix/sym-hard.l"].target == "nlink.f"


def test_host_many_entries(posix_run: PosixRun) -> None:
    names = set(os.listdir(posix_run.export / "posix" / "many.d"))
    expected = {f"entry-{i}" for i in range(3000)}
    expected -= {name for name in expected if name.startswith("entry-29")}
    assert names == expected
