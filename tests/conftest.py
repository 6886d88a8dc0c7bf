"""Fixtures shared by the unit and end-to-end tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture()
def tmpfs(tmp_path: Path):
    """mount(size) -> a fresh tmpfs of that size (e.g. "64k") under tmp_path: a real full
    filesystem for storage-error tests. Root only (skips otherwise); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"fs-{len(mounted)}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                                "tmpfs", str(mnt)], capture_output=True).returncode:
            pytest.skip("needs root to mount a small tmpfs")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
