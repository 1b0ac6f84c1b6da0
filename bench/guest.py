#!/usr/bin/env python3
"""Wall time of a file workload in a QEMU guest, per 9p backend.

The guest (guest/vm.py: QEMU 7.2 with TCG, the host's kernel, busybox) mounts
a share served by QEMU's C helper, by ours, or by QEMU's own `local` backend
with no helper, which is the upper bound. bench/guest_workload.sh creates
files in nested directories, stats, renames and deletes them, then unpacks
a tarball that the host builds from /usr/share/doc and deletes the result.
It times each phase inside the guest, so boot time is left out. Runs
rotate through the backends, so slow phases of the machine spread over all.
Each helper runs under bench/cpu_time.py, which reports the helper's CPU
time for the whole run: unlike wall time, other load on the machine hardly
changes it.

    .venv/bin/python bench/guest.py --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import common

# common puts the repository root first on sys.path, so this imports the
# guest/ package, not this script.
from guest import vm

BENCH_DIR = Path(__file__).resolve().parent
WORKLOAD = BENCH_DIR / "guest_workload.sh"
CPU_TIME = [sys.executable, str(BENCH_DIR / "cpu_time.py")]
CPU_TIME_RE = re.compile(r"^bench-cpu-time: user=([0-9.]+) system=([0-9.]+)$", re.M)
TAR_SOURCE = Path("/usr/share/doc")
TARBALL = "bench.tar"
PHASES = ("create", "stat", "rename", "delete", "untar", "untar_delete")


def backend_commands() -> dict[str, tuple[list[str], vm.Mode]]:
    """Return each backend's helper command and guest/vm.py mode."""
    commands = common.helper_commands()
    return {
        "c": ([*CPU_TIME, *commands["c"]], "fd"),
        "ours": ([*CPU_TIME, *commands["ours"]], "fd"),
        "local": ([], "local"),
    }


def build_tarball(path: Path, max_files: int, max_file_size: int) -> int:
    """Write a tar of the first `max_files` small files of TAR_SOURCE.

    Directories and symlinks on the way are included too. Return the
    number of members, which is what unpacking creates.
    """
    members = 0
    files = 0
    with tarfile.open(path, "w") as archive:
        for root, dirs, names in os.walk(TAR_SOURCE):
            dirs.sort()
            base = Path(root)
            archive.add(
                base, arcname=str(base.relative_to(TAR_SOURCE.parent)), recursive=False
            )
            members += 1
            for name in sorted(names):
                entry = base / name
                if not entry.is_symlink() and entry.stat().st_size > max_file_size:
                    continue
                archive.add(entry, arcname=str(entry.relative_to(TAR_SOURCE.parent)))
                members += 1
                files += 1
                if files >= max_files:
                    return members
    return members


def workload_script(dirs: int, files: int, entries: int) -> bytes:
    settings = f"dirs={dirs}\nfiles={files}\ntarball={TARBALL}\nentries={entries}\n"
    return settings.encode() + WORKLOAD.read_bytes()


def run_once(
    backend: str, export: Path, tarball: Path, script: bytes, timeout: float
) -> dict[str, Any]:
    """Boot one guest on a fresh export; return its phase times in seconds."""
    command, mode = backend_commands()[backend]
    export.mkdir(mode=0o755)
    shutil.copyfile(tarball, export / TARBALL)
    result = vm.run_guest(command, mode, export, script, timeout=timeout)
    values = result.values()
    if result.status != 0 or result.helper_returncode != 0:
        raise RuntimeError(
            f"{backend}: workload status {result.status}, helper exit code "
            f"{result.helper_returncode}\n{result.stdout}\n{result.helper_stderr}"
        )
    phases = {phase: int(values[f"time_{phase}_cs"]) / 100 for phase in PHASES}
    cpu = CPU_TIME_RE.search(result.helper_stderr)
    return {
        "phases_s": phases,
        "workload_s": sum(phases.values()),
        # Boot and mount included; None in local mode, which has no helper.
        "helper_cpu_s": float(cpu[1]) + float(cpu[2]) if cpu else None,
        "guest_elapsed_s": result.elapsed,
        # Other work on the machine shows up here, not in the guest's clock.
        "loadavg_after": os.getloadavg(),
    }


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    tarball = workdir / TARBALL
    entries = build_tarball(tarball, args.tar_files, args.tar_max_file_size)
    script = workload_script(args.dirs, args.files, entries)
    backends = args.backend or list(backend_commands())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
    for number in range(args.runs):
        # Rotate the order, so no backend always runs first or last in a round.
        shift = number % len(backends)
        for name in backends[shift:] + backends[:shift]:
            export = workdir / f"{name}-{number}"
            run = run_once(name, export, tarball, script, args.timeout)
            print(f"run {number + 1} {name}: workload {run['workload_s']:.2f} s")
            runs[name].append(run)
            shutil.rmtree(export)
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Return the median time of each phase and of the workload, per backend."""
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        summary[name] = {
            phase: statistics.median(r["phases_s"][phase] for r in results)
            for phase in PHASES
        }
        summary[name]["workload"] = statistics.median(r["workload_s"] for r in results)
        cpu = [r["helper_cpu_s"] for r in results if r["helper_cpu_s"] is not None]
        summary[name]["helper_cpu"] = statistics.median(cpu) if cpu else None
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Tabulate median seconds per phase, and C's and local's time over ours."""
    names = list(summary)
    header = f"{'phase':<13}" + "".join(f"{name + ' s':>10}" for name in names)
    has_ratios = "ours" in summary
    if has_ratios:
        header += "".join(
            f"{other + '/ours':>12}" for other in names if other != "ours"
        )
    lines = [header, "-" * len(header)]
    for phase in (*PHASES, "workload", "helper_cpu"):
        line = f"{phase:<13}" + "".join(
            f"{_seconds(summary[n][phase]):>10}" for n in names
        )
        if has_ratios:
            ours = summary["ours"][phase]
            line += "".join(
                f"{_ratio(summary[other][phase], ours):>12}"
                for other in names
                if other != "ours"
            )
        lines.append(line)
    footer = "seconds: median over runs; helper_cpu: the helper's CPU time per run"
    if has_ratios:
        footer += "; X/ours: X's time over ours, so below 1.0 means ours is slower"
    lines.append(footer)
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    return f"{numerator / denominator:.2f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time a file workload in a QEMU guest whose share is served by "
        "QEMU's C 9p proxy helper, by ours, and by QEMU's local backend. Needs root."
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="runs per backend (default: 3)"
    )
    parser.add_argument(
        "--dirs", type=int, default=20, help="directories to create (default: 20)"
    )
    parser.add_argument(
        "--files", type=int, default=100, help="files per directory (default: 100)"
    )
    parser.add_argument(
        "--tar-files",
        type=int,
        default=1000,
        help=f"files from {TAR_SOURCE} in the tarball (default: 1000)",
    )
    parser.add_argument(
        "--tar-max-file-size",
        type=int,
        default=65536,
        help="bytes; larger files are left out of the tarball (default: 65536)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(backend_commands()),
        help="run only this backend; repeat for several (default: all)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds before one guest run is killed (default: 1200)",
    )
    parser.add_argument("--json", type=Path, help="write every number to this file")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    common.require_root()
    machine = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-guest-") as workdir:
        runs = run_all(args, Path(workdir))
    summary = summarize(runs)
    print(format_table(summary))
    if args.json:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        common.write_json(
            args.json,
            {
                "benchmark": "guest",
                "machine": machine,
                "config": config,
                "summary_s": summary,
                "runs": runs,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
