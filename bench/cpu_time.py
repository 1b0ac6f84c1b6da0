#!/usr/bin/env python3
"""Run a command, then print the CPU time it used to stderr.

    cpu_time.py COMMAND [ARG...]

bench/guest.py puts this in front of a helper, so that the helper's own CPU
time, which the guest's wall clock cannot separate from QEMU's, lands in
the helper log as one "bench-cpu-time: user=SECONDS system=SECONDS" line.
Descriptors stay inherited, SIGTERM and SIGINT are passed on to the
command, and the exit status is the command's.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: cpu_time.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, close_fds=False)

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"bench-cpu-time: user={usage.ru_utime:.3f} system={usage.ru_stime:.3f}",
        file=sys.stderr,
        flush=True,
    )
    # A negative status means a signal ended the command, as in a shell.
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
