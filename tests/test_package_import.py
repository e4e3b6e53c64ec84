"""``import retina_d2`` alone registers every model, backbone and head (as Detectron2's projects do)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter, so registrations made by other tests' imports cannot hide a missing one.
_SCRIPT = """
import retina_d2
from detectron2.modeling import build_model, META_ARCH_REGISTRY, BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY
from retina_d2.config import get_retina_cfg
for name in ("LesionRCNN", "SemanticLesionNet", "MultiTaskLesionNet"):
    assert name in META_ARCH_REGISTRY, name
cfg = get_retina_cfg()
cfg.merge_from_file({config!r})
cfg.MODEL.DEVICE = "cpu"
print(type(build_model(cfg)).__name__)
"""


def test_import_retina_d2_registers_the_models():
    config = ROOT / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(config=str(config))],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "LesionRCNN"
