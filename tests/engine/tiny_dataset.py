"""Two tiny synthetic eyes registered under a test module's own name (the engine tests' data)."""
import json
from contextlib import contextmanager

from detectron2.data import DatasetCatalog, MetadataCatalog

from retina_d2.data.converters import ConvertOptions, synthetic
from retina_d2.data.register import load_lesion_json


@contextmanager
def registered_tiny_synthetic(out, name):
    """Convert two 128 px synthetic eyes into ``out``, register their train split as ``name``
    (with its thing_classes, as registration does), and unregister it on exit."""
    synthetic.convert(None, out, ConvertOptions(progress=False), count=2, size=128)
    manifest = json.loads((out / "retina_d2.json").read_text())
    json_file = str(out / manifest["tasks"]["seg"]["train"])
    image_root = str(out / manifest["image_root"])
    load_lesion_json(json_file, image_root, name)
    DatasetCatalog.register(name, lambda: load_lesion_json(json_file, image_root, name))
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
