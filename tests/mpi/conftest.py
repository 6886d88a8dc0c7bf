"""pytest-mpi: a failing test on one rank aborts the world instead of hanging the others."""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.config.getoption("--with-mpi", default=False):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            print(f"\nrank {MPI.COMM_WORLD.Get_rank()}: {item.nodeid} failed; aborting the world",
                  flush=True)
            print(report.longreprtext, flush=True)
            MPI.COMM_WORLD.Abort(1)
