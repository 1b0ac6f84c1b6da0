"""Build the initramfs of the test guest: busybox, the 9p modules and an /init.

/init mounts the 9p share with tag "share" at /mnt, runs /workload.sh there between
START_MARKER and the end marker on the serial console, then powers the guest off.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_DIR / ".cache" / "guest"
BUSYBOX = Path("/bin/busybox")
MOUNT_TAG = "share"
# The largest msize in bytes that the virtio transport of Linux 6.1 accepts. The
# kernel lowers larger values to it and logs "Limiting 'msize' to 512000".
DEFAULT_MSIZE = 512000
# Dependency order: each module needs only the ones before it.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
)
INITRAMFS_DIRS = (
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt",
    "lib", "lib/modules",
)  # fmt: skip
START_MARKER = "=== VM WORKLOAD START ==="
END_MARKER_PREFIX = "=== VM WORKLOAD END status="
END_MARKER_RE = re.compile(
    "^" + re.escape(END_MARKER_PREFIX) + r"(\d+) ===$", re.MULTILINE
)

# The kernel passes unknown "name=value" parameters of its command line to /init as
# environment variables, which is how vm_msize arrives.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for module in {" ".join(MODULES)}; do
    insmod /lib/modules/$module.ko || echo "vm-init: insmod $module failed"
done
# Keep kernel messages from interleaving with the workload output on the console.
dmesg -n 1
mounted=no
for attempt in 1 2 3 4 5; do
    if mount -t 9p -o trans=virtio,version=9p2000.L,msize=$vm_msize {MOUNT_TAG} /mnt
    then
        mounted=yes
        break
    fi
    sleep 1
done
if [ $mounted = yes ]; then
    cd /mnt
    echo "{START_MARKER}"
    sh /workload.sh </dev/null 2>&1
    status=$?
    cd /
    echo "{END_MARKER_PREFIX}$status ==="
    sync
    umount /mnt || echo "vm-init: umount /mnt failed"
else
    echo "vm-init: mount of 9p tag {MOUNT_TAG} failed"
fi
poweroff -f
"""


class InitramfsError(RuntimeError):
    """A missing or unusable input of the initramfs."""


def _version_key(release: str) -> list[int | str]:
    return [
        int(part) if part.isdigit() else part for part in re.split(r"(\d+)", release)
    ]


def find_kernel_release() -> str:
    """Return the newest "*-amd64" release that has both modules and a kernel."""
    releases = [
        path.name
        for path in Path("/lib/modules").glob("*-amd64")
        if Path(f"/boot/vmlinuz-{path.name}").is_file()
    ]
    if not releases:
        raise InitramfsError(
            "no kernel found: /lib/modules/*-amd64 with a matching /boot/vmlinuz-*; "
            "run scripts/install-deps"
        )
    return max(releases, key=_version_key)


def _find_module(release: str, name: str) -> Path:
    kernel_dir = Path("/lib/modules") / release / "kernel"
    for base in (name, name.replace("_", "-")):
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            found = sorted(kernel_dir.rglob(base + suffix))
            if found:
                return found[0]
    raise InitramfsError(f"kernel module {name} not found under {kernel_dir}")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        # Python 3.11 has no zstd module, so this needs the zstd command.
        if shutil.which("zstd") is None:
            raise InitramfsError(f"{path} is zstd-compressed: install the zstd package")
        return subprocess.run(
            ["zstd", "-dc", str(path)], check=True, capture_output=True
        ).stdout
    return data


class NewcArchive:
    """A cpio archive in the "newc" format that the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._inode = 0

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: int = 0) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        # The 13 header fields: ino, mode, uid, gid, nlink, mtime, filesize,
        # devmajor, devminor, rdevmajor, rdevminor, namesize (with the NUL), check.
        fields = (
            self._inode, mode, 0, 0, 1, 0, len(data), 0, 0,
            os.major(rdev), os.minor(rdev), len(encoded), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._parts.append(_pad4(header + encoded))
        self._parts.append(_pad4(data))

    def directory(self, name: str) -> None:
        self._add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._add(name, stat.S_IFCHR | 0o600, rdev=os.makedev(major, minor))

    def to_bytes(self) -> bytes:
        trailer = NewcArchive()
        trailer._add("TRAILER!!!", 0)
        return b"".join(self._parts + trailer._parts)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _gzip(data: bytes) -> bytes:
    # mtime=0 keeps the archive identical for identical inputs.
    return _pad4(gzip.compress(data, compresslevel=6, mtime=0))


def build_base_initramfs(
    release: str | None = None, cache_dir: Path = CACHE_DIR
) -> Path:
    """Build the gzip'd base initramfs into cache_dir, unless it is up to date.

    The archive holds busybox, the 9p/virtio modules of the kernel release (default:
    find_kernel_release()) and /init. Its file name contains a digest of these
    inputs, so a changed input leads to a new archive, and older ones are removed.
    The workload goes into a second archive, see build_workload_initramfs().
    """
    release = release or find_kernel_release()
    modules = {name: _read_module(_find_module(release, name)) for name in MODULES}
    busybox = BUSYBOX.read_bytes()

    digest = hashlib.sha256()
    for part in (INIT_SCRIPT.encode(), busybox, *modules.values()):
        digest.update(hashlib.sha256(part).digest())
    output = cache_dir / f"base-{release}-{digest.hexdigest()[:16]}.cpio.gz"
    if output.is_file():
        return output

    archive = NewcArchive()
    for directory in INITRAMFS_DIRS:
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox, 0o755)
    for name, data in modules.items():
        archive.file(f"lib/modules/{name}.ko", data)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write to a unique name and rename, so that concurrent builds never read a
    # partial archive.
    with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as temporary:
        temporary.write(_gzip(archive.to_bytes()))
    os.chmod(temporary.name, 0o644)
    os.replace(temporary.name, output)
    for stale in cache_dir.glob("base-*.cpio.gz"):
        if stale != output:
            stale.unlink(missing_ok=True)
    return output


def build_workload_initramfs(workload: bytes) -> bytes:
    """Return a gzip'd cpio archive holding /workload.sh.

    The kernel unpacks concatenated archives in order, so appending this one to the
    base archive adds the file.
    """
    archive = NewcArchive()
    archive.file("workload.sh", workload, 0o755)
    return _gzip(archive.to_bytes())
