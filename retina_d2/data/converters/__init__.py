"""One converter module per public dataset, all emitting the same COCO layout (see base.py).

Each module defines ``DATASET`` (its name on the command line), ``CATEGORIES`` (the lesion names
it annotates), ``add_arguments(parser)`` for its own flags and
``convert(root, out_dir, options, **flags) -> summary``.
"""
import importlib

from .base import ConversionError, ConvertOptions, format_summary  # noqa: F401

# Dataset name on the command line -> module (imported lazily: each reads only its own layout).
CONVERTER_MODULES = {
    "idrid": "idrid",
    "eophtha": "eophtha",
    "ddr": "ddr",
    "retinal_lesions": "retinal_lesions",
    "heimed": "heimed",
    "diaretdb1": "diaretdb1",
    "synthetic": "synthetic",
}


def get_converter(dataset: str):
    """The converter module of a dataset name (see ``CONVERTER_MODULES``)."""
    if dataset not in CONVERTER_MODULES:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(CONVERTER_MODULES)}")
    return importlib.import_module(f"{__name__}.{CONVERTER_MODULES[dataset]}")
