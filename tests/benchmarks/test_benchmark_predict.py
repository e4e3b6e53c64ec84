"""tools/benchmark.py predict's inputs (benchmarks/predict.py): the random-weight model file
and the photographs it predicts."""
import numpy as np
import pytest
from PIL import Image

from benchmarks import HEIMED_ROOT
from benchmarks import predict as bench
from retina_d2 import load_model
from retina_d2.data.converters.heimed_io import HEIMED_CATEGORIES


def test_benchmark_model_file_predicts_alone_and_inputs_repeat(tmp_path):
    """The random-weight model file carries HEI-MED's classes and config (load_model needs
    nothing else); the memory run's inputs are symlinks, --repeat per photograph."""
    model = load_model(bench.random_model_file(tmp_path / "random.pth"))
    assert model.class_names == list(HEIMED_CATEGORIES)
    outputs = model(np.full((64, 80, 3), 90, np.uint8))
    assert outputs["instances"].image_size == (64, 80)
    photos = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for photo in photos:
        photo.write_bytes(b"jpeg")
    assert bench._repeated(photos, tmp_path / "many", 3) == 6
    links = sorted((tmp_path / "many").iterdir())
    assert [p.name for p in links[:2]] == ["r000_a.jpg", "r000_b.jpg"]
    assert all(p.is_symlink() and p.resolve() in photos for p in links)


def test_benchmark_photographs_are_heimed_shrunk(tmp_path):
    if not HEIMED_ROOT.is_dir():
        pytest.skip(f"the HEI-MED sample is not at {HEIMED_ROOT}")
    made = bench.shrunk_photographs(HEIMED_ROOT, tmp_path, 2, 128)
    assert [p.name for p in made] == [p.name for p in sorted(HEIMED_ROOT.glob("*.jpg"))[:2]]
    for photo in made:
        with Image.open(photo) as image, Image.open(HEIMED_ROOT / photo.name) as source:
            assert max(image.size) == 128
            assert abs(image.size[0] / image.size[1] - source.size[0] / source.size[1]) < 0.02
