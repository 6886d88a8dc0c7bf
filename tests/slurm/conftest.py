"""Slurm tests: a real Slurm (munged, slurmctld, two slurmd) started once per session.

The cluster lives in a scratch folder under /tmp (munged runs as the `munge` user and needs every
folder above its socket to be searchable, which pytest's 0700 tmp folders are not), and is
stopped at the end by PID (see cluster.py). Without Slurm binaries, tests/slurm/install_slurm.sh
is tried once (root + apt-get; set GHMPI_SLURM_INSTALL=0 to never try); if Slurm still cannot run,
every test here is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import (  # noqa: E402
    SlurmClient,
    SlurmCluster,
    SlurmUnavailable,
    missing_binaries,
    pmix_plugin_loadable,
    try_install,
)

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a real Slurm (started by tests/slurm/conftest.py)")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs slurmd as root; not root")
    if (missing_binaries() or not pmix_plugin_loadable()) and os.environ.get("GHMPI_SLURM_INSTALL", "1") != "0":
        detail = try_install()
        if missing_binaries() or not pmix_plugin_loadable():
            pytest.skip(f"Slurm not installed and install_slurm.sh failed: {detail.strip()[-300:]}")
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm binaries missing: {', '.join(missing)} (tests/slurm/install_slurm.sh)")
    root = Path(tempfile.mkdtemp(prefix="ghmpi-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a test Slurm: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(slurm_cluster: SlurmCluster) -> SlurmClient:
    return SlurmClient(slurm_cluster)
