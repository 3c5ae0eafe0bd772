import pytest
import torch

from hrnetdet.threads import set_num_threads

set_num_threads()  # the CLI's default: one thread per physical core that the load leaves free


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def rocket():
    """A real photo (skimage's rocket, every third pixel: 142 x 213), for the parity tests."""
    skimage_data = pytest.importorskip("skimage.data")
    return torch.from_numpy(skimage_data.rocket()[::3, ::3].copy()).permute(2, 0, 1).float() / 255
