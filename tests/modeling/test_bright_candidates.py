"""Bright candidates and BrightCandidateNet (retina_d2/modeling/bright_lesions.py,
retina_d2/modeling/meta_arch/candidate_net.py): hand-worked candidate labels, features that do
not depend on the photograph's resolution, a model whose map holds exactly its candidates scored
by its classifier in the photograph's frame, and the recipe's config training 10 CPU iterations
with a falling loss."""
import math

import cv2
import numpy as np
import pytest
import torch

from retina_d2.modeling.bright_lesions import (
    FEATURE_NAMES,
    BrightLesionParams,
    bright_lesion_candidates,
    bright_lesion_maps,
    candidate_features,
)
from retina_d2.modeling.meta_arch.candidate_net import BrightCandidateNet, candidate_targets
from retina_d2.modeling.components import lesion_components

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "exudate_candidates_heimed_cpu.yaml"


def _eye(size: int) -> np.ndarray:
    """A synthetic fundus at ``size`` px: an orange disc of retina on black, a brighter optic
    disc, and bright yellow spots placed at fixed fractions of the size (so the same eye at two
    resolutions has the same lesions, scaled)."""
    image = np.zeros((size, size, 3), np.uint8)
    centre = size / 2
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx + 0.5 - centre, yy + 0.5 - centre)
    inside = r < 0.48 * size
    image[inside] = (150, 70, 30)
    disc = np.hypot(xx + 0.5 - 0.3 * size, yy + 0.5 - 0.5 * size) < 0.07 * size
    image[disc] = (250, 220, 160)
    for fx, fy, fr in ((0.6, 0.4, 0.012), (0.65, 0.62, 0.008), (0.45, 0.7, 0.016)):
        spot = np.hypot(xx + 0.5 - fx * size, yy + 0.5 - fy * size) < fr * size
        image[spot] = (230, 200, 60)
    return image


def test_candidates_are_the_bright_spots_and_the_disc_is_blanked():
    image = _eye(600)
    labels, candidates = bright_lesion_candidates(image)
    assert len(candidates) == 3
    centres = sorted(((x0 + x1) / 2 / 600, (y0 + y1) / 2 / 600) for _, (x0, y0, x1, y1), _ in candidates)
    assert np.allclose(centres, [(0.45, 0.7), (0.6, 0.4), (0.65, 0.62)], atol=0.01)
    # Components under the minimum area keep no label: the map holds only the candidates.
    assert set(np.unique(labels)) == {0} | {c[0] for c in candidates}


def test_small_components_are_dropped_from_the_label_map():
    image = _eye(600)
    image[100, 300] = (255, 255, 200)  # one bright pixel
    labels, candidates = bright_lesion_candidates(image)
    # At this FOV (~580 px) the minimum area (6 px at 2000 px) is under a pixel: it is a candidate.
    assert labels[100, 300] > 0 and len(candidates) == 4
    # 40 px at 2000 px is ~3 px here: the pixel is dropped, from the list and from the map.
    labels, candidates = bright_lesion_candidates(image, BrightLesionParams(min_area=40))
    assert labels[100, 300] == 0 and len(candidates) == 3


def test_features_do_not_depend_on_the_resolution():
    rows = []
    for size in (600, 1200):
        image = _eye(size)
        maps = bright_lesion_maps(image)
        labels, candidates = bright_lesion_candidates(image, maps=maps)
        features = candidate_features(image, labels, candidates, maps)
        assert features.shape == (3, len(FEATURE_NAMES)) and np.isfinite(features).all()
        # Order the rows by position so the same spot lines up at both sizes.
        order = np.argsort([c[1][0] + 10 * c[1][1] for c in candidates])
        rows.append(features[order])
    small, large = rows
    column = {name: i for i, name in enumerate(FEATURE_NAMES)}
    for name, tolerance in (("log_area", 0.15), ("fill", 0.1),  # a 5 px circle fills its box unlike a 10 px one
                            ("disc_distance", 0.01),
                            ("center_distance", 0.01), ("green", 0.02), ("red_surround", 0.03),
                            ("green_contrast_max", 0.1), ("log_candidates", 1e-6)):
        assert np.allclose(small[:, column[name]], large[:, column[name]], atol=tolerance), name


def test_log_area_and_fill_by_hand():
    image = np.zeros((400, 400, 3), np.uint8)
    cv2.circle(image, (200, 200), 190, (150, 70, 30), -1)
    cv2.circle(image, (300, 150), 25, (250, 220, 160), -1)  # the optic disc, blanked
    image[250:256, 120:130] = (240, 210, 60)  # a 6 x 10 block: area 60, fills its box
    maps = bright_lesion_maps(image)
    labels, candidates = bright_lesion_candidates(image, maps=maps)
    block = [c for c in candidates if c[1] == [120, 250, 130, 256]]
    assert len(block) == 1
    features = candidate_features(image, labels, block, maps)[0]
    names = list(FEATURE_NAMES)
    assert features[names.index("log_area")] == pytest.approx(
        math.log(60 * (2000 / maps.diameter) ** 2), rel=1e-5)
    assert features[names.index("fill")] == pytest.approx(1.0)
    assert features[names.index("log_aspect")] == pytest.approx(math.log(6 / 10), rel=1e-5)


def test_candidate_targets_by_hand():
    labels = np.zeros((10, 20), np.int32)
    labels[1:3, 1:5] = 1  # 8 px; GT lesion A covers 4 of them + 4 more -> IoU 4 / 12
    labels[6:8, 1:3] = 2  # 4 px, no lesion: a negative
    labels[1:3, 10:14] = 3  # 8 px, 6 in the ignore region: trains nothing
    labels[6:9, 10:13] = 4  # 9 px, all ignored but it matches lesion B fully: still a lesion
    target = np.zeros((10, 20), np.uint8)
    target[1:3, 3:7] = 1  # lesion A: 8 px
    target[1:3, 12:16] = 255
    target[0:3, 10:12] = 255
    target[6:9, 10:13] = 1  # lesion B
    target[5, 9:14] = 255  # an ignore band touching B (not part of the lesion)
    index = np.array([1, 2, 3, 4])
    is_lesion, trains = candidate_targets(labels, index, target, positive_iou=0.3)
    assert is_lesion.tolist() == [True, False, False, True]  # 4/12 = 0.33 >= 0.3
    assert trains.tolist() == [True, True, False, True]
    is_lesion, _ = candidate_targets(labels, index, target, positive_iou=0.34)
    assert is_lesion.tolist() == [False, False, False, True]


def _model(**kwargs) -> BrightCandidateNet:
    torch.manual_seed(0)
    return BrightCandidateNet(params=BrightLesionParams(), num_classes=5, lesion_channel=2, **kwargs)


def test_inference_map_holds_the_candidates_with_the_classifier_scores():
    model = _model().eval()
    image = _eye(400)
    # The mapper cropped the FOV [40, 20, 440, 420] of a 460 x 500 photograph and kept 400 px.
    inputs = {"image": torch.from_numpy(image).permute(2, 0, 1).float(), "height": 460,
              "width": 500, "fov_box": [40, 20, 440, 420]}
    probs = model([inputs])[0]["sem_seg"]
    assert probs.shape == (5, 460, 500)
    assert probs[[0, 1, 3, 4]].abs().sum() == 0  # only the lesion channel is scored
    labels, candidates = bright_lesion_candidates(image)
    maps = bright_lesion_maps(image)
    features = torch.from_numpy(candidate_features(image, labels, candidates, maps))
    with torch.no_grad():
        expected = torch.sigmoid(model.classifier(features)[:, 0]).numpy()
    _, lesions = lesion_components(probs, 1e-6, channels=[2])
    # One lesion per candidate, each at its place in the photograph with its own score.
    assert sorted(round(c.score, 5) for c in lesions) == sorted(round(float(s), 5) for s in expected)
    for (_, (x0, y0, x1, y1), _), score in zip(candidates, expected):
        assert probs[2, 20 + (y0 + y1) // 2, 40 + (x0 + x1) // 2] == pytest.approx(float(score))
    assert probs[2, :20].abs().sum() == 0 and probs[2, :, :40].abs().sum() == 0


def test_bgr_input_gives_the_same_map():
    image = _eye(300)
    rgb = {"image": torch.from_numpy(image).permute(2, 0, 1).float()}
    bgr = {"image": torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).permute(2, 0, 1).float()}
    a = _model().eval()([rgb])[0]["sem_seg"]
    b = _model(input_format="BGR").eval()([bgr])[0]["sem_seg"]
    assert torch.equal(a, b)


def test_training_input_without_semantic_target_names_the_file():
    model = _model().train()
    inputs = {"image": torch.from_numpy(_eye(300)).permute(2, 0, 1).float(), "file_name": "eye.jpg"}
    with pytest.raises(ValueError, match="eye.jpg: no 'sem_seg' target"):
        model([inputs])


def test_bad_lesion_channel_is_refused():
    with pytest.raises(ValueError, match="lesion_channel 5"):
        BrightCandidateNet(params=BrightLesionParams(), num_classes=5, lesion_channel=5)


def test_recipe_trains_ten_iterations_and_its_loss_falls(tmp_path, monkeypatch):
    from retina_d2.data.converters import ConvertOptions, synthetic
    from retina_d2.engine.trainer import LesionTrainer, setup_cfg

    datasets = tmp_path / "datasets"
    synthetic.convert(None, datasets / "synthetic", ConvertOptions(progress=False), count=4, size=256)
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    cfg = setup_cfg(str(CONFIG), [
        "DATASETS.TRAIN", "('synthetic_seg_train',)", "DATASETS.TEST", "()",
        "RETINA.PREPROCESS.FOV_DIAMETER", "256", "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "3", "OUTPUT_DIR", str(tmp_path / "run"),
    ])
    assert cfg.MODEL.META_ARCHITECTURE == "BrightCandidateNet"
    trainer = LesionTrainer(cfg)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_export_refuses_it_by_name():
    # Its candidates are NumPy work on the CPU, not a traceable graph: export says so.
    from retina_d2.config import get_retina_cfg
    from retina_d2.export import ExportError, check_exportable

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIG))
    with pytest.raises(ExportError, match="BrightCandidateNet: not exported"):
        check_exportable(cfg)


def test_the_recipe_model_has_737_parameters_and_a_black_frame_has_no_candidate():
    # The config's comment: 21 features -> 32 hidden -> 1 (weights and biases).
    from detectron2.modeling import build_model

    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == 737
    black = {"image": torch.zeros(3, 64, 80)}
    probs = model([black])[0]["sem_seg"]
    assert probs.shape == (5, 64, 80) and probs.abs().sum() == 0
