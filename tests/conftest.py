# retina_d2 must be imported before anything from Detectron2: it bridges Detectron2 0.6 to
# today's NumPy/Pillow and to a missing detectron2._C (see retina_d2/compat.py).
import retina_d2  # noqa: F401


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_datasets(tmp_path_factory):
    """A datasets root (for RETINA_D2_DATASETS) holding the synthetic set, 6 photographs of 192 px:
    the tests that run tools/train_net.py on the instant configs share one conversion."""
    from retina_d2.data.converters import ConvertOptions, synthetic

    root = tmp_path_factory.mktemp("datasets")
    synthetic.convert(None, root / "synthetic", ConvertOptions(progress=False), count=6, size=192)
    return root
