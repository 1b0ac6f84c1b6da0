#!/usr/bin/env python3
"""Start-up latency and memory of QEMU's C helper and ours.

Start-up: the time from spawning a helper in --fd mode to receiving the
reply to its first LSTAT, which covers interpreter start, imports,
entering the export (mount namespace or chroot) and the capability drop.
The runs alternate between the helpers, each on a fresh export. Ours runs
twice: as the environment has it, and with its bytecode cached in a
temporary PYTHONPYCACHEPREFIX, as after `pip install` of a wheel. The two
differ where PYTHONDONTWRITEBYTECODE is set and the source tree has no
__pycache__, because then every start compiles the helper's modules again.

Memory: VmHWM (peak resident set) of each helper right after its first
reply, and again after the protocol benchmark's load, read from
/proc/PID/status before the connection closes.

    .venv/bin/python bench/startup.py --runs 20 --load-seconds 30 --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import common
import protocol as protocol_bench

from harness import running_helper
from virtfs_proxy_helper import protocol as wire

_FIRST_REQUEST = wire.encode_request(wire.Lstat(b"/\0"))


def time_first_reply(command: list[str], export: Path) -> tuple[float, int]:
    """Spawn a helper, send one LSTAT; return (seconds to reply, VmHWM KiB)."""
    start = time.perf_counter()
    with running_helper(command, export) as helper:
        protocol_bench.RawClient(helper.client.sock).call_frame(_FIRST_REQUEST)
        elapsed = time.perf_counter() - start
        peak = common.kib(helper.status()["VmHWM"])
    return elapsed, peak


@contextmanager
def environment(changes: dict[str, str | None]) -> Iterator[None]:
    """Apply `changes` to os.environ, which helpers inherit; None unsets."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            _set_variable(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_variable(name, value)


def _set_variable(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def bytecode_cache(cache: Path, command: list[str]) -> dict[str, str | None]:
    """Fill `cache` with bytecode of what `command` imports; return its env.

    --version imports every module that serving needs, because cli.py
    imports them at the top.
    """
    env = {"PYTHONPYCACHEPREFIX": str(cache), "PYTHONDONTWRITEBYTECODE": None}
    with environment(env):
        subprocess.run([*command, "--version"], check=True, capture_output=True)
    return env


def measure_startup(runs: int) -> dict[str, Any]:
    """Time `runs` start-ups of each helper, alternating between them."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as workdir:
        commands = common.helper_commands()
        variants: dict[str, tuple[list[str], dict[str, str | None]]] = {
            "c": (commands["c"], {}),
            "ours": (commands["ours"], {}),
            "ours-pyc": (
                commands["ours"],
                bytecode_cache(Path(workdir) / "pycache", commands["ours"]),
            ),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        peaks: dict[str, list[int]] = {name: [] for name in variants}
        for number in range(runs):
            for name, (command, env) in variants.items():
                export = common.make_export(Path(workdir) / f"{name}-{number}")
                with environment(env):
                    elapsed, peak = time_first_reply(command, export)
                samples[name].append(elapsed)
                peaks[name].append(peak)
    return {
        name: {
            "first_reply_s_median": statistics.median(samples[name]),
            "first_reply_s_min": min(samples[name]),
            "first_reply_s_max": max(samples[name]),
            "first_reply_s_runs": samples[name],
            "vm_hwm_kib_after_first_reply": max(peaks[name]),
        }
        for name in variants
    }


def measure_loaded_memory(seconds: float) -> dict[str, Any]:
    """Run the protocol benchmark's operations; return each helper's VmHWM."""
    operations = protocol_bench.build_operations()
    data = protocol_bench.measure(seconds, 2, operations, "same-cpu")
    return data["memory"]


def format_report(startup: dict[str, Any], memory: dict[str, Any]) -> str:
    lines = [
        f"{'helper':<8} {'first reply ms':>15} {'min-max ms':>13} "
        f"{'VmHWM idle KiB':>15} {'VmHWM loaded KiB':>17}"
    ]
    for name, result in startup.items():
        spread = (
            f"{result['first_reply_s_min'] * 1e3:.1f}-"
            f"{result['first_reply_s_max'] * 1e3:.1f}"
        )
        lines.append(
            f"{name:<8} {result['first_reply_s_median'] * 1e3:>15.1f} {spread:>13} "
            f"{result['vm_hwm_kib_after_first_reply']:>15} "
            f"{memory[name]['vm_hwm_kib'] if name in memory else '':>17}"
        )
    lines.append(
        "first reply: median from spawn to the first LSTAT reply; VmHWM: peak "
        "resident set; ours-pyc: ours with cached bytecode, start-up only"
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure start-up time to the first reply and peak memory of "
        "QEMU's C 9p proxy helper and ours. Needs root."
    )
    parser.add_argument(
        "--runs", type=int, default=20, help="start-ups per helper (default: 20)"
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=30.0,
        help="measured seconds of protocol load before reading VmHWM (default: 30)",
    )
    parser.add_argument("--json", type=Path, help="write every number to this file")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    common.require_root()
    machine = common.machine_info()
    startup = measure_startup(args.runs)
    memory = measure_loaded_memory(args.load_seconds)
    print(format_report(startup, memory))
    if args.json:
        common.write_json(
            args.json,
            {
                "benchmark": "startup",
                "machine": machine,
                "config": {"runs": args.runs, "load_seconds": args.load_seconds},
                "startup": startup,
                "memory_after_load": memory,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
