"""The lesion-model contract (retina_d2/modeling/meta_arch/contract.py): MultiTaskLesionNet runs
any registered class that follows it as its lesion branch, through the contract's calls alone."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_model
from detectron2.utils.events import EventStorage
from torch import nn

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.modeling.meta_arch.contract import is_lesion_branch, lesion_branch_choices
from retina_d2.modeling.meta_arch.semantic_net import padded_semantic_targets, semantic_outputs
from retina_d2.modeling.outputs import (
    GRADES,
    LANDMARKS,
    LESION_PRESENCE,
    SEM_SEG,
    output_types,
    training_targets,
)

INSTANT = (
    Path(__file__).resolve().parents[2]
    / "configs/quick_schedules/multitask_synthetic_instant_test.yaml"
)
BRANCH = "ContractOnlyLesionBranch"
LESIONS = 5


class ContractOnlyLesionBranch(nn.Module):
    """A lesion model that is nothing but the contract: a backbone, a 1x1 convolution of its p2
    features upsampled to lesion logits, a mean-squared loss to the targets."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.classifier = nn.Conv2d(self.backbone.output_shape()["p2"].channels, LESIONS, 1)
        self.calls = []

    @classmethod
    def output_types(cls, cfg):
        return {SEM_SEG}

    @classmethod
    def training_targets(cls, cfg):
        return {SEM_SEG}

    def forward_features(self, batched_inputs, images, features, *, with_losses,
                         with_predictions):
        self.calls.append((with_losses, with_predictions, tuple(images.tensor.shape[-2:])))
        logits = F.interpolate(self.classifier(features["p2"]), size=images.tensor.shape[-2:],
                               mode="bilinear", align_corners=False)
        losses = {}
        if with_losses:
            targets = padded_semantic_targets(batched_inputs, images, logits.device)
            valid = targets != 255
            losses["loss_branch_maps"] = F.mse_loss(
                torch.sigmoid(logits)[valid], targets[valid].float()
            )
        return {"sem_seg": logits}, losses

    def postprocess(self, raw, batched_inputs, image_sizes):
        probs = semantic_outputs(raw["sem_seg"], batched_inputs, image_sizes, "sigmoid")
        return [{"sem_seg": p} for p in probs]


if BRANCH not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(ContractOnlyLesionBranch)


def _cfg(branch=BRANCH):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(INSTANT))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MULTITASK.LESION_ARCHITECTURE = branch
    return cfg


def _inputs(n=2):
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(n):
        sem_seg = torch.zeros((LESIONS, 64, 96), dtype=torch.uint8)
        sem_seg[2, 10:20, 30:50] = 1
        inputs.append({
            "image": torch.randint(0, 256, (3, 64, 96), generator=generator, dtype=torch.uint8),
            "sem_seg": sem_seg, "dr_grade": i, "dme_grade": 0,
            "landmarks": {"optic_disc": (20.0, 30.0), "fovea": (60.0, 32.0)},
        })
    return inputs


def test_the_registered_lesion_models_follow_the_contract():
    choices = lesion_branch_choices()
    assert {"LesionRCNN", "SemanticLesionNet", BRANCH} <= set(choices)
    # Detectron2's own models and the composite itself do not.
    assert not {"GeneralizedRCNN", "SemanticSegmentor", "MultiTaskLesionNet"} & set(choices)
    assert not is_lesion_branch(META_ARCH_REGISTRY.get("MultiTaskLesionNet"))


def test_a_class_of_the_contract_is_a_multitask_lesion_branch():
    cfg = _cfg()
    # The composite asks its branch's class what it outputs and trains on.
    assert output_types(cfg) == {SEM_SEG, LESION_PRESENCE, GRADES, LANDMARKS}
    assert training_targets(cfg) == {SEM_SEG, GRADES, LANDMARKS}
    assert LesionDatasetMapper(cfg, is_train=False).instance_targets is False

    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.lesion_model, ContractOnlyLesionBranch)
    assert model.shared_backbone is model.lesion_model.backbone
    with EventStorage(0):
        losses = model(_inputs())
    assert set(losses) == {"loss_branch_maps", "loss_dr_grade", "loss_dme_grade",
                           "loss_landmarks"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.lesion_model.classifier.weight.grad.abs().sum() > 0
    assert model.lesion_model.calls == [(True, False, (64, 96))]

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": _inputs(1)[0]["image"]}])
    assert model.lesion_model.calls[-1] == (False, True, (64, 96))
    assert out["sem_seg"].shape == (LESIONS, 64, 96)
    # The input is not resized or padded, so the maps in the frame are the network's: lesion
    # presence (Lesion-Net's image-level classification) is their maximum.
    assert torch.allclose(out["lesion_presence"], out["sem_seg"].amax(dim=(-2, -1)))
    for task in ("dr_grade", "dme_grade"):
        assert out[task].sum().item() == pytest.approx(1.0)
    assert set(out["landmarks"]) == {"optic_disc", "fovea"}


def test_a_frozen_contract_branch_takes_no_lesion_targets_and_stays_fixed():
    cfg = _cfg()
    cfg.MODEL.MULTITASK.LESION_FROZEN = True
    assert training_targets(cfg) == {GRADES, LANDMARKS}
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert not model.lesion_model.training
    inputs = _inputs()
    for x in inputs:
        x.pop("sem_seg")  # a frozen branch needs none
    with EventStorage(0):
        losses = model(inputs)
    assert set(losses) == {"loss_dr_grade", "loss_dme_grade", "loss_landmarks"}
    assert model.lesion_model.calls == [(False, False, (64, 96))]


def test_an_unknown_branch_names_the_registered_choices():
    with pytest.raises(ValueError) as error:
        build_model(_cfg("GeneralizedRCNN"))
    message = str(error.value)
    assert "MODEL.MULTITASK.LESION_ARCHITECTURE" in message and "'GeneralizedRCNN'" in message
    for name in ["LesionRCNN", "SemanticLesionNet", BRANCH]:
        assert repr(name) in message
    with pytest.raises(ValueError, match="must be one of"):
        output_types(_cfg("MultiTaskLesionNet"))
