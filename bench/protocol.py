#!/usr/bin/env python3
"""Side-by-side request throughput of QEMU's C helper and ours, one client.

Each helper runs once, in --fd mode, on its own fresh export tree. For every
operation and round, both helpers serve a batch of the same size back to
back, in alternating order, so that noise on this machine hits both. One
request is in flight at a time, as with QEMU, so ops/s is the inverse of
the round-trip latency, client included. The client precomputes every
request frame and uses the raw socket, so its share is small and the same
for both helpers. Besides wall time, each batch records the helper's own
CPU time from /proc/PID/schedstat.

    .venv/bin/python bench/protocol.py --seconds 120 --json out.json
    .venv/bin/python bench/protocol.py --profile open+close
    .venv/bin/python bench/protocol.py --syscalls
"""

from __future__ import annotations

import argparse
import array
import os
import pstats
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

from harness import HelperProcess, our_helper, running_helper
from virtfs_proxy_helper import protocol as wire

_I32 = struct.Struct("=i")
_FD_SIZE = array.array("i").itemsize
# QEMU's proxy driver sends a path as its V9fsPath: relative to the export
# root "/", joined with "/", with the C terminator counted in the length.
_FILE = b"//file\0"
_LINK = b"//link\0"
_NEW = b"//work/new"
_UTIME_SEC = 1_000_000_000
# The ":LINE" at the end of a py-spy frame such as "serve (server.py:74)".
_LINE_NUMBER_RE = re.compile(r":\d+\)$")


class BenchError(Exception):
    """A helper failed a request that the benchmark expects to succeed."""


@dataclass(frozen=True)
class Step:
    """One request of an operation, as encoded frame bytes."""

    frame: bytes
    fd_reply: bool


@dataclass(frozen=True)
class Operation:
    name: str
    steps: tuple[Step, ...]


def _step(request: wire.Request) -> Step:
    kind = wire.TYPE_OF[type(request)]
    return Step(wire.encode_request(request), kind in wire.FD_REPLY_TYPES)


def _operation(name: str, *requests: wire.Request) -> Operation:
    return Operation(name, tuple(_step(request) for request in requests))


def build_operations() -> list[Operation]:
    """Return the benchmarked operations, each one or two requests long."""
    create_flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    return [
        _operation("lstat", wire.Lstat(_FILE)),
        _operation("open+close", wire.Open(_FILE, os.O_RDONLY)),
        _operation(
            "create+remove",
            wire.Create(_NEW, create_flags, 0o644, 0, 0),
            wire.Remove(_NEW + b"\0"),
        ),
        _operation(
            "create+remove 1000",
            wire.Create(_NEW, create_flags, 0o644, 1000, 1000),
            wire.Remove(_NEW + b"\0"),
        ),
        _operation(
            "mkdir+rmdir",
            wire.Mkdir(0, 0, _NEW, 0o755),
            wire.Remove(_NEW + b"\0"),
        ),
        _operation(
            "mkdir+rmdir 1000",
            wire.Mkdir(1000, 1000, _NEW, 0o755),
            wire.Remove(_NEW + b"\0"),
        ),
        _operation("chmod", wire.Chmod(_FILE, 0o644)),
        _operation("chown", wire.Chown(_FILE, 1000, 1000)),
        _operation("utime", wire.Utime(_FILE, _UTIME_SEC, 0, _UTIME_SEC, 0)),
        _operation("readlink", wire.Readlink(_LINK, 4096)),
        _operation("statfs", wire.Statfs(b"/\0")),
        _operation("getversion", wire.Getversion(_FILE)),
        _operation(
            "lgetxattr size", wire.Lgetxattr(0, _FILE, common.XATTR_NAME + b"\0")
        ),
    ]


class RawClient:
    """Sends precomputed frames and checks only that each reply is a success."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray(wire.HEADER_SIZE + wire.MAX_PAYLOAD)
        self.view = memoryview(self.buffer)
        self.control_size = socket.CMSG_SPACE(_FD_SIZE)

    def call_frame(self, frame: bytes) -> None:
        self.sock.sendall(frame)
        filled = self._receive(0, wire.HEADER_SIZE)
        kind, size = wire.HEADER.unpack_from(self.buffer)
        self._receive(filled, wire.HEADER_SIZE + size)
        if kind != wire.T_SUCCESS:
            status = _I32.unpack_from(self.buffer, wire.HEADER_SIZE)[0]
            raise BenchError(f"reply type {kind}, status {status}")

    def _receive(self, filled: int, size: int) -> int:
        while filled < size:
            received = self.sock.recv_into(self.view[filled:])
            if received == 0:
                raise BenchError("the helper closed the connection")
            filled += received
        return filled

    def call_fd(self, frame: bytes) -> None:
        self.sock.sendall(frame)
        data, ancillary, _, _ = self.sock.recvmsg(_I32.size, self.control_size)
        fds = [
            fd
            for level, kind, cmsg in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in array.array("i", cmsg[: len(cmsg) - len(cmsg) % _FD_SIZE])
        ]
        for fd in fds:
            os.close(fd)
        # A stream socket could split the 4 bytes in general, but Linux
        # queues one sendmsg on a unix stream socket as one unit.
        if len(data) != _I32.size:
            raise BenchError(f"fd reply of {len(data)} bytes")
        status = _I32.unpack(data)[0]
        if status != wire.FD_VALID or len(fds) != 1:
            raise BenchError(f"fd reply status {status} with {len(fds)} descriptors")

    def run(self, operation: Operation, count: int) -> None:
        steps = [
            (self.call_fd if step.fd_reply else self.call_frame, step.frame)
            for step in operation.steps
        ]
        for _ in range(count):
            for call, frame in steps:
                call(frame)


def cpu_ns(pid: int) -> int:
    """Return the CPU time in ns that process `pid` has used so far."""
    with open(f"/proc/{pid}/schedstat") as schedstat:
        return int(schedstat.read().split()[0])


@dataclass
class Target:
    """One helper under test: its process and the client that drives it."""

    name: str
    helper: HelperProcess
    client: RawClient

    def timed_batch(self, operation: Operation, count: int) -> tuple[float, float]:
        """Run `count` operations; return (wall seconds, helper CPU seconds)."""
        cpu_before = cpu_ns(self.helper.pid)
        start = time.perf_counter()
        self.client.run(operation, count)
        wall = time.perf_counter() - start
        cpu = (cpu_ns(self.helper.pid) - cpu_before) / 1e9
        return wall, cpu


PLACEMENTS = ("same-cpu", "split", "free")
FLOOR = "floor_helper.py"


def place_client(placement: str) -> set[int] | None:
    """Pin this process for `placement`; return the CPUs for the helpers.

    same-cpu puts the client and the helpers on the last CPU, so a round
    trip is two context switches and the helpers' own cost shows. split
    puts the helpers on the last CPU and the client on the first, so every
    request also pays a cross-CPU wakeup, as between QEMU and its helper.
    free leaves placement to the scheduler. None means "do not pin".
    """
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "free":
        return None
    last = {cpus[-1]}
    if placement == "same-cpu":
        os.sched_setaffinity(0, last)
        return last
    if len(cpus) < 2:
        sys.exit("--placement split needs at least two CPUs")
    os.sched_setaffinity(0, {cpus[0]})
    return last


@contextmanager
def started_targets(
    workdir: Path, commands: dict[str, list[str]], helper_cpus: set[int] | None
) -> Iterator[list[Target]]:
    """Start each helper on its own fresh export and wait for its first reply."""
    with ExitStack() as stack:
        targets = []
        for name, command in commands.items():
            export = common.make_export(workdir / f"export-{name}")
            helper = stack.enter_context(running_helper(command, export))
            if helper_cpus is not None:
                os.sched_setaffinity(helper.pid, helper_cpus)
            client = RawClient(helper.client.sock)
            client.call_frame(wire.encode_request(wire.Lstat(b"/\0")))
            targets.append(Target(name, helper, client))
        yield targets


def calibrate(targets: list[Target], operation: Operation, pair_seconds: float) -> int:
    """Return a batch size that takes about `pair_seconds` on all helpers together.

    Doubling batches up to 50 ms each also warm up every helper first.
    """
    seconds_per_op = 0.0
    for target in targets:
        count = 16
        while True:
            wall, _ = target.timed_batch(operation, count)
            if wall >= 0.05:
                break
            count *= 2
        seconds_per_op += wall / count
    return max(1, round(pair_seconds / seconds_per_op))


def run_rounds(
    targets: list[Target], operations: list[Operation], seconds: float, rounds: int
) -> dict[str, Any]:
    """Measure every operation in `rounds` interleaved rounds; return raw rounds."""
    pair_seconds = seconds / (rounds * len(operations))
    counts = {op.name: calibrate(targets, op, pair_seconds) for op in operations}
    results: dict[str, Any] = {
        op.name: {
            "count": counts[op.name],
            "requests_per_op": len(op.steps),
            "rounds": {t.name: [] for t in targets},
        }
        for op in operations
    }
    for number in range(rounds):
        # Alternate which helper goes first, so neither always follows the other.
        order = targets if number % 2 == 0 else targets[::-1]
        for op in operations:
            for target in order:
                wall, cpu = target.timed_batch(op, counts[op.name])
                results[op.name]["rounds"][target.name].append(
                    {"wall_s": wall, "helper_cpu_s": cpu}
                )
    return results


def summarize(results: dict[str, Any], names: list[str]) -> None:
    """Add medians and the ratio of ours to C to each operation's results.

    The ratio is the median of per-round ratios, each from two batches run
    back to back, so a slow phase of the machine that covers one round
    moves that round's rates but hardly its ratio.
    """
    for result in results.values():
        count = result["count"]
        for name in names:
            rounds = result["rounds"][name]
            rates = [count / r["wall_s"] for r in rounds]
            cpu_us = [r["helper_cpu_s"] / count * 1e6 for r in rounds]
            result[name] = {
                "ops_per_s": statistics.median(rates),
                "ops_per_s_rounds": rates,
                "helper_cpu_us_per_op": statistics.median(cpu_us),
            }
        paired = _paired_ratios(result["rounds"], "ours")
        if "floor" in names:
            result["floor_ratio"] = statistics.median(
                _paired_ratios(result["rounds"], "floor")
            )
        result["ratio"] = statistics.median(paired)
        result["ratio_of_medians"] = (
            result["ours"]["ops_per_s"] / result["c"]["ops_per_s"]
        )
        result["ratio_rounds"] = paired
        result["ratio_rounds_min"] = min(paired)
        result["ratio_rounds_max"] = max(paired)
        result["cpu_ratio"] = (
            result["c"]["helper_cpu_us_per_op"] / result["ours"]["helper_cpu_us_per_op"]
        )


def _paired_ratios(rounds: dict[str, list[dict[str, float]]], name: str) -> list[float]:
    """Return C's wall time over `name`'s for each round: its ops/s ratio to C."""
    return [
        c["wall_s"] / other["wall_s"]
        for c, other in zip(rounds["c"], rounds[name], strict=True)
    ]


def format_table(results: dict[str, Any]) -> str:
    header = (
        f"{'operation':<20} {'C ops/s':>9} {'ours ops/s':>10} {'ratio':>6} "
        f"{'rounds':>11} {'C cpu us':>8} {'our cpu us':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        spread = f"{result['ratio_rounds_min']:.2f}-{result['ratio_rounds_max']:.2f}"
        lines.append(
            f"{name:<20} {result['c']['ops_per_s']:>9.0f} "
            f"{result['ours']['ops_per_s']:>10.0f} {result['ratio']:>6.2f} "
            f"{spread:>11} {result['c']['helper_cpu_us_per_op']:>8.1f} "
            f"{result['ours']['helper_cpu_us_per_op']:>10.1f}"
        )
        if "floor_ratio" in result:
            lines.append(
                f"{'  floor_helper.py':<20} {'':>9} "
                f"{result['floor']['ops_per_s']:>10.0f} {result['floor_ratio']:>6.2f} "
                f"{'':>11} {'':>8} {result['floor']['helper_cpu_us_per_op']:>10.1f}"
            )
    lines.append(
        "ratio: ours/C ops/s, median of per-round ratios; rounds: their min-max; "
        "cpu us: helper CPU time per op (median)"
    )
    return "\n".join(lines)


def peak_rss(targets: list[Target]) -> dict[str, dict[str, int]]:
    """Return VmHWM and VmRSS in KiB of each helper, read while it still runs."""
    memory = {}
    for target in targets:
        status = target.helper.status()
        memory[target.name] = {
            "vm_hwm_kib": common.kib(status["VmHWM"]),
            "vm_rss_kib": common.kib(status["VmRSS"]),
        }
    return memory


def measure(
    seconds: float,
    rounds: int,
    operations: list[Operation],
    placement: str,
    floor: bool = False,
) -> dict[str, Any]:
    """Run the whole benchmark in a temporary directory; return the JSON data.

    With `floor`, bench/floor_helper.py runs as a third helper.
    """
    commands = common.helper_commands()
    if floor:
        commands["floor"] = [sys.executable, str(Path(__file__).with_name(FLOOR))]
    machine = common.machine_info()
    helper_cpus = place_client(placement)
    with (
        tempfile.TemporaryDirectory(prefix="bench-protocol-") as workdir,
        started_targets(Path(workdir), commands, helper_cpus) as targets,
    ):
        started = time.monotonic()
        results = run_rounds(targets, operations, seconds, rounds)
        elapsed = time.monotonic() - started
        memory = peak_rss(targets)
    summarize(results, list(commands))
    return {
        "benchmark": "protocol",
        "machine": machine,
        "config": {
            "seconds": seconds,
            "rounds": rounds,
            "placement": placement,
            "client_cpus": sorted(os.sched_getaffinity(0)),
            "helper_cpus": None if helper_cpus is None else sorted(helper_cpus),
            "commands": commands,
        },
        "elapsed_s": elapsed,
        "loadavg_at_end": os.getloadavg(),
        "memory": memory,
        "operations": results,
    }


def find_operation(name: str) -> Operation:
    operations = {op.name: op for op in build_operations()}
    if name not in operations:
        sys.exit(f"unknown operation {name!r}; choose from: {', '.join(operations)}")
    return operations[name]


def profile(operation: Operation, seconds: float, top: int, placement: str) -> None:
    """Run ours under cProfile for `operation` and print the hottest functions.

    cProfile writes its output when the helper exits, after it has made the
    export its root directory, so the path given to it lands in the export.
    """
    command = [sys.executable, "-m", "cProfile", "-o", "/profile.pstats"]
    command += ["-m", "virtfs_proxy_helper"]
    helper_cpus = place_client(placement)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as workdir:
        export = Path(workdir) / "export-ours"
        with started_targets(Path(workdir), {"ours": command}, helper_cpus) as targets:
            count = calibrate(targets, operation, seconds)
            wall, cpu = targets[0].timed_batch(operation, count)
        print(
            f"{operation.name}: {count} ops under cProfile, {count / wall:.0f} ops/s, "
            f"helper CPU {cpu / count * 1e6:.1f} us/op. cProfile adds overhead to "
            "every Python call, so compare shares, not absolute times.\n"
        )
        stats = pstats.Stats(str(export / "profile.pstats"))
        stats.sort_stats("tottime").print_stats(top)
    print(
        "For a sampling profile without that overhead, install py-spy "
        "(pip install py-spy) and add --py-spy PATH_TO_PY_SPY."
    )


def sample_profile(
    operation: Operation, seconds: float, top: int, placement: str, py_spy: str
) -> None:
    """Sample ours with py-spy while it serves `operation`; print where time goes.

    py-spy starts the helper itself, because attaching to a running one
    failed with py-spy 0.4.3 ("No such file or directory" while reading the
    Python binary), most likely because the export is its root by then.
    --native adds the C frames below Python's.
    """
    helper_cpus = place_client(placement)
    with tempfile.TemporaryDirectory(prefix="bench-py-spy-") as workdir:
        raw = Path(workdir) / "ours.txt"
        # py-spy stops the helper for each sample (--native rules out
        # --nonblocking), which slows it down but keeps the shares.
        command = [py_spy, "record", "--native", "--format", "raw", "--rate", "499",
                   "--output", str(raw), "--", *our_helper()]  # fmt: skip
        with started_targets(Path(workdir), {"ours": command}, helper_cpus) as targets:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                targets[0].client.run(operation, 1000)
        if not raw.exists():
            raise BenchError(f"py-spy wrote no samples to {raw}")
        print(format_samples(operation.name, raw.read_text(), top))


def format_samples(name: str, raw: str, top: int) -> str:
    """Summarize py-spy's collapsed stacks as self and inclusive shares.

    Samples in libc's recv are the helper waiting for the next request,
    so they are counted apart and left out of the shares.
    """
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    total = waiting = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or "serve (" not in stack:
            continue
        samples = int(number)
        if frames[-1].startswith("recv ("):
            waiting += samples
            continue
        total += samples
        # Frames name a line; shares per function are easier to read.
        functions = [_LINE_NUMBER_RE.sub(")", frame) for frame in frames]
        self_counts[functions[-1]] = self_counts.get(functions[-1], 0) + samples
        for function in set(functions):
            total_counts[function] = total_counts.get(function, 0) + samples
    lines = [
        f"{name}: {total} samples of ours serving requests, "
        f"{waiting} more waiting in recv for the next one",
        "",
        "self %  function",
    ]
    for frame, samples in sorted(self_counts.items(), key=lambda i: -i[1])[:top]:
        lines.append(f"{samples / total * 100:6.1f}  {frame}")
    lines += ["", "incl %  function"]
    for frame, samples in sorted(total_counts.items(), key=lambda i: -i[1])[:top]:
        lines.append(f"{samples / total * 100:6.1f}  {frame}")
    return "\n".join(lines)


def count_syscalls(operations: list[Operation], count: int) -> dict[str, Any]:
    """Count each helper's system calls per operation with strace -c."""
    commands = common.helper_commands()
    table: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-syscalls-") as workdir,
        started_targets(Path(workdir), commands, None) as targets,
    ):
        for op in operations:
            table[op.name] = {
                target.name: _strace_batch(target, op, count) for target in targets
            }
    return table


def _strace_batch(target: Target, operation: Operation, count: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(prefix="strace-", suffix=".txt") as output:
        # -f also counts the calls of the C helper's other threads.
        tracer = subprocess.Popen(
            ["strace", "-f", "-c", "-o", output.name, "-p", str(target.helper.pid)],
            stderr=subprocess.PIPE,
        )
        try:
            _wait_for_attach(tracer)
            target.client.run(operation, count)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        return _parse_strace_summary(Path(output.name).read_text(), count)


def _wait_for_attach(tracer: subprocess.Popen[bytes]) -> None:
    assert tracer.stderr is not None
    line = tracer.stderr.readline()
    if b"attached" not in line:
        raise BenchError(f"strace did not attach: {line.decode(errors='replace')}")


def _parse_strace_summary(text: str, count: int) -> dict[str, float]:
    """Turn strace -c's table into calls per operation, by system call name."""
    calls: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split()
        # Rows: % time, seconds, usecs/call, calls, [errors,] syscall.
        if len(fields) < 5 or not fields[3].isdigit() or fields[-1] == "total":
            continue
        calls[fields[-1]] = int(fields[3]) / count
    return dict(sorted(calls.items(), key=lambda item: -item[1]))


def format_syscalls(table: dict[str, Any]) -> str:
    lines = []
    for name, per_helper in table.items():
        lines.append(name)
        for helper, calls in per_helper.items():
            total = sum(calls.values())
            listed = ", ".join(f"{call} {n:g}" for call, n in calls.items())
            lines.append(f"  {helper:<5} {total:5.1f} per op: {listed}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare request throughput of QEMU's C 9p proxy helper and "
        "ours over one socketpair each. Needs root."
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="measured time for all operations and rounds together, not counting "
        "the calibration that picks batch sizes (default: 120)",
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="rounds per operation (default: 10)"
    )
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="same-cpu",
        help="same-cpu: client and helpers share the last CPU, which shows the "
        "helpers' own cost; split: helpers on the last CPU, client on the first, "
        "which adds a cross-CPU wakeup to every request; free: no pinning "
        "(default: same-cpu)",
    )
    parser.add_argument(
        "--only", action="append", metavar="OP", help="run only this operation"
    )
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument(
        "--profile",
        metavar="OP",
        help="run only OP against ours under cProfile for --seconds and print "
        "where the helper's time goes",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="with --profile: sample with the py-spy at PATH instead of cProfile",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help=f"measure lstat only, with bench/{FLOOR} as a third helper: the "
        "least per-request work a Python helper can do",
    )
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="count each helper's system calls per operation with strace -c",
    )
    parser.add_argument(
        "--top", type=int, default=25, help="functions to list with --profile"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    common.require_root()
    if args.py_spy is not None and not os.access(args.py_spy, os.X_OK):
        sys.exit(f"--py-spy {args.py_spy!r}: not an executable file")
    if args.profile:
        operation = find_operation(args.profile)
        if args.py_spy:
            sample_profile(
                operation, args.seconds, args.top, args.placement, args.py_spy
            )
        else:
            profile(operation, args.seconds, args.top, args.placement)
        return 0
    operations = build_operations()
    if args.only:
        operations = [find_operation(name) for name in args.only]
    if args.floor:
        operations = [find_operation("lstat")]
    if args.syscalls:
        table = count_syscalls(operations, 2000)
        print(format_syscalls(table))
        if args.json:
            common.write_json(args.json, {"benchmark": "syscalls", "calls": table})
        return 0
    data = measure(
        args.seconds, args.rounds, operations, args.placement, floor=args.floor
    )
    print(format_table(data["operations"]))
    for name, memory in data["memory"].items():
        print(f"{name}: peak RSS (VmHWM) {memory['vm_hwm_kib']} KiB")
    if args.json:
        common.write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
