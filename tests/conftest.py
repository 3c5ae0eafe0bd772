import pytest
import torch

from hrnetdet.threads import set_num_threads

set_num_threads()  # the CLI's default: one thread per physical core that the load leaves free


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
