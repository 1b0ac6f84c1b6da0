"""Fixtures shared by the tests: export trees, helper commands, fd leak checks."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import C_HELPER, our_helper  # noqa: E402


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """An empty directory to export, world-traversable as a real export is."""
    root = tmp_path / "export"
    root.mkdir()
    root.chmod(0o755)
    return root


@pytest.fixture
def helper_command() -> list[str]:
    return our_helper()


@pytest.fixture
def c_helper_command() -> list[str]:
    if not os.access(C_HELPER, os.X_OK):
        pytest.fail(f"{C_HELPER} is missing: run scripts/install-deps first")
    return [C_HELPER]


@pytest.fixture(autouse=True)
def no_leaked_descriptors() -> Iterator[None]:
    """Fail any test that leaves descriptors open in the test process."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    after = set(os.listdir("/proc/self/fd"))
    leaked = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in after - before
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not leaked, f"descriptors leaked by the test: {leaked}"
