"""Export policy options, supplementary groups, peer checks and inherited fds."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import HelperProcess, running_helper, wait_for_path
from virtfs_proxy_helper import protocol as p
from virtfs_proxy_helper.client import Client, parse_stat, status_of


def start(
    helper_command: list[str], export: Path, *options: str
) -> Iterator[HelperProcess]:
    (export / "file").write_bytes(b"data")
    (export / "dir").mkdir()
    with running_helper(helper_command, export, list(options)) as helper:
        assert helper.client.call(p.Lstat(b"/")).status == 0
        yield helper


@pytest.fixture
def readonly(helper_command: list[str], export: Path) -> Iterator[HelperProcess]:
    yield from start(helper_command, export, "--readonly")


@pytest.fixture
def nosuid(helper_command: list[str], export: Path) -> Iterator[HelperProcess]:
    yield from start(helper_command, export, "--nosuid")


@pytest.fixture
def nodev(helper_command: list[str], export: Path) -> Iterator[HelperProcess]:
    yield from start(helper_command, export, "--nodev")


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        tree[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            data,
        )
    return tree


MUTATIONS = [
    p.Create(b"/new", os.O_CREAT | os.O_RDWR, 0o644, 0, 0),
    p.Mknod(0, 0, b"/fifo", stat.S_IFIFO | 0o600, 0),
    p.Mkdir(0, 0, b"/newdir", 0o755),
    p.Symlink(0, 0, b"file", b"/link"),
    p.Link(b"/file", b"/hard"),
    p.Chmod(b"/file", 0o600),
    p.Chown(b"/file", 1000, 1000),
    p.Truncate(b"/file", 0),
    p.Utime(b"/file", 1, 0, 1, 0),
    p.Rename(b"/file", b"/moved"),
    p.Remove(b"/file"),
    p.Lsetxattr(b"/file", b"user.a", b"v", 1, 0),
    p.Lremovexattr(b"/file", b"user.a"),
]


@pytest.mark.parametrize("request_", MUTATIONS, ids=lambda r: type(r).__name__)
def test_readonly_refuses_mutation(
    readonly: HelperProcess, export: Path, request_: p.Request
) -> None:
    before = snapshot(export)
    reply = readonly.client.call(request_)
    assert reply.status == -errno.EROFS
    assert snapshot(export) == before


@pytest.mark.parametrize(
    "flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC], ids=str
)
def test_readonly_refuses_write_open(readonly: HelperProcess, flags: int) -> None:
    assert readonly.client.call(p.Open(b"/file", flags)).status == -errno.EROFS


def test_readonly_allows_reading(readonly: HelperProcess) -> None:
    reply = readonly.client.call(p.Open(b"/file", os.O_RDONLY))
    assert reply.fd is not None
    try:
        assert os.read(reply.fd, 10) == b"data"
        # The mount itself is read-only, so the descriptor cannot write either.
        with pytest.raises(OSError) as raised:
            os.open(f"/proc/self/fd/{reply.fd}", os.O_WRONLY)
        assert raised.value.errno == errno.EROFS
    finally:
        os.close(reply.fd)
    stat_reply = readonly.client.call(p.Lstat(b"/file"))
    assert parse_stat(stat_reply.payload).st_size == 4


@pytest.mark.parametrize(
    "request_",
    [
        p.Create(b"/suid", os.O_CREAT | os.O_RDWR, 0o6755, 1000, 1000),
        p.Mkdir(0, 0, b"/suid", 0o6755),
        p.Mknod(0, 0, b"/suid", stat.S_IFREG | 0o6755, 0),
        p.Chmod(b"/file", 0o6755),
    ],
    ids=lambda r: type(r).__name__,
)
def test_nosuid_strips_setid_bits(
    nosuid: HelperProcess, export: Path, request_: p.Request
) -> None:
    reply = nosuid.client.call(request_)
    if reply.fd is not None:
        os.close(reply.fd)
    assert reply.status == 0
    target = export / os.fsdecode(request_.path.lstrip(b"/"))  # type: ignore[union-attr]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_nosuid_refuses_file_capabilities(nosuid: HelperProcess) -> None:
    request = p.Lsetxattr(b"/file", b"security.capability", b"\x01" * 20, 20, 0)
    assert status_of(nosuid.client.call(request)) == -errno.EPERM


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK])
def test_nodev_refuses_devices(nodev: HelperProcess, export: Path, kind: int) -> None:
    request = p.Mknod(0, 0, b"/dev", kind | 0o600, os.makedev(1, 3))
    assert status_of(nodev.client.call(request)) == -errno.EPERM
    assert not (export / "dev").exists()


def test_nodev_allows_fifos(nodev: HelperProcess, export: Path) -> None:
    request = p.Mknod(0, 0, b"/fifo", stat.S_IFIFO | 0o600, 0)
    assert status_of(nodev.client.call(request)) == 0
    assert stat.S_ISFIFO((export / "fifo").lstat().st_mode)


def test_helper_drops_supplementary_groups(
    helper_command: list[str], export: Path
) -> None:
    for helper in start(helper_command, export):
        assert helper.status()["Groups"] == ""


def test_setgid_not_kept_outside_group(helper_command: list[str], export: Path) -> None:
    # A setgid directory of group 0: root's group, which the helper must not
    # lend to guest user 1000 through its supplementary groups.
    shared = export / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2777)
    for helper in start(helper_command, export):
        flags = os.O_CREAT | os.O_RDWR
        reply = helper.client.call(p.Create(b"/shared/f", flags, 0o2755, 1000, 1000))
        assert reply.fd is not None
        os.close(reply.fd)
    st = (shared / "f").stat()
    assert st.st_gid == 0
    assert not st.st_mode & stat.S_ISGID


def test_inherited_descriptors_closed(
    helper_command: list[str], export: Path, tmp_path: Path
) -> None:
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    outside = os.open(outside_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ours, theirs = socket.socketpair()
        command = helper_command + [
            "--nodaemon",
            "--fd",
            str(theirs.fileno()),
            "--path",
            str(export),
        ]
        process = subprocess.Popen(
            command, pass_fds=[theirs.fileno(), outside], stderr=subprocess.DEVNULL
        )
        theirs.close()
        client = Client(ours)
        assert client.call(p.Lstat(b"/")).status == 0
        fd_dir = f"/proc/{process.pid}/fd"
        held = {
            (st.st_dev, st.st_ino)
            for st in map(os.stat, (f"{fd_dir}/{fd}" for fd in os.listdir(fd_dir)))
        }
        ours.close()
        assert process.wait(timeout=10) == 0
    finally:
        os.close(outside)
    outside_st = outside_dir.stat()
    assert (outside_st.st_dev, outside_st.st_ino) not in held


def connect_as(uid: int, gid: int, path: Path) -> bytes:
    """Connect to `path` from a child process running as uid:gid; return
    the first byte it reads, or b"" at end of file."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(path))
            os.write(write_end, b"connected:" + client.recv(1))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        output = reader.read()
    os.waitpid(pid, 0)
    return output


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory that users other than root can reach."""
    directory = Path(tempfile.mkdtemp(prefix="proxy-sock-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_socket_peer_uid_checked(
    helper_command: list[str], export: Path, socket_dir: Path
) -> None:
    sock_path = socket_dir / "proxy.sock"
    command = helper_command + [
        "-n",
        "-u",
        "1000",
        "-g",
        "1000",
        "-s",
        str(sock_path),
        "-p",
        str(export),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        wait_for_path(sock_path, process)
        # uid 2000 in group 1000 may connect to the file but is turned away.
        assert connect_as(2000, 1000, sock_path) == b"connected:"
        # The helper kept waiting, and the right user gets served.
        owner = socket.socket(socket.AF_UNIX)
        with owner:
            owner.connect(str(sock_path))
            assert Client(owner).call(p.Lstat(b"/")).status == 0
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr = process.stderr.read().decode() if process.stderr else ""
        if process.stderr:
            process.stderr.close()
    assert "rejected a connection from pid" in stderr
    assert "uid 2000" in stderr


def test_runs_in_user_namespace(helper_command: list[str], export: Path) -> None:
    # Root inside a user namespace that maps only uid 0 to the caller: the
    # helper starts, serves root's requests and fails the rest with the
    # kernel's errno.
    (export / "file").write_bytes(b"data")
    command = ["unshare", "--user", "--map-root-user", *helper_command]
    with running_helper(command, export) as helper:
        client = helper.client
        reply = client.call(p.Open(b"/file", os.O_RDONLY))
        assert reply.fd is not None
        try:
            assert os.read(reply.fd, 10) == b"data"
        finally:
            os.close(reply.fd)
        assert status_of(client.call(p.Mkdir(0, 0, b"/dir", 0o755))) == 0
        # uid 1000 has no mapping in the namespace.
        unmapped = p.Mkdir(1000, 1000, b"/user-dir", 0o755)
        assert status_of(client.call(unmapped)) == -errno.EINVAL
        device = p.Mknod(0, 0, b"/null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        assert status_of(client.call(device)) == -errno.EPERM
        assert client.call(p.Lstat(b"/dir")).status == 0
        status, stderr = helper.close()
    assert status == 0
    assert "cannot drop supplementary groups" in stderr
    assert (export / "dir").is_dir()
    assert not (export / "user-dir").exists()


def test_open_refuses_proc_magic_links(helper_command: list[str], export: Path) -> None:
    # An export that contains a procfs mount: its magic links, such as
    # /proc/self/root, must not be followed by OPEN.
    proc = export / "proc"
    proc.mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        for helper in start(helper_command, export):
            for path in (b"/proc/self/root", b"/proc/self/cwd"):
                reply = helper.client.call(p.Open(path, os.O_RDONLY | os.O_DIRECTORY))
                assert reply.status == -errno.ELOOP, path
            # Another process's root: the kernel's ptrace check rejects it first,
            # because the helper has no CAP_SYS_PTRACE.
            flags = os.O_RDONLY | os.O_DIRECTORY
            reply = helper.client.call(p.Open(b"/proc/1/root", flags))
            assert reply.status == -errno.EACCES
            # Ordinary files in that procfs still open.
            reply = helper.client.call(p.Open(b"/proc/self/status", os.O_RDONLY))
            assert reply.fd is not None
            os.close(reply.fd)
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=True)


MAPPED = ["--map-uid", "0:100000:65536", "--map-gid", "0:200000:65536"]


@pytest.fixture
def mapped(helper_command: list[str], export: Path) -> Iterator[HelperProcess]:
    yield from start(helper_command, export, *MAPPED)


def test_mapped_ids_on_create(mapped: HelperProcess, export: Path) -> None:
    assert status_of(mapped.client.call(p.Mkdir(1000, 1001, b"/d", 0o755))) == 0
    reply = mapped.client.call(p.Create(b"/f", os.O_CREAT | os.O_RDWR, 0o644, 0, 0))
    assert reply.fd is not None
    os.close(reply.fd)
    assert (export / "d").stat().st_uid == 101000
    assert (export / "d").stat().st_gid == 201001
    assert (export / "f").stat().st_uid == 100000
    assert (export / "f").stat().st_gid == 200000


def test_mapped_ids_on_chown(mapped: HelperProcess, export: Path) -> None:
    assert status_of(mapped.client.call(p.Chown(b"/file", 5, p.NO_ID))) == 0
    assert (export / "file").stat().st_uid == 100005
    assert (export / "file").stat().st_gid == 0


def test_mapped_ids_in_lstat(mapped: HelperProcess, export: Path) -> None:
    os.chown(export / "file", 100042, 200007)
    st = parse_stat(mapped.client.call(p.Lstat(b"/file")).payload)
    assert (st.st_uid, st.st_gid) == (42, 7)
    # The export root belongs to host root, which no range covers.
    root = parse_stat(mapped.client.call(p.Lstat(b"/")).payload)
    assert (root.st_uid, root.st_gid) == (65534, 65534)


def test_unmapped_guest_id_rejected(mapped: HelperProcess, export: Path) -> None:
    reply = mapped.client.call(p.Mkdir(70000, 0, b"/d", 0o755))
    assert status_of(reply) == -errno.EINVAL
    assert not (export / "d").exists()


def test_squash_all_ids(helper_command: list[str], export: Path) -> None:
    options = ["--squash-uid", "1234", "--squash-gid", "5678"]
    for helper in start(helper_command, export, *options):
        request = p.Mknod(0, 0, b"/fifo", stat.S_IFIFO | 0o600, 0)
        assert status_of(helper.client.call(request)) == 0
        st = parse_stat(helper.client.call(p.Lstat(b"/fifo")).payload)
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert (export / "fifo").lstat().st_uid == 1234
    assert (export / "fifo").lstat().st_gid == 5678


@pytest.mark.parametrize(
    "value", ["0:100000", "a:1:2", "0:1:0", "4294967295:0:1", "0:4294967200:100"]
)
def test_invalid_map_rejected(
    helper_command: list[str], export: Path, value: str
) -> None:
    command = helper_command + ["-n", "-f", "0", "-p", str(export), "--map-uid", value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "invalid range" in result.stderr
