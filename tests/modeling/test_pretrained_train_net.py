"""tools/train_net.py with a paper config whose pretrained start is a URL that is not cached and
cannot be downloaded: exit 2 with one ``error:`` line naming the URL, the cache file to put it in
and the MODEL.WEIGHTS override, before any training (no checkpoint, no metrics)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retina_d2.modeling.pretrained import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def _train(config, opts, env_extra, out):
    env = {k: v for k, v in os.environ.items() if k != OFFLINE_ENV}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, str(REPO / "tools/train_net.py"), "--config-file", str(config),
         *opts, "OUTPUT_DIR", str(out)],
        env=env, capture_output=True, text=True, timeout=600,  # a guard against a hang only
    )


# Red-Seg's IDRiD config, on the synthetic set (the same five lesion channels as IDRiD).
SYNTHETIC = [
    "DATASETS.TRAIN", "('synthetic_seg_train',)", "DATASETS.TEST", "('synthetic_seg_val',)"
]


@pytest.mark.parametrize(
    "weights, offline",
    [
        (None, True),  # the config's own URL, downloads forbidden (RETINA_D2_OFFLINE)
        ("https://weights.invalid/models/vgg16-397923af.pth", False),  # a host that never resolves
    ],
    ids=["config-url-offline", "unreachable-host"],
)
def test_an_unavailable_pretrained_start_stops_training_with_one_line(
    weights, offline, synthetic_datasets, tmp_path
):
    out = tmp_path / "run"
    fvcore_cache = tmp_path / "fvcore_cache"
    env = {
        "RETINA_D2_DATASETS": str(synthetic_datasets),
        "FVCORE_CACHE": str(fvcore_cache),
        "TORCH_HOME": str(tmp_path / "torch_home"),
    }
    if offline:
        env[OFFLINE_ENV] = "1"
    opts = SYNTHETIC + (["MODEL.WEIGHTS", weights] if weights else [])
    url = weights or VGG16_URL
    result = _train(REPO / "configs/redseg_idrid.yaml", opts, env, out)

    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    line = errors[0]
    assert f"MODEL.WEIGHTS {url}" in line
    # Both URLs' path is /models/vgg16-397923af.pth: PathManager caches it under models/.
    assert str(fvcore_cache / "models" / "vgg16-397923af.pth") in line
    assert "give MODEL.WEIGHTS /path/to/vgg16-397923af.pth" in line
    assert "Traceback" not in result.stderr
    # Nothing trained: no checkpoint, no metrics, no download left behind.
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.json").exists()
    assert not (fvcore_cache / "models" / "vgg16-397923af.pth").exists()


def test_the_trainer_starts_the_grading_cnn_from_its_own_weights(
    synthetic_datasets, tmp_path, monkeypatch
):
    """MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS reaches the model through LesionTrainer's
    checkpointer at a fresh start (here the backbone's own state dict, a local file)."""
    import torch

    from retina_d2.engine import LesionTrainer, setup_cfg

    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    config = REPO / "configs/quick_schedules/multitask_synthetic_instant_test.yaml"
    cfg = setup_cfg(str(config), ["OUTPUT_DIR", str(tmp_path / "run")])
    layout = LesionTrainer.build_model(cfg).task_backbone.state_dict()
    g = torch.Generator().manual_seed(3)
    own = {
        k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v
        for k, v in layout.items()
    }
    weights = tmp_path / "grading_cnn.pth"
    torch.save(own, weights)
    cfg = setup_cfg(
        str(config),
        ["OUTPUT_DIR", str(tmp_path / "run"), "MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS", str(weights)],
    )
    trainer = LesionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = trainer.model.task_backbone.state_dict()
    for key, value in own.items():
        assert torch.equal(loaded[key], value), key
