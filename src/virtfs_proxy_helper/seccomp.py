"""A seccomp filter that limits the request loop to the system calls it makes.

Theory of operation: once start-up has confined the process to the export
and dropped capabilities, the helper only serves requests. The system calls
that this needs are few and known, and scripts/trace-syscalls lists them
from strace runs of the tests and of a guest boot. `install` hands the
kernel a classic BPF program that checks every later system call of the
process:

1. A call through another ABI (i386 via int 0x80, or x32) kills the
   process, because the numbers below mean other calls there.
2. A call that only code injected into the helper would make, such as
   execve, mount or ptrace, kills the process.
3. A call in the allow-list proceeds. ioctl proceeds only with the
   FS_IOC_GETVERSION request.
4. Any other call fails with ENOSYS. The request that made it gets an
   error reply, and the helper goes on serving.

The program is built from a few instruction helpers below, one small
group of instructions per rule, so it reads top to bottom like the list
above. The kernel accepts a filter from a process without CAP_SYS_ADMIN
only after PR_SET_NO_NEW_PRIVS, so `install` sets that first. Neither can
be undone, and both pass to child processes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterable

from . import libc
from .operations import FS_IOC_GETVERSION
from .server import SIOCOUTQ

# x86_64 numbers from the kernel's arch/x86/entry/syscalls/syscall_64.tbl,
# for the calls that this module names and nothing else.
SYSCALL_NUMBERS = {
    "write": 1,
    "close": 3,
    "stat": 4,
    "fstat": 5,
    "lstat": 6,
    "mmap": 9,
    "munmap": 11,
    "brk": 12,
    "rt_sigaction": 13,
    "rt_sigprocmask": 14,
    "rt_sigreturn": 15,
    "ioctl": 16,
    "mremap": 25,
    "madvise": 28,
    "getpid": 39,
    "sendto": 44,
    "recvfrom": 45,
    "sendmsg": 46,
    "execve": 59,
    "fcntl": 72,
    "truncate": 76,
    "ftruncate": 77,
    "chdir": 80,
    "fchdir": 81,
    "rename": 82,
    "mkdir": 83,
    "rmdir": 84,
    "unlink": 87,
    "symlink": 88,
    "readlink": 89,
    "chmod": 90,
    "lchown": 94,
    "ptrace": 101,
    "setresuid": 117,
    "setresgid": 119,
    "capset": 126,
    "mknod": 133,
    "personality": 135,
    "statfs": 137,
    "fstatfs": 138,
    "pivot_root": 155,
    "chroot": 161,
    "mount": 165,
    "umount2": 166,
    "init_module": 175,
    "delete_module": 176,
    "lsetxattr": 189,
    "lgetxattr": 192,
    "llistxattr": 195,
    "lremovexattr": 198,
    "futex": 202,
    "clock_gettime": 228,
    "exit_group": 231,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "openat": 257,
    "mkdirat": 258,
    "mknodat": 259,
    "fchownat": 260,
    "newfstatat": 262,
    "unlinkat": 263,
    "renameat": 264,
    "linkat": 265,
    "symlinkat": 266,
    "readlinkat": 267,
    "fchmodat": 268,
    "unshare": 272,
    "utimensat": 280,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "seccomp": 317,
    "kexec_file_load": 320,
    "bpf": 321,
    "execveat": 322,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "openat2": 437,
    "mount_setattr": 442,
}

# System calls of the request loop, as strace showed them with glibc 2.36
# and CPython 3.11, plus the rarer paths named in each group's comment.
REQUEST_LOOP_SYSCALLS: tuple[str, ...] = (
    # The connection to QEMU: recv_into, sendall, and sendmsg for the
    # SCM_RIGHTS reply of OPEN and CREATE. syslog(3) also sends with sendto.
    "recvfrom",
    "sendto",
    "sendmsg",
    # The request handlers in operations.py. OPEN looks paths up with
    # openat2 where the kernel has it. fcntl is F_SETFL in the fallback for
    # a missing /proc, and ioctl is FS_IOC_GETVERSION only.
    "openat",
    "openat2",
    "close",
    "newfstatat",
    "fcntl",
    "ioctl",
    "mkdir",
    "mknodat",
    "symlink",
    "linkat",
    "rename",
    "renameat",
    "unlink",
    "rmdir",
    "chmod",
    "lchown",
    "truncate",
    "utimensat",
    "readlink",
    "statfs",
    "lgetxattr",
    "llistxattr",
    "lsetxattr",
    "lremovexattr",
    # The same handlers on glibc before 2.33, whose stat(), lstat(),
    # fstat() and mknod() make these calls instead of newfstatat and mknodat.
    "stat",
    "fstat",
    "lstat",
    "mknod",
    # longpaths.py: runs a request from inside the directory it opened,
    # then returns to the root.
    "fchdir",
    "chdir",
    # unconfined.py (--sandbox none and chroot): the *at forms of the
    # handlers' calls, relative to directories opened with openat2, and the
    # calls on descriptors that openat2 returned.
    "fstatfs",
    "ftruncate",
    "fchmodat",
    "mkdirat",
    "unlinkat",
    "symlinkat",
    "readlinkat",
    "fchownat",
    # Switching to the guest's uid and gid for CREATE, MKNOD, MKDIR and
    # SYMLINK, and back. capget is not listed because nothing calls it
    # after start-up.
    "setresuid",
    "setresgid",
    "capset",
    # Logging: records to stderr, and the process id that log records and
    # syslog(3) with LOG_PID read. clock_gettime normally runs in the vDSO,
    # but falls back to the system call where the clock source has no
    # vDSO support.
    "write",
    "getpid",
    "clock_gettime",
    # Memory: the reused receive buffer is fixed, but every request
    # allocates Python objects, and malloc and CPython's allocator grow and
    # shrink the heap with these.
    "mmap",
    "munmap",
    "mremap",
    "brk",
    "madvise",
    # Signals and exit: the SIGTERM and SIGINT handlers return through
    # rt_sigreturn, interpreter shutdown restores handlers, and glibc's
    # abort() unblocks SIGABRT on a fatal error.
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "exit_group",
    # Locks in glibc and CPython wait on a futex only under contention,
    # which a single thread never meets. The call is listed so that such a
    # wait cannot fail.
    "futex",
)

# Calls that no code path of the helper makes, whatever a request carries:
# it never runs programs, mounts, traces, or loads anything into the
# kernel, and it confined itself to the export before the filter went on.
# Such a call means the process is running code that is not the helper's,
# so it is killed on the spot, and the kernel logs the kill. An errno would
# let that code try another way. io_uring is here because the operations it
# queues bypass seccomp.
KILLED_SYSCALLS: tuple[str, ...] = (
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "bpf",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "keyctl",
    "add_key",
    "request_key",
    "personality",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)

# ioctl requests that may pass: GETVERSION runs on files that OPEN checked,
# and SIOCOUTQ shows whether QEMU has read every earlier reply.
ALLOWED_IOCTLS: tuple[int, ...] = (FS_IOC_GETVERSION, SIOCOUTQ)

# Return values of a filter, from linux/seccomp.h.
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# Any other call fails with ENOSYS rather than killing the helper. A kill
# would end the whole share over one unforeseen call, possibly in the middle
# of a request that runs with the guest's identity. With an errno the
# handler raises OSError and the loop sends it back as the error reply.
# ENOSYS rather than EPERM, because glibc and CPython take ENOSYS to mean
# "kernel too old" and fall back to an older call where they have one, which
# may be in the list. The guest also gets "not implemented" rather than what
# looks like a permission problem with its file.
DEFAULT_ACTION = SECCOMP_RET_ERRNO | errno.ENOSYS
# Other ioctl requests fail as requests a device does not support do.
# isatty() gets this for TCGETS and returns False without raising.
REJECTED_IOCTL_ACTION = SECCOMP_RET_ERRNO | errno.ENOTTY

# struct seccomp_data: int nr, u32 arch, u64 instruction_pointer, u64
# args[6]. x86_64 is little-endian, so the low half of args[1] is first.
NR_OFFSET = 0
ARCH_OFFSET = 4
ARG1_LOW_OFFSET = 24

# EM_X86_64 with the 64-bit and little-endian flags, from linux/audit.h.
AUDIT_ARCH_X86_64 = 0xC000003E
# x32 calls have the x86_64 arch value, and this bit set in nr.
X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes, from linux/bpf_common.h.
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00
BPF_RET_K = 0x06 | 0x00

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
# TSYNC puts every thread of the process under the filter, not only the
# caller. LOG makes the kernel log each call that the filter does not
# allow, so that a call missing from the list shows up in the kernel log.
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2

# One BPF instruction as struct sock_filter orders it: (code, jt, jf, k).
# jt and jf count the instructions to skip when the test is true or false.
Instruction = tuple[int, int, int, int]


class SeccompUnavailable(Exception):
    """Error for a process that is not 64-bit x86_64, which the filter cannot cover."""


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def available() -> bool:
    """Return True if this process is a 64-bit x86_64 one, as the filter needs.

    A 32-bit or x32 Python on an x86_64 kernel gets False too: its calls
    arrive with another ABI, which the filter kills.
    """
    return platform.machine() == "x86_64" and ctypes.sizeof(ctypes.c_void_p) == 8


# The instruction helpers.


def load(offset: int) -> Instruction:
    """Load the 32-bit word at `offset` in struct seccomp_data."""
    return (BPF_LD_W_ABS, 0, 0, offset)


def jump_if_equal(value: int, skip_if_true: int, skip_if_false: int) -> Instruction:
    return (BPF_JMP_JEQ_K, skip_if_true, skip_if_false, value)


def ret(action: int) -> Instruction:
    return (BPF_RET_K, 0, 0, action)


def return_if_equal(value: int, action: int) -> list[Instruction]:
    """Return `action` if the loaded word is `value`, else go on."""
    return [jump_if_equal(value, 0, 1), ret(action)]


def return_unless_equal(value: int, action: int) -> list[Instruction]:
    """Return `action` if the loaded word is not `value`, else go on."""
    return [jump_if_equal(value, 1, 0), ret(action)]


def return_if_any_bit(mask: int, action: int) -> list[Instruction]:
    """Return `action` if the loaded word has any bit of `mask` set, else go on."""
    return [(BPF_JMP_JSET_K, 0, 1, mask), ret(action)]


# The program.


def build_program(allowed: Iterable[str]) -> list[Instruction]:
    """Assemble the filter program that allows the calls named in `allowed`.

    The rules come in the order the module docstring lists. Raise
    ValueError for a name without a number here, or for a name of
    KILLED_SYSCALLS.
    """
    names = _check_names(allowed)
    program = [load(ARCH_OFFSET)]
    program += return_unless_equal(AUDIT_ARCH_X86_64, SECCOMP_RET_KILL_PROCESS)
    program.append(load(NR_OFFSET))
    program += return_if_any_bit(X32_SYSCALL_BIT, SECCOMP_RET_KILL_PROCESS)
    for name in KILLED_SYSCALLS:
        program += return_if_equal(SYSCALL_NUMBERS[name], SECCOMP_RET_KILL_PROCESS)
    for name in sorted(names - {"ioctl"}):
        program += return_if_equal(SYSCALL_NUMBERS[name], SECCOMP_RET_ALLOW)
    if "ioctl" in names:
        program += _ioctl_rule()
    program.append(ret(DEFAULT_ACTION))
    return program


def _check_names(allowed: Iterable[str]) -> set[str]:
    names = set(allowed)
    unknown = names - SYSCALL_NUMBERS.keys()
    if unknown:
        raise ValueError(
            f"no x86_64 number for system calls {sorted(unknown)}; "
            "add them to SYSCALL_NUMBERS"
        )
    killed = names & set(KILLED_SYSCALLS)
    if killed:
        raise ValueError(f"system calls {sorted(killed)} are in KILLED_SYSCALLS")
    return names


def _ioctl_rule() -> list[Instruction]:
    """Allow ioctl with a request in ALLOWED_IOCTLS, and reject other requests.

    The request argument is an unsigned int in the kernel, which ignores
    the upper half of the register, so only the lower half is compared.
    The rule must come right before the default return, because calls
    other than ioctl jump past the rule onto the next instruction.
    """
    checks = [load(ARG1_LOW_OFFSET)]
    for request in ALLOWED_IOCTLS:
        checks += return_if_equal(request, SECCOMP_RET_ALLOW)
    checks.append(ret(REJECTED_IOCTL_ACTION))
    # Overwriting the loaded word is fine: every path through `checks` returns.
    return [jump_if_equal(SYSCALL_NUMBERS["ioctl"], 0, len(checks)), *checks]


def install(allowed: Iterable[str] = REQUEST_LOOP_SYSCALLS) -> None:
    """Set PR_SET_NO_NEW_PRIVS, then put the process under the filter for good.

    Call it last in start-up: from then on, anything outside `allowed`
    fails or kills the process as the module docstring describes. Raise
    SeccompUnavailable, before changing anything, if `available()` is
    False, and OSError if the kernel rejects either step.
    """
    if not available():
        raise SeccompUnavailable(
            f"the seccomp filter supports only 64-bit x86_64 processes, not "
            f"{platform.machine()} with {8 * ctypes.sizeof(ctypes.c_void_p)}-bit "
            "pointers"
        )
    program = build_program(allowed)
    instructions = (_SockFilter * len(program))(*(_SockFilter(*i) for i in program))
    fprog = _SockFprog(len(program), instructions)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    _set_filter(fprog)


def _set_filter(fprog: _SockFprog) -> None:
    flags = SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG
    result = _libc.syscall(
        SYSCALL_NUMBERS["seccomp"],
        SECCOMP_SET_MODE_FILTER,
        flags,
        ctypes.byref(fprog),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp failed: {os.strerror(err)}")
    if result > 0:
        # With TSYNC, a positive result is a thread that could not be synced.
        raise OSError(errno.EBUSY, f"seccomp could not filter thread {result}")
