"""Self-contained checkpoints and the Python API (retina_d2.load_model / LesionPredictor): a
checkpoint carries its class names, vocabulary ids, config and version (read back with
torch.load(weights_only=True)); the API predicts from that file alone, in a fresh process with no
dataset registered; a path, an RGB / BGR array and a PIL image give the same instances; older
checkpoints need their config and say so."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import retina_d2
from retina_d2 import LesionPredictor, load_model
from retina_d2.config import ConfigError, get_retina_cfg, merge_config
from retina_d2.safe_load import CheckpointError
from retina_d2.tools import train_net

REPO = Path(__file__).resolve().parents[2]

INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")
# Three iterations of training score low: keep every detection, so there is something to compare.
KEEP_ALL = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_datasets):
    out = tmp_path_factory.mktemp("predictor_api") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    train_net.cli([
        "--config-file", INSTANT, "OUTPUT_DIR", str(out), "RETINA.EVAL.NUM_OVERLAYS", "0",
        "RETINA.EVAL.REPORT", "False",
    ])
    mp.undo()
    return out


@pytest.fixture(scope="module")
def predictor(run):
    return load_model(run / "model_final.pth", opts=KEEP_ALL)


def _manifest_categories(synthetic_datasets):
    """The conversion's own categories, in the order the model's classes follow."""
    manifest = json.loads((synthetic_datasets / "synthetic/retina_d2.json").read_text())
    return [c["name"] for c in manifest["categories"]], [c["id"] for c in manifest["categories"]]


def _photo(synthetic_datasets, index=0) -> Path:
    return sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))[index]


def _same_instances(a, b):
    a, b = a.to("cpu"), b.to("cpu")
    return (
        len(a) == len(b)
        and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        and torch.equal(a.scores, b.scores)
        and torch.equal(a.pred_classes, b.pred_classes)
        and torch.equal(a.pred_masks, b.pred_masks)
    )


def _without_info(run, tmp_path) -> Path:
    """The trained checkpoint as a version without stored metadata would have written it."""
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    del checkpoint["retina_d2"]
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    return old


def test_checkpoint_carries_class_names_ids_config_and_version(run, synthetic_datasets):
    # Plain torch, no allow-list: strings, ints, lists and dicts only.
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    info = checkpoint["retina_d2"]
    names, ids = _manifest_categories(synthetic_datasets)
    assert info["class_names"] == names and info["lesion_ids"] == ids
    assert info["version"] == retina_d2.__version__
    # The stored config is the run's: the one Detectron2's default_setup wrote beside it.
    written = get_retina_cfg()
    merge_config(written, str(run / "config.yaml"))
    stored = yaml.safe_load(info["config"])
    expected = yaml.safe_load(written.dump())
    assert stored == expected


def test_path_arrays_and_pil_image_give_the_same_instances(predictor, synthetic_datasets):
    photo = _photo(synthetic_datasets)
    from_path = predictor(photo)
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    assert len(from_path["instances"]) > 0
    for outputs in (
        predictor(str(photo)),
        predictor(rgb, format="RGB"),
        predictor(np.ascontiguousarray(rgb[:, :, ::-1])),  # BGR, the default (cv2.imread's)
        predictor(Image.open(photo)),
    ):
        assert _same_instances(outputs["instances"], from_path["instances"])
        assert (outputs["height"], outputs["width"]) == rgb.shape[:2]
    # The order matters: an RGB array read as BGR is another image to the model.
    swapped = predictor(rgb)
    assert not _same_instances(swapped["instances"], from_path["instances"])
    # The caller's array is left as it was.
    assert np.array_equal(rgb, np.asarray(Image.open(photo).convert("RGB")))


def test_api_names_the_classes_and_predicts_as_evaluation_does(
    predictor, run, synthetic_datasets, monkeypatch
):
    """The same instances as the model built from the config file, loaded by Detectron2's
    checkpointer and fed by the evaluation mapper (the path LesionTrainer.test takes)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from retina_d2.data.mapper import LesionDatasetMapper
    from retina_d2.engine import setup_cfg

    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    cfg = setup_cfg(INSTANT, KEEP_ALL + ["MODEL.WEIGHTS", str(run / "model_final.pth")])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    photo = _photo(synthetic_datasets, 1)
    with torch.no_grad():
        inputs = LesionDatasetMapper(cfg, is_train=False)({"file_name": str(photo)})
        expected = model.eval()([inputs])
    outputs = predictor(photo)
    assert _same_instances(outputs["instances"], expected[0]["instances"])
    names, ids = _manifest_categories(synthetic_datasets)
    assert outputs["class_names"] == names == predictor.class_names
    assert predictor.lesion_ids == ids


def test_fresh_process_predicts_from_the_checkpoint_alone(
    predictor, run, synthetic_datasets, tmp_path
):
    """No dataset registered (RETINA_D2_DATASETS is an empty folder), no config given; importing
    the API imports no training code."""
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    photo = _photo(synthetic_datasets)
    script = (
        "import json, sys\n"
        "import retina_d2\n"
        "from detectron2.data import DatasetCatalog\n"
        f"model = retina_d2.load_model({str(run / 'model_final.pth')!r}, opts={KEEP_ALL!r},\n"
        "                           device='cpu')\n"
        f"out = model({str(photo)!r})\n"
        "print(json.dumps({'names': out['class_names'],\n"
        "    'scores': out['instances'].scores.tolist(),\n"
        "    'device': model.cfg.MODEL.DEVICE,\n"
        "    'trainer': any(m.startswith(('retina_d2.engine', 'retina_d2.evaluation'))\n"
        "                   for m in sys.modules),\n"
        "    'registered': [n for n in DatasetCatalog.list() if n.startswith('synthetic')]}))\n"
    )
    env = dict(__import__("os").environ, RETINA_D2_DATASETS=str(empty))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["registered"] == [] and seen["trainer"] is False and seen["device"] == "cpu"
    assert seen["names"] == _manifest_categories(synthetic_datasets)[0]
    expected = predictor(photo)["instances"].scores.tolist()
    assert seen["scores"] == pytest.approx(expected, abs=1e-6)


def test_old_checkpoint_needs_its_config_and_says_so(run, predictor, synthetic_datasets, tmp_path,
                                                     monkeypatch):
    old = _without_info(run, tmp_path)
    with pytest.raises(ConfigError, match="holds no config.*pass --config-file"):
        load_model(old)
    # With its config it loads; the classes come from the config's (registered) datasets.
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    with_config = load_model(old, config_file=INSTANT, opts=KEEP_ALL)
    assert with_config.class_names == predictor.class_names
    photo = _photo(synthetic_datasets)
    assert _same_instances(with_config(photo)["instances"], predictor(photo)["instances"])
    # Datasets nowhere to be found: the classes cannot be named.
    elsewhere = ["DATASETS.TRAIN", "('nowhere_seg_train',)",
                 "DATASETS.TEST", "('nowhere_seg_val',)"]
    with pytest.raises(ValueError, match="no class names.*RETINA_D2_DATASETS"):
        load_model(old, config_file=INSTANT, opts=elsewhere)


def test_stored_config_is_read_by_the_safe_yaml_loader(run, tmp_path):
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    marker = tmp_path / "ran"
    checkpoint["retina_d2"]["config"] = (
        f"OUTPUT_DIR: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    hostile = tmp_path / "hostile.pth"
    torch.save(checkpoint, hostile)
    with pytest.raises(ConfigError) as info:
        load_model(hostile)
    assert str(hostile) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_malformed_stored_entry_is_one_error_naming_the_file(run, tmp_path):
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    checkpoint["retina_d2"]["lesion_ids"] = ["one"]
    bad = tmp_path / "bad.pth"
    torch.save(checkpoint, bad)
    with pytest.raises(CheckpointError, match=f"{bad}: its 'retina_d2' entry is malformed"):
        load_model(bad)


@pytest.mark.parametrize(
    "image, kwargs, error, message",
    [
        (np.zeros((32, 32, 3), np.float32), {}, ValueError, "float32; give uint8"),
        (np.zeros((32, 32, 4), np.uint8), {}, ValueError, r"shape \(32, 32, 4\)"),
        (np.zeros((32, 32, 3), np.uint8), {"format": "HSV"}, ValueError, "format must be one of"),
        ([[0, 1], [2, 3]], {}, TypeError, "not a list"),
    ],
)
def test_bad_images_are_clear_errors(predictor, image, kwargs, error, message):
    with pytest.raises(error, match=message):
        predictor(image, **kwargs)


def test_greyscale_array_is_the_grey_photograph(predictor, synthetic_datasets):
    grey = np.asarray(Image.open(_photo(synthetic_datasets)).convert("L"))
    as_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    assert _same_instances(predictor(grey)["instances"], predictor(as_rgb)["instances"])


def test_engine_import_path_still_works():
    from retina_d2.engine.predictor import LesionPredictor as Old

    assert Old is LesionPredictor


def test_eval_only_needs_only_the_checkpoint(run, synthetic_datasets, tmp_path, monkeypatch):
    """--eval-only without --config-file evaluates with the stored config: the same metrics as
    with the config file given."""
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    weights = str(run / "model_final.pth")

    def evaluate(*config, out):
        return train_net.cli([
            *config, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / out),
            "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False",
        ])

    stored = evaluate(out="stored")
    given = evaluate("--config-file", INSTANT, out="given")

    def text(results):  # NaN (a class without truth) equals itself in JSON text
        return json.dumps(results, sort_keys=True, default=float)

    assert stored and text(stored) == text(given)


def test_training_without_a_config_file_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(["MODEL.WEIGHTS", "x.pth"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --config-file is needed to train (only --eval-only can take the config stored "
        "in the MODEL.WEIGHTS checkpoint)"
    ]
