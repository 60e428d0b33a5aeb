import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


def pytest_configure(config):
    # Under pytest-xdist (`.ci/run` runs `-n 2` on 2 cores) each worker computes on one thread, and so do the
    # processes a test starts (bundle runs, notebooks): two workers of two OpenMP threads each on two cores spin
    # against each other and run the suite several times slower. A plain `pytest` run keeps two threads.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(2)
