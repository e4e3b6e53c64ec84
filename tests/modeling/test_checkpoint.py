"""Weights from local files only: Detectron2 .pkl, torchvision ResNet .pth, and a clear error."""
import pickle

import pytest
import torch
import torchvision
from detectron2.modeling import build_model

import retina_d2.modeling  # noqa: F401
from retina_d2.config import get_retina_cfg
from retina_d2.modeling import LesionCheckpointer


def _model(width=64):
    cfg = get_retina_cfg()
    cfg.merge_from_file("configs/maskrcnn_synthetic.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.LESION_RESNET.STEM_OUT_CHANNELS = width
    cfg.MODEL.LESION_RESNET.RES2_OUT_CHANNELS = width
    return build_model(cfg)


def test_torchvision_resnet18_weights_load_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = _model()
    LesionCheckpointer(model).load(str(path))
    trunk = model.backbone.bottom_up
    assert torch.equal(trunk.stem.conv1.weight, resnet.conv1.weight)
    assert torch.equal(trunk.res3[0].conv2.weight, resnet.layer2[0].conv2.weight)
    assert torch.equal(trunk.res4[0].shortcut.weight, resnet.layer3[0].downsample[0].weight)
    # GN affine parameters take BN's weight and bias.
    assert torch.equal(trunk.res5[1].conv1.norm.weight, resnet.layer4[1].bn1.weight)


def test_detectron2_pkl_round_trip(tmp_path):
    torch.manual_seed(1)
    source = _model()
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": {k: v.numpy() for k, v in source.state_dict().items()}, "__author__": "test"}, f
        )
    target = _model()
    LesionCheckpointer(target).load(str(path))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS.*no such file"):
        LesionCheckpointer(_model()).load(str(tmp_path / "nope.pth"))
