"""Intended differences between our helper and QEMU's C virtfs-proxy-helper.

This list is the one place that records where ours deliberately behaves
differently from the C helper of QEMU 7.2 (Debian package
1:7.2+dfsg-7+deb12u18, /usr/lib/qemu/virtfs-proxy-helper). The C behaviour
of each entry was observed by running that binary, except for the cases
whose condition states "not sent to C". tests/test_differential.py skips the reply
comparison for exactly these cases, and asserts instead that ours gives
`our_status` and that C gives `c_status`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    """One intended difference, with the reply status each helper gives.

    `our_status` and `c_status` are reply statuses as the client reads them:
    0 for success or a negative errno. `c_status` is None where C sends no
    reply (it blocks, crashes or closes the connection) or where the case is
    not sent to C.
    """

    name: str
    condition: str
    c_behaviour: str
    our_behaviour: str
    reason: str
    our_status: int | None
    c_status: int | None


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        name="fifo-open-blocks",
        condition="OPEN, or CREATE of an existing path, naming a FIFO, opened "
        "O_RDONLY or O_WRONLY without O_NONBLOCK",
        c_behaviour="opens the FIFO before checking its type, so it blocks until "
        "another process opens the other end, and only then replies ENXIO. "
        "Until then it serves no other request",
        our_behaviour="checks the type through an O_PATH descriptor and replies "
        "ENXIO at once, without opening the FIFO",
        reason="a guest that can create a FIFO must not be able to stop the "
        "helper, and QEMU gets ENXIO either way",
        our_status=-errno.ENXIO,
        c_status=-errno.ENXIO,
    ),
    Difference(
        name="device-open-runs-driver",
        condition="OPEN or CREATE naming a character or block device node",
        c_behaviour="opens the device, which runs its driver's open, then closes "
        "it and replies ENXIO. When the driver's open fails, it replies that "
        "error instead, for example EPERM for /dev/kmsg (1, 11) opened O_RDONLY "
        "while kernel.dmesg_restrict is 1",
        our_behaviour="replies ENXIO without opening the device",
        reason="the guest controls device numbers in the export, so opening a "
        "device node on its behalf can reach any driver on the host",
        our_status=-errno.ENXIO,
        c_status=-errno.EPERM,
    ),
    Difference(
        name="getversion-special-file",
        condition="GETVERSION naming anything but a regular file or directory, "
        "on a filesystem with inode generation numbers (ext4 here)",
        c_behaviour="opens the path O_RDONLY and issues FS_IOC_GETVERSION, so it "
        "replies ENOTTY for /dev/null and EPERM for /dev/kmsg under "
        "dmesg_restrict. On a FIFO it blocks until a writer opens it, then "
        "replies ENOTTY",
        our_behaviour="replies ENXIO without opening the file",
        reason="as for OPEN, a FIFO must not stop the helper and a device node "
        "must not be opened",
        our_status=-errno.ENXIO,
        c_status=-errno.ENOTTY,
    ),
    Difference(
        name="malformed-frame-errno",
        condition="a payload shorter than its request type's fields: a number, "
        "a string length or string bytes past the end",
        c_behaviour="replies ENOBUFS, the error of its unmarshalling code, "
        "performs nothing and keeps serving",
        our_behaviour="replies EINVAL, performs nothing and keeps serving",
        reason="EINVAL is the errno for invalid arguments, while ENOBUFS means "
        "that buffer space ran out, which is not what happened",
        our_status=-errno.EINVAL,
        c_status=-errno.ENOBUFS,
    ),
    Difference(
        name="trailing-bytes",
        condition="a payload longer than its request type's fields",
        c_behaviour="ignores the bytes after the last field and performs the request",
        our_behaviour="replies EINVAL and performs nothing",
        reason="QEMU never sends extra bytes, so a frame with them comes from a "
        "broken or hostile peer, and acting on a frame that does not parse "
        "exactly is guessing",
        our_status=-errno.EINVAL,
        c_status=0,
    ),
    Difference(
        name="nul-in-path",
        condition="a path, xattr name or symlink target containing a NUL byte",
        c_behaviour="passes the string to the system call as a C string, so it "
        "performs the request on the bytes before the NUL",
        our_behaviour="replies EINVAL and performs nothing",
        reason="no file name can contain NUL, so the request names no file, and "
        "acting on a prefix of the path touches a file the peer did not name",
        our_status=-errno.EINVAL,
        c_status=0,
    ),
    Difference(
        name="getversion-upper-bits",
        condition="GETVERSION that succeeds on a filesystem with inode "
        "generation numbers",
        c_behaviour="passes an uninitialised u64 to FS_IOC_GETVERSION, which "
        "writes only 32 bits on ext4, so the upper 32 bits of the reply are "
        "stack garbage (observed: bytes of a string)",
        our_behaviour="replies with the upper 32 bits zero",
        reason="the generation number is 32 bits wide, and a reply must not leak "
        "the helper's memory",
        our_status=0,
        c_status=0,
    ),
    Difference(
        name="getversion-payload-unread",
        condition="malformed GETVERSION on a filesystem without inode generation "
        "numbers (tmpfs here)",
        c_behaviour="replies SUCCESS with version 0 without reading the payload",
        our_behaviour="replies EINVAL, like any malformed frame",
        reason="every malformed frame gets the same answer, whatever the export's "
        "filesystem",
        our_status=-errno.EINVAL,
        c_status=0,
    ),
    Difference(
        name="readlink-negative-size",
        condition="READLINK with a negative buffer size (not sent to C)",
        c_behaviour="crashes: g_malloc of (size_t)-1 fails with 'GLib-ERROR: "
        "failed to allocate 18446744073709551615 bytes' and the process dies "
        "of SIGTRAP",
        our_behaviour="replies EINVAL and keeps serving",
        reason="a peer's size field must not be able to kill the helper",
        our_status=-errno.EINVAL,
        c_status=None,
    ),
    Difference(
        name="lgetxattr-negative-size",
        condition="LGETXATTR with a negative buffer size (not sent to C)",
        c_behaviour="crashes: g_malloc of (size_t)-1 fails and the process dies "
        "of SIGTRAP",
        our_behaviour="replies EINVAL and keeps serving",
        reason="a peer's size field must not be able to kill the helper",
        our_status=-errno.EINVAL,
        c_status=None,
    ),
    Difference(
        name="llistxattr-negative-size",
        condition="LLISTXATTR with a negative buffer size (not sent to C)",
        c_behaviour="crashes: g_malloc of (size_t)-1 fails and the process dies "
        "of SIGTRAP",
        our_behaviour="replies EINVAL and keeps serving",
        reason="a peer's size field must not be able to kill the helper",
        our_status=-errno.EINVAL,
        c_status=None,
    ),
    Difference(
        name="lsetxattr-size-mismatch",
        condition="LSETXATTR whose size field differs from the value's length",
        c_behaviour="passes the size field to lsetxattr(2) with the value's "
        "buffer: a smaller size stores a truncated value, the length plus one "
        "stores the string's NUL terminator too, a larger size reads past the "
        "buffer (not sent to C), and a negative size gives E2BIG",
        our_behaviour="replies EINVAL and stores nothing",
        reason="the value string carries its own length, so a size field that "
        "disagrees is a malformed request, and honouring a larger one leaks the "
        "helper's heap into the file",
        our_status=-errno.EINVAL,
        c_status=0,
    ),
    Difference(
        name="unknown-request-type",
        condition="a frame whose type is no request: 0 (SUCCESS), 1 (ERROR), or "
        "22 and above",
        c_behaviour="closes the connection without a reply and exits with status 0",
        our_behaviour="replies ERROR with EOPNOTSUPP and keeps serving",
        reason="the frame header gives its length, so the stream is still in "
        "step, and an error reply lets a newer peer probe for request types",
        our_status=-errno.EOPNOTSUPP,
        c_status=None,
    ),
    Difference(
        name="open-creat-missing",
        condition="OPEN with O_CREAT naming a missing file",
        c_behaviour="passes O_CREAT to open(2) without a mode argument, so it "
        "creates the file, owned by root, with an undefined mode (observed: "
        "0o000)",
        our_behaviour="rejects O_CREAT (and O_TMPFILE) in OPEN with EINVAL and "
        "creates nothing",
        reason="OPEN carries no mode, uid or gid, so it cannot create a file "
        "correctly, and QEMU creates files with CREATE",
        our_status=-errno.EINVAL,
        c_status=0,
    ),
    Difference(
        name="open-excl-existing",
        condition="OPEN with O_CREAT | O_EXCL naming an existing file",
        c_behaviour="replies EEXIST, as open(2) does",
        our_behaviour="rejects O_CREAT in OPEN with EINVAL",
        reason="OPEN never creates, so O_CREAT there is a malformed request; "
        "QEMU strips it and sends CREATE to create a file",
        our_status=-errno.EINVAL,
        c_status=-errno.EEXIST,
    ),
    Difference(
        name="unchanged-ids-keep-capabilities",
        condition="CREATE, MKDIR, MKNOD or SYMLINK with uid and gid each 0 or -1, "
        "not both 0",
        c_behaviour="keeps uid and gid 0 but cuts its effective capabilities to "
        "CAP_DAC_OVERRIDE, because it treats only 0/0 as root. So MKNOD of a "
        "device fails with EPERM, and CREATE with S_ISGID in a setgid directory "
        "of another group loses the S_ISGID bit",
        our_behaviour="keeps ids and capabilities unchanged, exactly as for 0/0, "
        "so the device is created and S_ISGID is kept",
        reason="-1 means 'leave this id unchanged', so the request runs as the "
        "helper itself does",
        our_status=0,
        c_status=-errno.EPERM,
    ),
    Difference(
        name="capabilities-after-create",
        condition="any request after a CREATE, MKDIR, MKNOD or SYMLINK whose uid "
        "is 0 or -1 and whose ids are not both 0",
        c_behaviour="its main thread keeps only CAP_DAC_OVERRIDE effective, "
        "because setresuid() back to an unchanged euid 0 restores no "
        "capabilities, and a later 0/0 or -1/-1 request does not restore them "
        "either. CHOWN to another user and MKNOD of a device then fail with "
        "EPERM. The next create-type request with a nonzero uid or gid kills it "
        "with SIGABRT (not sent to C): setresgid() or setresuid() fails in the "
        "main thread but succeeds in a second thread that kept its "
        "capabilities, and glibc aborts on that mismatch",
        our_behaviour="restores the full kept capability set after every request",
        reason="one request's ids must not change how the next request runs",
        our_status=0,
        c_status=-errno.EPERM,
    ),
    Difference(
        name="long-paths",
        condition="any request on a path of 4096 bytes or more, made of names "
        "of at most 255 bytes",
        c_behaviour="passes the path to the C library, and the kernel replies "
        "ENAMETOOLONG",
        our_behaviour="opens the path a chunk of components at a time and runs "
        "the request on the last name, as a local filesystem would",
        reason="a guest can build a tree deeper than PATH_MAX out of ordinary "
        "names, and every file in it must stay reachable",
        our_status=0,
        c_status=-errno.ENAMETOOLONG,
    ),
    Difference(
        name="special-file-open-errors",
        condition="OPEN, or CREATE without O_EXCL, naming an existing FIFO, socket "
        "or device node, without O_PATH or O_DIRECTORY, where open(2) fails without "
        "blocking: O_NOATIME by a uid that does not own the file, or a FIFO opened "
        "with access mode 3, or with O_DIRECT and either O_RDWR or O_RDONLY | "
        "O_NONBLOCK",
        c_behaviour="replies open(2)'s error: EPERM for O_NOATIME, EINVAL for "
        "the FIFOs",
        our_behaviour="replies ENXIO without opening the file",
        reason="ours never opens a special file, so only the file's type decides "
        "the reply, and QEMU gets an error either way",
        our_status=-errno.ENXIO,
        c_status=-errno.EPERM,
    ),
)

_BY_NAME = {entry.name: entry for entry in DIFFERENCES}


def difference(name: str) -> Difference:
    """Return the entry called `name`, raising KeyError for an unknown name."""
    return _BY_NAME[name]
