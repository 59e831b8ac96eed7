"""Fixtures only; the helpers the test modules share are in helpers/."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest -n's workers: one thread each, its subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
