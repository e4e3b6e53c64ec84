"""MultiTaskLesionNet on tiny synthetic eyes: training lowers every task's loss, missing grades and
landmarks are masked out, one inference pass gives every output in the original frame, a frozen
lesion branch stays as loaded, and every multi-task config builds."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.data.converters import ConvertOptions, synthetic
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.data.preprocess import FieldOfViewCrop
from retina_d2.data.register import load_lesion_json
from retina_d2.modeling.inference import build_inference_model
from retina_d2.modeling.meta_arch.multitask import MultiTaskLesionNet, load_lesion_weights
from retina_d2.modeling.meta_arch.semantic_net import SemanticLesionNet

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
INSTANT = CONFIGS / "quick_schedules" / "multitask_synthetic_instant_test.yaml"
SIZE = 128
LESIONS = ["microaneurysm", "haemorrhage", "hard exudate", "soft exudate", "optic disc"]


def _cfg(path=INSTANT, *opts):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask") / "synthetic"
    synthetic.convert(None, root, ConvertOptions(progress=False), count=4, size=SIZE)
    manifest_root = root / "raw"
    return load_lesion_json(str(root / "train.json"), str(manifest_root))


def _train_batch(records, n=2, size=SIZE):
    """Mapped training inputs without random augmentation: the same batch every step."""
    mapper = LesionDatasetMapper(
        is_train=True, augmentations=[T.ResizeShortestEdge(size, size)], image_format="RGB",
        semantic_classes=LESIONS, landmark_targets=True,
    )
    return [mapper(r) for r in records[:n]]


def test_training_lowers_every_tasks_loss(records):
    torch.manual_seed(0)
    model = build_model(_cfg())
    batch = _train_batch(records, size=96)
    assert all("dr_grade" in x and "optic_disc" in x["landmarks"] for x in batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    with EventStorage(0):
        for _ in range(8):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
    tasks = {
        "lesions": [k for k in history[0] if k not in ("loss_dr_grade", "loss_dme_grade",
                                                       "loss_landmarks")],
        "dr_grade": ["loss_dr_grade"],
        "dme_grade": ["loss_dme_grade"],
        "landmarks": ["loss_landmarks"],
    }
    assert {"loss_cls", "loss_mask", "loss_rpn_cls", "loss_sem_seg_dice"} <= set(tasks["lesions"])
    for task, keys in tasks.items():
        per_step = [sum(h[k] for k in keys) for h in history]
        first, last = sum(per_step[:3]) / 3, sum(per_step[-3:]) / 3
        assert last < 0.95 * first, (task, per_step)


def test_missing_grades_and_landmarks_are_masked_not_zero(records):
    torch.manual_seed(0)
    model = build_model(_cfg())
    batch = _train_batch(records)
    del batch[0]["dr_grade"]
    batch[0]["landmarks"] = {}  # e.g. both cropped away
    batch[1]["landmarks"].pop("fovea")
    captured = {}
    model.grading_heads["dr_grade"].register_forward_hook(
        lambda module, args, out: captured.update(dr=out)
    )
    model.landmark_head.register_forward_hook(lambda module, args, out: captured.update(heat=out))
    with EventStorage(0):
        losses = model(batch)
    grade = torch.tensor([records[1]["dr_grade"]])
    assert losses["loss_dr_grade"].item() == pytest.approx(
        F.cross_entropy(captured["dr"][1:2], grade).item(), rel=1e-5
    )
    grads = torch.autograd.grad(losses["loss_landmarks"], captured["heat"])[0]
    assert grads[0].abs().sum() == 0  # image 0: no landmark
    assert grads[1, 1].abs().sum() == 0 and grads[1, 0].abs().sum() > 0  # image 1: disc only


def test_one_inference_pass_gives_every_output_in_the_original_frame(records):
    cfg = _cfg()
    model = build_model(cfg).eval()
    record = dict(records[0])
    mapper = LesionDatasetMapper(
        is_train=False, augmentations=[FieldOfViewCrop(20), T.ResizeShortestEdge(96, 96)],
        image_format="RGB",
    )
    inputs = mapper(record)
    assert "fov_box" in inputs
    with torch.no_grad():
        (out,) = model([inputs])
    height, width = record["height"], record["width"]
    assert out["instances"].image_size == (height, width)
    assert out["sem_seg"].shape == (5, height, width)
    assert out["lesion_presence"].shape == (5,) and out["lesion_presence"].max() <= 1
    assert out["dr_grade"].shape == (5,) and out["dr_grade"].sum().item() == pytest.approx(1)
    assert out["dme_grade"].shape == (3,)
    x0, y0, x1, y1 = inputs["fov_box"]
    for name in ("optic_disc", "fovea"):
        x, y = out["landmarks"][name]
        assert x0 <= x <= x1 and y0 <= y <= y1  # mapped back through the crop
        assert 0 < out["landmark_scores"][name] <= 1


def test_frozen_lesion_branch_takes_no_targets_and_does_not_move(records):
    cfg = _cfg(INSTANT, "MODEL.MULTITASK.LESION_FROZEN", "True")
    assert cfg.MODEL.MULTITASK.TASK_BACKBONE  # the grading CNN trains beside the frozen branch
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    assert not model.lesion_model.training and model.task_backbone.training
    mapper_args = LesionDatasetMapper.from_config(cfg, is_train=True)
    assert not mapper_args["instance_targets"] and mapper_args["semantic_classes"] is None
    assert mapper_args["landmark_targets"]
    batch = _train_batch(records)
    for x in batch:
        x.pop("sem_seg")
    before = {k: v.clone() for k, v in model.lesion_model.state_dict().items()}
    task_before = next(model.task_backbone.parameters()).clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_dr_grade", "loss_dme_grade", "loss_landmarks"}
    sum(losses.values()).backward()
    optimizer.step()
    after = model.lesion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(task_before, next(model.task_backbone.parameters()))


def test_lesion_weights_load_into_the_branch(tmp_path):
    cfg = _cfg(CONFIGS / "multitask_heimed.yaml")
    lesion_cfg = cfg.clone()
    lesion_cfg.MODEL.META_ARCHITECTURE = "SemanticLesionNet"
    torch.manual_seed(1)
    lesion_only = SemanticLesionNet(lesion_cfg)
    path = tmp_path / "lesion.pth"
    torch.save({"model": lesion_only.state_dict(), "iteration": 5}, path)
    cfg.MODEL.MULTITASK.LESION_WEIGHTS = str(path)
    model = build_model(cfg)
    expected = lesion_only.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.lesion_model.state_dict().items())
    # A MultiTaskLesionNet checkpoint works too: its branch's keys lose the prefix.
    prefixed = tmp_path / "multitask.pth"
    torch.save({"model": model.state_dict()}, prefixed)
    other = SemanticLesionNet(lesion_cfg)
    load_lesion_weights(other, str(prefixed))
    assert torch.equal(other.state_dict()["sem_seg_head.predictor.weight"],
                       expected["sem_seg_head.predictor.weight"])
    torch.save({"model": {"unrelated.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="none of its weights fits"):
        load_lesion_weights(other, str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="LESION_WEIGHTS"):
        load_lesion_weights(other, str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(
    "config", ["multitask_heimed.yaml", "multitask_idrid.yaml", "multitask_retinal_lesions.yaml",
               "multitask_synthetic.yaml"],
)
def test_every_multitask_config_builds_and_runs(config):
    cfg = _cfg(CONFIGS / config, "MODEL.MULTITASK.LESION_WEIGHTS", "")
    model = build_model(cfg)
    assert isinstance(model, MultiTaskLesionNet)
    assert list(model.grading_heads) == list(cfg.MODEL.GRADING.TASKS)
    if cfg.MODEL.MULTITASK.LESION_FROZEN:
        assert not any(p.requires_grad for p in model.lesion_model.parameters())
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.zeros(3, 64, 96, dtype=torch.uint8)}])
    assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 64, 96)
    assert out["lesion_presence"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,)
    for task in cfg.MODEL.GRADING.TASKS:
        assert out[task].sum().item() == pytest.approx(1.0)
    assert sorted(out.get("landmarks", {})) == sorted(cfg.MODEL.LOCALIZATION.LANDMARKS)


def test_grading_without_lesion_maps_needs_the_plain_head():
    base = ["MODEL.MULTITASK.LESION_ARCHITECTURE", "", "MODEL.BACKBONE.NAME",
            "build_lesion_resnet_backbone", "MODEL.GRADING.IN_FEATURE", "res5",
            "MODEL.LOCALIZATION.IN_FEATURES", "['res3']"]
    with pytest.raises(ValueError, match="read lesion maps"):
        build_model(_cfg(INSTANT, *base))
    model = build_model(_cfg(INSTANT, *base, "MODEL.GRADING.NAME", "PlainGradingHead"))
    assert model.lesion_model is None and model.backbone is not None
    with pytest.raises(ValueError, match="LESION_ARCHITECTURE"):
        build_model(_cfg(INSTANT, "MODEL.MULTITASK.LESION_ARCHITECTURE", "GeneralizedRCNN"))


def test_without_lesion_maps_presence_is_the_best_instance_score_per_class(records):
    cfg = _cfg(INSTANT, "MODEL.LESION_SEG.ENABLED", "False", "MODEL.GRADING.NAME",
               "PlainGradingHead", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mapper = LesionDatasetMapper(
        is_train=False, augmentations=[T.ResizeShortestEdge(96, 96)], image_format="RGB"
    )
    with torch.no_grad():
        (out,) = model([mapper(dict(records[0]))])
    instances = out["instances"]
    assert len(instances) > 0 and "sem_seg" not in out
    expected = torch.zeros(5)
    for c, s in zip(instances.pred_classes.tolist(), instances.scores.tolist()):
        expected[c] = max(expected[c], s)
    assert torch.allclose(out["lesion_presence"], expected)


def test_lesion_merge_applies_to_the_detector_branch(records):
    # MODEL.LESION_MERGE, the inference pipeline's last step, as for a lone LesionRCNN: touching
    # confident masks of one class become one lesion, so the merged lesions of a class are
    # disjoint; without it random weights' masks overlap.
    opts = ("MODEL.LESION_SEG.ENABLED", "False", "MODEL.GRADING.NAME", "PlainGradingHead",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.LESION_MERGE.SCORE_THRESH", "0.0")
    mapper = LesionDatasetMapper(
        is_train=False, augmentations=[T.ResizeShortestEdge(96, 96)], image_format="RGB"
    )
    inputs = mapper(dict(records[0]))

    def overlapping_pairs(merge: bool):
        torch.manual_seed(0)
        cfg = _cfg(INSTANT, *opts, "MODEL.LESION_MERGE.ENABLED", str(merge))
        model = build_inference_model(cfg, build_model(cfg)).eval()
        with torch.no_grad():
            instances = model([inputs])[0]["instances"]
        pairs = 0
        for cls in instances.pred_classes.unique():
            masks = instances.pred_masks[instances.pred_classes == cls].flatten(1).int()
            shared = masks @ masks.T
            pairs += int((shared - torch.diag(shared.diagonal())).gt(0).sum()) // 2
        return len(instances), pairs

    unmerged, merged = overlapping_pairs(False), overlapping_pairs(True)
    assert unmerged[1] > 0 and merged[0] > 0 and merged[1] == 0
