import pytest
import torch

from hrnetdet.threads import set_num_threads

set_num_threads()  # the CLI's default: one thread per physical core that the load leaves free


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def calibrate():
    """The calibration of random weights (tools/calibrate.py, on pytest's pythonpath)."""
    from calibrate import calibrate
    return calibrate
