import os

import numpy as np
import pytest
import torch

from hrnetdet.threads import default_num_threads, set_num_threads

# the CLI's default (one thread per physical core that the load leaves free), shared among the
# processes of a parallel run (pytest -n N): never more threads than cores
set_num_threads(max(1, default_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def rocket():
    """A real photo (skimage's rocket, every third pixel: 142 x 213), for the parity tests."""
    skimage_data = pytest.importorskip("skimage.data")
    return torch.from_numpy(skimage_data.rocket()[::3, ::3].copy()).permute(2, 0, 1).float() / 255


# --- a small calibrated Mask R-CNN for the predict tests (test_predict.py, test_predict_run.py) ---

PREDICT_ARCH = "mask_rcnn_hrnetv2p_w18"
PREDICT_SMALL = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)  # blocky, so calibration sees structure
    return np.kron(base, np.ones((12, 12, 1), dtype=np.uint8))  # 72 x 108


@pytest.fixture(scope="module")
def model(rgb):
    import hrnetdet
    from calibrate import calibrate
    from hrnetdet.inference import load_image
    torch.manual_seed(0)
    return calibrate(hrnetdet.create_model(PREDICT_ARCH, **PREDICT_SMALL), [load_image(rgb)])


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    """The calibrated model saved as hrnetdet safetensors, for ``hrnetdet predict --checkpoint``."""
    from hrnetdet.zoo.checkpoint import save_pretrained
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, str(folder))
    return folder / "model.safetensors"
