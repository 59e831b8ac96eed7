"""Fixtures only; the helpers the test modules share are in helpers/."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest -n's workers: one thread each, its subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
# pytest -n's controller runs no test: it starts its workers without importing torch (3 to 4 s)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
