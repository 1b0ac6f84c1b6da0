"""The helper as a real process: root, chroot, capabilities, every request type.

Each test starts the installed helper on a fresh export over a socketpair,
sends requests as QEMU would, and checks the replies, the descriptors that
come back and the tree on disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import HelperProcess, running_helper
from virtfs_proxy_helper import protocol as p
from virtfs_proxy_helper.client import (
    parse_stat,
    parse_statfs,
    parse_string,
    parse_u32,
    parse_u64,
    status_of,
)

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
KEPT_CAPS = "00000000080000db"  # CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD


def serve_sample_tree(
    helper_command: list[str], export: Path, sandbox: str
) -> Iterator[HelperProcess]:
    (export / "file").write_bytes(b"hello world")
    (export / "dir").mkdir()
    (export / "dir" / "inner").write_bytes(b"inner")
    os.symlink("file", export / "link")
    os.mkfifo(export / "fifo")
    extra = ["--sandbox", sandbox]
    with running_helper(helper_command, export, extra) as running:
        # One round trip guarantees start-up (chroot, capabilities) is done.
        assert running.client.call(p.Lstat(b"/")).status == 0
        yield running


# Every request type behaves the same whichever way the helper is confined:
# the kernel's root (namespace, chroot) or openat2 alone (none).
@pytest.fixture(params=["namespace", "chroot", "none"])
def helper(
    request: pytest.FixtureRequest, helper_command: list[str], export: Path
) -> Iterator[HelperProcess]:
    yield from serve_sample_tree(helper_command, export, request.param)


@pytest.fixture
def namespaced(helper_command: list[str], export: Path) -> Iterator[HelperProcess]:
    yield from serve_sample_tree(helper_command, export, "namespace")


def call_status(helper: HelperProcess, request: p.Request) -> int:
    return status_of(helper.client.call(request))


def test_helper_runs_chrooted_root(namespaced: HelperProcess, export: Path) -> None:
    helper = namespaced
    status = helper.status()
    assert status["Uid"].split() == ["0", "0", "0", "0"]
    assert status["Gid"].split() == ["0", "0", "0", "0"]
    root = os.stat(f"/proc/{helper.pid}/root")
    assert (root.st_dev, root.st_ino) == (export.stat().st_dev, export.stat().st_ino)
    assert os.stat(f"/proc/{helper.pid}/cwd").st_ino == export.stat().st_ino


def test_helper_has_own_mount_namespace(namespaced: HelperProcess) -> None:
    helper = namespaced
    ours = os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{helper.pid}/ns/mnt") != ours
    with open(f"/proc/{helper.pid}/mountinfo") as mountinfo:
        mounts = [line.split() for line in mountinfo]
    # Only the export, as "/", is left in the helper's namespace.
    assert [fields[4] for fields in mounts] == ["/"]
    assert "nodev" in mounts[0][5].split(",")
    assert "nosuid" in mounts[0][5].split(",")


def test_chroot_sandbox_keeps_namespace(
    helper_command: list[str], export: Path
) -> None:
    with running_helper(helper_command, export, ["--sandbox", "chroot"]) as helper:
        assert helper.client.call(p.Lstat(b"/")).status == 0
        assert os.readlink(f"/proc/{helper.pid}/root") == str(export)
        ours = os.readlink("/proc/self/ns/mnt")
        assert os.readlink(f"/proc/{helper.pid}/ns/mnt") == ours


def test_helper_keeps_only_listed_caps(helper: HelperProcess) -> None:
    status = helper.status()
    assert status["CapEff"] == KEPT_CAPS
    assert status["CapPrm"] == KEPT_CAPS
    assert status["CapInh"] == "0000000000000000"
    assert status["CapBnd"] == "0000000000000000"
    assert status["CapAmb"] == "0000000000000000"


def test_open_returns_readable_fd(helper: HelperProcess, export: Path) -> None:
    reply = helper.client.call(p.Open(b"//file", os.O_RDONLY))
    assert reply.status == 0
    assert reply.fd is not None
    try:
        assert os.fstat(reply.fd).st_ino == (export / "file").stat().st_ino
        assert os.read(reply.fd, 100) == b"hello world"
    finally:
        os.close(reply.fd)


def test_open_directory_fd(helper: HelperProcess, export: Path) -> None:
    reply = helper.client.call(p.Open(b"/dir", os.O_RDONLY | os.O_DIRECTORY))
    assert reply.fd is not None
    try:
        assert stat.S_ISDIR(os.fstat(reply.fd).st_mode)
        assert os.listdir(reply.fd) == ["inner"]
    finally:
        os.close(reply.fd)


def test_open_follows_symlink_inside(helper: HelperProcess) -> None:
    reply = helper.client.call(p.Open(b"/link", os.O_RDWR))
    assert reply.fd is not None
    try:
        assert os.read(reply.fd, 5) == b"hello"
    finally:
        os.close(reply.fd)


def test_open_truncate_flag_applies(helper: HelperProcess, export: Path) -> None:
    reply = helper.client.call(p.Open(b"/file", os.O_WRONLY | os.O_TRUNC))
    assert reply.fd is not None
    os.close(reply.fd)
    assert (export / "file").read_bytes() == b""


@pytest.mark.parametrize(
    ("path", "flags", "code"),
    [
        (b"/missing", os.O_RDONLY, errno.ENOENT),
        (b"/file/x", os.O_RDONLY, errno.ENOTDIR),
        (b"/fifo", os.O_RDONLY, errno.ENXIO),
        (b"/fifo", os.O_WRONLY, errno.ENXIO),
        (b"/file", os.O_RDONLY | os.O_DIRECTORY, errno.ENOTDIR),
        (b"/dir", os.O_WRONLY, errno.EISDIR),
    ],
)
def test_open_errors(helper: HelperProcess, path: bytes, flags: int, code: int) -> None:
    reply = helper.client.call(p.Open(path, flags))
    assert reply.status == -code
    assert reply.fd is None


def test_open_device_not_opened(helper: HelperProcess, export: Path) -> None:
    # /dev/null's major:minor, made inside the export.
    os.mknod(export / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    reply = helper.client.call(p.Open(b"/null", os.O_RDWR))
    assert reply.status == -errno.ENXIO
    reply = helper.client.call(p.Create(b"/null", os.O_RDWR | os.O_CREAT, 0o600, 0, 0))
    assert reply.status == -errno.ENXIO


def test_create_as_guest_user(helper: HelperProcess, export: Path) -> None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    reply = helper.client.call(p.Create(b"//dir/new", flags, 0o640, 1000, 1001))
    assert reply.fd is not None
    try:
        os.write(reply.fd, b"data")
    finally:
        os.close(reply.fd)
    st = (export / "dir" / "new").stat()
    assert st.st_uid == 1000
    assert st.st_gid == 1001
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (export / "dir" / "new").read_bytes() == b"data"


def test_create_existing_without_excl(helper: HelperProcess, export: Path) -> None:
    reply = helper.client.call(
        p.Create(b"/file", os.O_RDONLY | os.O_CREAT, 0o600, 0, 0)
    )
    assert reply.fd is not None
    try:
        assert os.read(reply.fd, 5) == b"hello"
    finally:
        os.close(reply.fd)
    assert stat.S_IMODE((export / "file").stat().st_mode) == 0o644


def test_create_existing_with_excl(helper: HelperProcess) -> None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    reply = helper.client.call(p.Create(b"/file", flags, 0o600, 0, 0))
    assert reply.status == -errno.EEXIST


def test_create_fifo_without_excl(helper: HelperProcess) -> None:
    reply = helper.client.call(p.Create(b"/fifo", os.O_RDWR | os.O_CREAT, 0o600, 0, 0))
    assert reply.status == -errno.ENXIO


def test_mode_ignores_umask(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Mkdir(0, 0, b"/open", 0o777)) == 0
    assert stat.S_IMODE((export / "open").stat().st_mode) == 0o777


@pytest.mark.parametrize(
    ("uid", "gid", "owner"),
    [
        (0, 0, (0, 0)),
        (1000, 1000, (1000, 1000)),
        (0, 1000, (0, 1000)),
        (1000, 0, (1000, 0)),
        (p.NO_ID, p.NO_ID, (0, 0)),
        (p.NO_ID, 1000, (0, 1000)),
    ],
)
def test_credentialed_ops_restore_root(
    helper: HelperProcess, export: Path, uid: int, gid: int, owner: tuple[int, int]
) -> None:
    assert call_status(helper, p.Mkdir(uid, gid, b"/d", 0o755)) == 0
    assert call_status(helper, p.Symlink(uid, gid, b"target", b"/d/s")) == 0
    mode = stat.S_IFIFO | 0o600
    assert call_status(helper, p.Mknod(uid, gid, b"/d/n", mode, 0)) == 0
    reply = helper.client.call(
        p.Create(b"/d/f", os.O_CREAT | os.O_RDWR, 0o600, uid, gid)
    )
    assert reply.fd is not None
    os.close(reply.fd)
    for name in ("d", "d/s", "d/n", "d/f"):
        st = os.lstat(export / name)
        assert (st.st_uid, st.st_gid) == owner, name
    status = helper.status()
    assert status["Uid"].split() == ["0", "0", "0", "0"]
    assert status["Gid"].split() == ["0", "0", "0", "0"]
    assert status["CapEff"] == KEPT_CAPS
    assert status["CapPrm"] == KEPT_CAPS


def test_mknod_char_device(helper: HelperProcess, export: Path) -> None:
    rdev = os.makedev(1, 3)
    request = p.Mknod(0, 0, b"/dev-null", stat.S_IFCHR | 0o600, rdev)
    assert call_status(helper, request) == 0
    st = os.lstat(export / "dev-null")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == rdev


def test_mkdir_existing_fails(helper: HelperProcess) -> None:
    assert call_status(helper, p.Mkdir(0, 0, b"/dir", 0o755)) == -errno.EEXIST


def test_symlink_and_readlink(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Symlink(0, 0, b"../escape", b"/s")) == 0
    assert os.readlink(export / "s") == "../escape"
    reply = helper.client.call(p.Readlink(b"/s", 4096))
    assert parse_string(reply.payload) == b"../escape"


@pytest.mark.parametrize(
    ("bufsize", "expected"), [(100, b"file"), (3, b"fi"), (2, b"f")]
)
def test_readlink_truncates_to_bufsize(
    helper: HelperProcess, bufsize: int, expected: bytes
) -> None:
    reply = helper.client.call(p.Readlink(b"/link", bufsize))
    assert parse_string(reply.payload) == expected


@pytest.mark.parametrize("bufsize", [0, 1, 0xFFFFFFFF])
def test_readlink_tiny_buffer_einval(helper: HelperProcess, bufsize: int) -> None:
    assert helper.client.call(p.Readlink(b"/link", bufsize)).status == -errno.EINVAL


def test_readlink_not_symlink(helper: HelperProcess) -> None:
    assert helper.client.call(p.Readlink(b"/file", 100)).status == -errno.EINVAL


def test_link_counts(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Link(b"/file", b"/dir/hard")) == 0
    assert (export / "file").stat().st_nlink == 2
    assert (export / "dir" / "hard").read_bytes() == b"hello world"


def test_link_does_not_follow_symlink(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Link(b"/link", b"/link2")) == 0
    assert os.readlink(export / "link2") == "file"


def test_lstat_matches_host(helper: HelperProcess, export: Path) -> None:
    os.utime(export / "file", ns=(1_000_000_123, 2_000_000_456))
    st = parse_stat(helper.client.call(p.Lstat(b"/file")).payload)
    host = os.lstat(export / "file")
    assert st.st_ino == host.st_ino
    assert st.st_dev == host.st_dev
    assert st.st_mode == host.st_mode
    assert st.st_size == 11
    assert st.st_nlink == 1
    assert (st.st_atime_sec, st.st_atime_nsec) == (1, 123)
    assert (st.st_mtime_sec, st.st_mtime_nsec) == (2, 456)
    assert st.st_blksize == host.st_blksize
    assert st.st_blocks == host.st_blocks


def test_lstat_does_not_follow(helper: HelperProcess) -> None:
    st = parse_stat(helper.client.call(p.Lstat(b"/link")).payload)
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == 4


def test_lstat_missing(helper: HelperProcess) -> None:
    assert helper.client.call(p.Lstat(b"/missing")).status == -errno.ENOENT


def test_statfs_matches_host(helper: HelperProcess, export: Path) -> None:
    fs = parse_statfs(helper.client.call(p.Statfs(b"/")).payload)
    host = os.statvfs(export)
    assert fs.f_bsize == host.f_bsize
    assert fs.f_blocks == host.f_blocks
    assert fs.f_files == host.f_files
    assert fs.f_namelen == host.f_namemax
    assert fs.f_frsize == host.f_frsize
    fsid = (fs.f_fsid0 & 0xFFFFFFFF) | (fs.f_fsid1 & 0xFFFFFFFF) << 32
    assert fsid == host.f_fsid


def test_chmod_follows_symlink(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Chmod(b"/link", 0o4711)) == 0
    assert stat.S_IMODE((export / "file").stat().st_mode) == 0o4711


def test_chown_does_not_follow(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Chown(b"/link", 1234, 5678)) == 0
    assert os.lstat(export / "link").st_uid == 1234
    assert os.lstat(export / "link").st_gid == 5678
    assert (export / "file").stat().st_uid == 0


def test_chown_minus_one_keeps_id(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Chown(b"/file", p.NO_ID, 77)) == 0
    st = (export / "file").stat()
    assert (st.st_uid, st.st_gid) == (0, 77)


def test_truncate_sets_size(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Truncate(b"/file", 5)) == 0
    assert (export / "file").read_bytes() == b"hello"
    assert call_status(helper, p.Truncate(b"/file", 1 << 63)) == -errno.EINVAL


def test_utime_sets_times(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Utime(b"/file", 10, 20, 30, 40)) == 0
    st = (export / "file").stat()
    assert st.st_atime_ns == 10_000_000_020
    assert st.st_mtime_ns == 30_000_000_040


def test_utime_omit_and_now(helper: HelperProcess, export: Path) -> None:
    os.utime(export / "file", ns=(5_000_000_000, 6_000_000_000))
    request = p.Utime(b"/file", 0, UTIME_OMIT, 0, UTIME_NOW)
    assert call_status(helper, request) == 0
    st = (export / "file").stat()
    assert st.st_atime_ns == 5_000_000_000
    assert st.st_mtime_ns > 6_000_000_000


def test_utime_symlink_itself(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Utime(b"/link", 7, 0, 8, 0)) == 0
    assert os.lstat(export / "link").st_mtime_ns == 8_000_000_000
    assert (export / "file").stat().st_mtime_ns != 8_000_000_000


def test_utime_invalid_nsec(helper: HelperProcess) -> None:
    request = p.Utime(b"/file", 0, 2_000_000_000, 0, 0)
    assert call_status(helper, request) == -errno.EINVAL


def test_rename_over_existing(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Rename(b"/file", b"/dir/inner")) == 0
    assert not (export / "file").exists()
    assert (export / "dir" / "inner").read_bytes() == b"hello world"


def test_rename_dir_over_nonempty(helper: HelperProcess) -> None:
    assert call_status(helper, p.Mkdir(0, 0, b"/empty", 0o755)) == 0
    result = call_status(helper, p.Rename(b"/empty", b"/dir"))
    assert result == -errno.ENOTEMPTY


def test_remove_file_and_dir(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Remove(b"/file")) == 0
    assert call_status(helper, p.Remove(b"/dir")) == -errno.ENOTEMPTY
    assert call_status(helper, p.Remove(b"/dir/inner")) == 0
    assert call_status(helper, p.Remove(b"/dir")) == 0
    assert sorted(os.listdir(export)) == ["fifo", "link"]


def test_xattr_lifecycle(helper: HelperProcess, export: Path) -> None:
    value = b"v\0alue\xff"
    request = p.Lsetxattr(b"/file", b"user.k", value, len(value), 0)
    assert call_status(helper, request) == 0
    assert os.getxattr(export / "file", "user.k") == value

    length = helper.client.call(p.Lgetxattr(0, b"/file", b"user.k"))
    assert parse_u32(length.payload) == len(value)
    full = helper.client.call(p.Lgetxattr(100, b"/file", b"user.k"))
    assert parse_string(full.payload) == value
    short = helper.client.call(p.Lgetxattr(3, b"/file", b"user.k"))
    assert short.status == -errno.ERANGE

    names = helper.client.call(p.Llistxattr(0, b"/file"))
    assert parse_u32(names.payload) == len(b"user.k\0")
    listing = helper.client.call(p.Llistxattr(100, b"/file"))
    assert parse_string(listing.payload) == b"user.k\0"

    assert call_status(helper, p.Lremovexattr(b"/file", b"user.k")) == 0
    missing = helper.client.call(p.Lgetxattr(0, b"/file", b"user.k"))
    assert missing.status == -errno.ENODATA


def test_lsetxattr_create_flag(helper: HelperProcess) -> None:
    create = 1  # XATTR_CREATE
    request = p.Lsetxattr(b"/file", b"user.k", b"a", 1, create)
    assert call_status(helper, request) == 0
    assert call_status(helper, request) == -errno.EEXIST


def test_lsetxattr_size_mismatch(helper: HelperProcess, export: Path) -> None:
    request = p.Lsetxattr(b"/file", b"user.k", b"abc", 10, 0)
    assert call_status(helper, request) == -errno.EINVAL
    assert os.listxattr(export / "file") == []


def test_lgetxattr_negative_size(helper: HelperProcess) -> None:
    os_value = p.Lsetxattr(b"/file", b"user.k", b"abc", 3, 0)
    assert call_status(helper, os_value) == 0
    reply = helper.client.call(p.Lgetxattr(0xFFFFFFFF, b"/file", b"user.k"))
    assert reply.status == -errno.EINVAL


@pytest.fixture
def tmpfs_export() -> Iterator[Path]:
    """An export on tmpfs, which stores xattr values of up to 64 KiB; ext4
    stores only one block's worth."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize(
    ("length", "code"),
    [(p.MAX_PAYLOAD - 2, 0), (p.MAX_PAYLOAD - 1, -errno.ENOBUFS)],
)
def test_xattr_near_frame_limit(
    helper_command: list[str], tmpfs_export: Path, length: int, code: int
) -> None:
    # A reply is a u16 length plus the value, so 65534 bytes is the largest
    # value that fits in one 65536-byte frame.
    value = bytes(range(256)) * (length // 256) + b"x" * (length % 256)
    (tmpfs_export / "file").touch()
    os.setxattr(tmpfs_export / "file", "user.big", value)
    with running_helper(helper_command, tmpfs_export) as helper:
        reply = helper.client.call(p.Lgetxattr(length, b"/file", b"user.big"))
        assert reply.status == code
        if code == 0:
            assert parse_string(reply.payload) == value
        size = helper.client.call(p.Lgetxattr(0, b"/file", b"user.big"))
        assert parse_u32(size.payload) == length


def test_getversion_reads_generation(helper: HelperProcess, export: Path) -> None:
    reply = helper.client.call(p.Getversion(b"/file"))
    assert reply.status == 0
    assert len(reply.payload) == 8
    assert parse_u64(reply.payload) < 1 << 32
    missing = helper.client.call(p.Getversion(b"/missing"))
    assert missing.status == -errno.ENOENT


def test_getversion_fifo_not_opened(helper: HelperProcess) -> None:
    assert helper.client.call(p.Getversion(b"/fifo")).status == -errno.ENXIO


def test_dotdot_stays_in_export(helper: HelperProcess, export: Path) -> None:
    st = parse_stat(helper.client.call(p.Lstat(b"/../../..")).payload)
    assert st.st_ino == export.stat().st_ino
    os.symlink("/../../../", export / "up")
    reply = helper.client.call(p.Open(b"/up/file", os.O_RDONLY))
    assert reply.fd is not None
    try:
        assert os.fstat(reply.fd).st_ino == (export / "file").stat().st_ino
    finally:
        os.close(reply.fd)


def test_binary_names_round_trip(helper: HelperProcess, export: Path) -> None:
    name = b"/new\nline\xff\xfe"
    assert call_status(helper, p.Mkdir(0, 0, name, 0o700)) == 0
    assert name[1:] in os.listdir(os.fsencode(export))
    st = parse_stat(helper.client.call(p.Lstat(name)).payload)
    assert stat.S_ISDIR(st.st_mode)


def test_embedded_nul_rejected(helper: HelperProcess, export: Path) -> None:
    assert call_status(helper, p.Mkdir(0, 0, b"/a\0b", 0o700)) == -errno.EINVAL
    reply = helper.client.call(p.Open(b"/file\0junk", os.O_RDONLY))
    assert reply.status == -errno.EINVAL
    assert not (export / "a").exists()


def test_malformed_frames_get_replies(helper: HelperProcess, export: Path) -> None:
    client = helper.client
    # An OPEN whose string runs past the payload: an fd reply with EINVAL.
    client.send_raw(p.HEADER.pack(p.T_OPEN, 4) + b"\x10\x00ab")
    assert client.read_fd_reply().status == -errno.EINVAL
    # A MKDIR missing its mode field: an ERROR frame.
    payload = struct.pack("=IIH", 0, 0, 2) + b"/x"
    client.send_raw(p.HEADER.pack(p.T_MKDIR, len(payload)) + payload)
    assert client.read_frame_reply().status == -errno.EINVAL
    # An unknown type: ERROR with EOPNOTSUPP.
    client.send_raw(p.HEADER.pack(999, 3) + b"abc")
    assert client.read_frame_reply().status == -errno.EOPNOTSUPP
    # Extra bytes after the last field.
    payload = p.encode_fields("p", (b"/file",)) + b"zz"
    client.send_raw(p.HEADER.pack(p.T_REMOVE, len(payload)) + payload)
    assert client.read_frame_reply().status == -errno.EINVAL
    # The stream is still in step, and nothing changed.
    st = parse_stat(client.call(p.Lstat(b"/file")).payload)
    assert st.st_size == 11
    assert not (export / "x").exists()


def test_oversized_frame_closes(helper: HelperProcess) -> None:
    helper.client.send_raw(p.HEADER.pack(p.T_LSTAT, p.MAX_PAYLOAD + 1))
    status, stderr = helper.close()
    assert status == 1
    assert "exceeds the maximum of 65536" in stderr


def test_largest_frame_accepted(helper: HelperProcess) -> None:
    name = b"/" + b"a" * (p.MAX_PAYLOAD - 3)
    payload = p.encode_fields("p", (name,))
    assert len(payload) == p.MAX_PAYLOAD
    reply = helper.client.call(p.Lstat(name))
    assert reply.status == -errno.ENAMETOOLONG


def test_sent_descriptors_not_kept(helper: HelperProcess, export: Path) -> None:
    before = set(os.listdir(f"/proc/{helper.pid}/fd"))
    frame = p.encode_request(p.Lstat(b"/file"))
    with open(export / "file", "rb") as passed:
        helper.client.sock.sendmsg(
            [frame],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", passed.fileno()))],
        )
        assert helper.client.read_frame_reply().status == 0
    assert set(os.listdir(f"/proc/{helper.pid}/fd")) == before


def test_pipelined_requests_each_answered(helper: HelperProcess) -> None:
    frames = p.encode_request(p.Lstat(b"/file")) + p.encode_request(p.Lstat(b"/dir"))
    helper.client.send_raw(frames)
    first = parse_stat(helper.client.read_frame_reply().payload)
    second = parse_stat(helper.client.read_frame_reply().payload)
    assert stat.S_ISREG(first.st_mode)
    assert stat.S_ISDIR(second.st_mode)


def test_disconnect_exits_cleanly(helper: HelperProcess) -> None:
    status, stderr = helper.close()
    assert status == 0
    assert "peer disconnected" in stderr
    assert "Done" in stderr


def test_disconnect_mid_frame(helper: HelperProcess) -> None:
    helper.client.send_raw(p.HEADER.pack(p.T_LSTAT, 100) + b"\x05")
    status, stderr = helper.close()
    assert status == 1
    assert "middle of a frame" in stderr


def test_getversion_unsupported_filesystem(
    helper_command: list[str], tmpfs_export: Path
) -> None:
    # tmpfs keeps no generation numbers, so the path is not even looked up.
    with running_helper(helper_command, tmpfs_export) as helper:
        reply = helper.client.call(p.Getversion(b"/missing"))
        assert reply.status == 0
        assert parse_u64(reply.payload) == 0
