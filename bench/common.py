"""Shared pieces of the benchmarks: paths, helper commands, export trees, JSON.

The benchmark scripts run as `.venv/bin/python bench/NAME.py`, so this
directory is first on sys.path and they import this module by name.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
# tests/harness.py starts helpers exactly as the tests do, and guest/ boots QEMU.
sys.path.insert(0, str(REPO_DIR / "tests"))
sys.path.insert(0, str(REPO_DIR))

import virtfs_proxy_helper  # noqa: E402
from harness import C_HELPER, our_helper  # noqa: E402

XATTR_NAME = b"user.bench"
XATTR_VALUE = b"x" * 64


def helper_commands() -> dict[str, list[str]]:
    """Return the command of each helper under test, C first."""
    return {"c": [C_HELPER], "ours": our_helper()}


def require_root() -> None:
    """Exit with a message unless running as root, which both helpers need."""
    if os.geteuid() != 0:
        sys.exit(f"{Path(sys.argv[0]).name}: run as root: the helpers chroot")
    if not os.access(C_HELPER, os.X_OK):
        sys.exit(f"{C_HELPER} not found: run scripts/install-deps")


def make_export(root: Path) -> Path:
    """Create an export tree at `root` with the objects the benchmarks touch.

    "file" carries a user xattr, "link" points to it, and "work" is where
    objects get created and removed.
    """
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    (root / "file").write_bytes(b"benchmark data\n")
    os.setxattr(root / "file", XATTR_NAME, XATTR_VALUE)
    os.symlink("file", root / "link")
    (root / "dir").mkdir()
    work = root / "work"
    work.mkdir()
    # Mode 0777 so that objects created as uid 1000 do not need the
    # helper's CAP_DAC_OVERRIDE to get in.
    work.chmod(0o777)
    return root


def machine_info() -> dict[str, Any]:
    """Return what the numbers depend on: CPUs, kernel, Python, QEMU helper."""
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "c_helper": C_HELPER,
        "ours": our_helper(),
        "loadavg_at_start": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source_version(),
    }


def source_version() -> dict[str, Any]:
    """Return where the helper's code comes from: the checkout's commit, the
    files of src/ that differ from it, and the imported package's path, which
    points elsewhere when PYTHONPATH selects another copy."""
    module = Path(virtfs_proxy_helper.__file__).resolve()
    version: dict[str, Any] = {
        "module": str(module),
        "pythonpath": os.environ.get("PYTHONPATH"),
    }
    if not module.is_relative_to(REPO_DIR / "src"):
        # The checkout's commit says nothing about a copy elsewhere.
        version["commit"] = None
        return version
    try:
        version["commit"] = _git("rev-parse", "HEAD").strip()
        version["src_changed_files"] = _git(
            "status", "--porcelain", "--", "src"
        ).splitlines()
    except (OSError, subprocess.CalledProcessError):
        version["commit"] = None
    return version


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO_DIR), *args], check=True, capture_output=True, text=True
    ).stdout


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def kib(field: str) -> int:
    """Parse a /proc/PID/status size such as "12345 kB" into KiB."""
    number, _, unit = field.partition(" ")
    if unit != "kB":
        raise ValueError(f"unexpected unit in status field {field!r}")
    return int(number)
