"""Converted datasets -> Detectron2's DatasetCatalog / MetadataCatalog.

Every folder under the datasets root that holds a conversion manifest (``retina_d2.json``, written
by ``tools/convert_dataset.py``) is registered, one name per task and split:
``<dataset>_<task>_<split>``, e.g. ``idrid_seg_train``, ``heimed_seg_all``,
``idrid_grading_test``. The datasets root is ``$RETINA_D2_DATASETS``, else
``$DETECTRON2_DATASETS``, else ``./datasets``; each dataset may sit one or two levels below it
(``datasets/idrid/retina_d2.json`` or ``datasets/eophtha/EX/retina_d2.json``).
"""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .converters.base import MANIFEST_NAME
from .lesions import lesion

__all__ = ["datasets_root", "read_manifest", "register_converted", "register_all", "load_lesion_json"]

logger = logging.getLogger(__name__)

# Image-record fields that converters add beside COCO's and that the mapper/evaluators read.
IMAGE_FIELDS = (
    "annotated_category_ids",
    "sem_seg_files",
    "dr_grade",
    "dme_grade",
    "optic_disc_center",
    "fovea_center",
    "quality",
)


def datasets_root() -> Path:
    return Path(
        os.environ.get("RETINA_D2_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    )


def load_lesion_json(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Detectron2's ``load_coco_json`` plus the image-level fields the converters write.

    ``sem_seg_files`` paths become absolute (they are stored relative to the JSON's folder).
    """
    dicts = load_coco_json(json_file, image_root, dataset_name)
    with open(json_file) as f:
        images = {img["id"]: img for img in json.load(f)["images"]}
    base = Path(json_file).resolve().parent
    for record in dicts:
        image = images[record["image_id"]]
        for key in IMAGE_FIELDS:
            if key in image:
                record[key] = image[key]
        if "sem_seg_files" in record:
            # JSONs of non-seg tasks sit one folder down (<task>/<split>.json); semantic/ is at the
            # conversion's top, next to the manifest.
            top = base if (base / MANIFEST_NAME).exists() else base.parent
            record["sem_seg_files"] = {k: str(top / v) for k, v in record["sem_seg_files"].items()}
    return dicts


def read_manifest(conversion_dir: Path) -> Tuple[dict, Path]:
    """The manifest (``retina_d2.json``) of one converted dataset and its image root as an
    absolute path (the manifest may store it relative to the conversion folder)."""
    conversion_dir = Path(conversion_dir).resolve()
    with open(conversion_dir / MANIFEST_NAME) as f:
        manifest = json.load(f)
    image_root = Path(manifest["image_root"])
    if not image_root.is_absolute():
        image_root = conversion_dir / image_root
    return manifest, image_root


def register_converted(conversion_dir: Path, replace: bool = False) -> List[str]:
    """Register every task and split of one converted dataset; return the registered names.

    Args:
        conversion_dir: a folder holding ``retina_d2.json``.
        replace: re-register names that exist already. Without it a name is left as it is, unless
            this function registered it from another conversion folder before (the datasets root,
            RETINA_D2_DATASETS, changed within the process): the name then follows the new root,
            or a second run in one process would silently read the first run's images.
    """
    conversion_dir = Path(conversion_dir).resolve()
    manifest, image_root = read_manifest(conversion_dir)
    dataset = manifest["dataset"]
    names = []
    for task, splits in manifest["tasks"].items():
        for split, rel in splits.items():
            name = f"{dataset}_{task}_{split}"
            json_file = str(conversion_dir / rel)
            if name in DatasetCatalog.list():
                if not (replace or _registered_from_elsewhere(name, json_file)):
                    names.append(name)
                    continue
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            DatasetCatalog.register(
                name, lambda j=json_file, r=str(image_root), n=name: load_lesion_json(j, r, n)
            )
            categories = manifest["categories"] if task == "seg" else []
            lesions = [lesion(c["name"]) for c in categories]
            MetadataCatalog.get(name).set(
                json_file=json_file,
                image_root=str(image_root),
                evaluator_type="coco" if task == "seg" else task,
                thing_classes=[les.name for les in lesions],
                thing_colors=[les.color for les in lesions],
                thing_dataset_id_to_contiguous_id={les.id: i for i, les in enumerate(lesions)},
                dataset=dataset,
                task=task,
                split=split,
            )
            names.append(name)
    return names


def _registered_from_elsewhere(name: str, json_file: str) -> bool:
    # Only this module's registrations carry "task"; a name someone registered by hand is theirs.
    metadata = MetadataCatalog.get(name)
    return metadata.get("task", None) is not None and metadata.get("json_file", None) != json_file


def register_all(root: Optional[Path] = None, replace: bool = False) -> Dict[str, List[str]]:
    """Register every converted dataset under ``root`` (default :func:`datasets_root`).

    Returns:
        conversion folder -> names registered from it.
    """
    root = Path(root) if root is not None else datasets_root()
    found = {}
    if not root.is_dir():
        logger.debug("datasets root %s does not exist; nothing registered", root)
        return found
    for manifest in sorted(list(root.glob(f"*/{MANIFEST_NAME}")) + list(root.glob(f"*/*/{MANIFEST_NAME}"))):
        found[str(manifest.parent)] = register_converted(manifest.parent, replace=replace)
    return found
