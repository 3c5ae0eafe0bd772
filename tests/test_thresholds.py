"""The score-threshold override that prediction and export share."""
import pytest
import torch

import hrnetdet
from hrnetdet.inference import score_threshold

SMALL = dict(min_size=64, max_size=96)


def test_override_sets_every_head_and_restores_it_even_on_error():
    with torch.device("meta"):
        cascade = hrnetdet.create_model("cascade_rcnn_hrnetv2p_w18", box_score_thresh=0.3)
        fcos = hrnetdet.create_model("fcos_hrnetv2p_w18")
    stages = list(cascade.roi_heads.stages)
    cascade.rpn.score_thresh = 0.25
    with score_threshold(cascade, 0.0):
        assert [s.score_thresh for s in stages] == [0.0, 0.0, 0.0]
        assert cascade.rpn.score_thresh == 0.25  # the RPN's own, untouched
    assert [s.score_thresh for s in stages] == [0.3, 0.3, 0.3]
    with pytest.raises(RuntimeError, match="boom"):
        with score_threshold(fcos, 0.5):
            assert fcos.head.score_thresh == 0.5
            raise RuntimeError("boom")
    assert fcos.head.score_thresh == 0.05
    with score_threshold(fcos, None):
        assert fcos.head.score_thresh == 0.05
    with pytest.raises(ValueError, match="no module with a score_thresh"):
        with score_threshold(torch.nn.Linear(2, 2), 0.1):
            pass


def test_predict_uses_the_override_and_restores_the_threshold():
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", box_score_thresh=0.9, **SMALL).eval()
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.5)
    image = torch.rand(3, 64, 80)
    low = hrnetdet.predict(model, image, score_thresh=0.0)
    assert model.roi_heads.score_thresh == 0.9
    with torch.no_grad():
        default = model([image])[0]
    assert len(low["scores"]) > len(default["scores"])
    assert (low["scores"] >= 0).all() and (default["scores"] > 0.9).all()
