import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def calibrate():
    """The calibration of random weights (``hrnetdet.inference.calibrate``), imported here only."""
    from hrnetdet.inference.calibrate import calibrate
    return calibrate
