"""Converted datasets -> Detectron2's DatasetCatalog / MetadataCatalog.

Every folder under the datasets root that holds a conversion manifest (``retina_d2.json``, written
by ``tools/convert_dataset.py``) is registered, one name per task and split:
``<dataset>_<task>_<split>``, e.g. ``idrid_seg_train``, ``heimed_seg_all``,
``idrid_grading_test``. The datasets root is ``$RETINA_D2_DATASETS``, else
``$DETECTRON2_DATASETS``, else ``./datasets``; each dataset may sit one or two levels below it
(``datasets/idrid/retina_d2.json`` or ``datasets/eophtha/EX/retina_d2.json``), or the root may be
one conversion folder itself.

Two conversions under the root that would register the same name (``synthetic`` and
``synthetic_old``, both of dataset ``synthetic``) register neither under that name: a warning
names both folders, and asking for the name (a config's DATASETS) is an error that names them and
says how to choose (remove or move one, or point RETINA_D2_DATASETS at the one to use). A
manifest that cannot be read (corrupt JSON, missing fields) is skipped with a warning naming the
file; the other datasets still register, and asking for a name that is not registered names the
skipped manifests (one of them may have provided it).
"""
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .converters.base import MANIFEST_NAME
from .lesions import lesion

__all__ = [
    "ManifestError",
    "converted_datasets",
    "datasets_root",
    "read_manifest",
    "register_converted",
    "register_all",
    "explain_unregistered",
    "load_lesion_json",
]

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
    "lesion_labels",
)


def datasets_root() -> Path:
    return Path(
        os.environ.get("RETINA_D2_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    )


def load_lesion_json(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Detectron2's ``load_coco_json`` plus the image-level fields the converters write.

    ``sem_seg_files`` paths become absolute (they are stored relative to the JSON's folder).
    """
    with open(json_file) as f:
        content = json.load(f)
    # Given a name, Detectron2 reads the categories into its metadata and fails on an empty list:
    # a grading / localization file (no lesion classes; _register sets its metadata) is read
    # without one.
    dicts = load_coco_json(json_file, image_root, dataset_name if content["categories"] else None)
    if not content["categories"]:
        for record in dicts:  # no lesion truth, rather than "no lesions" (never filtered out)
            record.pop("annotations", None)
    images = {img["id"]: img for img in content["images"]}
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


class ManifestError(ValueError):
    """A conversion manifest that cannot be read or is malformed; the message names the file."""


def read_manifest(conversion_dir: Path) -> Tuple[dict, Path]:
    """The manifest (``retina_d2.json``) of one converted dataset and its image root as an
    absolute path (the manifest may store it relative to the conversion folder).

    Raises:
        ManifestError: the file is missing, unreadable, not JSON, or lacks the fields a
            conversion writes (dataset, image_root, tasks -> split -> JSON file, categories).
    """
    conversion_dir = Path(conversion_dir).resolve()
    path = conversion_dir / MANIFEST_NAME
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ManifestError(f"{path}: unreadable ({e.strerror or e})") from e
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: not a retina_d2 conversion manifest ({problem})")
    image_root = Path(manifest["image_root"])
    if not image_root.is_absolute():
        image_root = conversion_dir / image_root
    return manifest, image_root


def _manifest_problem(manifest) -> Optional[str]:
    """What a manifest lacks that registration reads (None: nothing)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("dataset"), str) or not manifest["dataset"]:
        return "no dataset name"
    if not isinstance(manifest.get("image_root"), str):
        return "no image_root"
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict) or not all(
        isinstance(splits, dict) and all(isinstance(v, str) for v in splits.values())
        for splits in tasks.values()
    ):
        return "tasks is not {task: {split: JSON file}}"
    categories = manifest.get("categories", [])
    if not isinstance(categories, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in categories
    ):
        return "categories is not a list of {name: ...}"
    return None


def _dataset_names(manifest: dict) -> List[str]:
    """The catalog names a manifest registers: ``<dataset>_<task>_<split>``."""
    return [
        f"{manifest['dataset']}_{task}_{split}"
        for task, splits in manifest["tasks"].items()
        for split in splits
    ]


def register_converted(conversion_dir: Path, replace: bool = False) -> List[str]:
    """Register every task and split of one converted dataset; return the registered names.

    Args:
        conversion_dir: a folder holding ``retina_d2.json``.
        replace: re-register names that exist already. Without it a name is left as it is, unless
            this function registered it from another conversion folder before (the datasets root,
            RETINA_D2_DATASETS, changed within the process): the name then follows the new root,
            or a second run in one process would silently read the first run's images.

    Raises:
        ManifestError: an unreadable or malformed manifest.
    """
    conversion_dir = Path(conversion_dir).resolve()
    manifest, image_root = read_manifest(conversion_dir)
    return _register(conversion_dir, manifest, image_root, replace, skip=())


def _register(
    conversion_dir: Path, manifest: dict, image_root: Path, replace: bool, skip
) -> List[str]:
    """Register a read manifest's names except those in ``skip``; return the names."""
    dataset = manifest["dataset"]
    names = []
    for task, splits in manifest["tasks"].items():
        for split, rel in splits.items():
            name = f"{dataset}_{task}_{split}"
            if name in skip:
                continue
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


def _registered_here(name: str) -> bool:
    return name in DatasetCatalog.list() and MetadataCatalog.get(name).get("task", None) is not None


def converted_datasets() -> List[str]:
    """The names registered from conversions, sorted: not Detectron2's built-in datasets (COCO,
    Cityscapes, ADE20k, ...) nor names someone registered by hand."""
    return sorted(name for name in DatasetCatalog.list() if _registered_here(name))


# What the last register_all left unregistered, so that asking for such a name can say why:
# its root, name -> the conversion folders that all provide it, and why manifests were skipped.
_last_root: List[str] = []
_ambiguous: Dict[str, List[str]] = {}
_skipped: List[str] = []


def register_all(root: Optional[Path] = None, replace: bool = False) -> Dict[str, List[str]]:
    """Register every converted dataset under ``root`` (default :func:`datasets_root`).

    A name that two conversion folders would register is registered from neither (a warning
    names both; :func:`explain_unregistered` gives the reason); a manifest that cannot be read is
    skipped with a warning naming it. Everything else registers.

    Returns:
        conversion folder -> names registered from it.
    """
    root = Path(root) if root is not None else datasets_root()
    _ambiguous.clear()
    _skipped.clear()
    _last_root[:] = [str(root)]
    found = {}
    if not root.is_dir():
        logger.debug("datasets root %s does not exist; nothing registered", root)
        return found
    paths = list(root.glob(MANIFEST_NAME))
    paths += sorted(list(root.glob(f"*/{MANIFEST_NAME}")) + list(root.glob(f"*/*/{MANIFEST_NAME}")))
    conversions, seen = [], set()
    for path in paths:
        folder = path.parent.resolve()
        if folder in seen:  # one folder reached twice through a link is one conversion
            continue
        seen.add(folder)
        try:
            manifest, image_root = read_manifest(folder)
        except ManifestError as e:
            _skipped.append(str(e))
            logger.warning("skipped %s; datasets elsewhere under %s still register", e, root)
            continue
        conversions.append((folder, manifest, image_root))

    providers = defaultdict(list)
    for folder, manifest, _ in conversions:
        for name in _dataset_names(manifest):
            providers[name].append(str(folder))
    _ambiguous.update({n: folders for n, folders in providers.items() if len(folders) > 1})
    for name in _ambiguous:
        if _registered_here(name):  # from an earlier root: it must not silently stay
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    _warn_ambiguous()

    for folder, manifest, image_root in conversions:
        found[str(folder)] = _register(folder, manifest, image_root, replace, skip=_ambiguous)
    return found


def _warn_ambiguous() -> None:
    by_folders = defaultdict(list)
    for name, folders in _ambiguous.items():
        by_folders[tuple(folders)].append(name)
    for folders, names in by_folders.items():
        message = _ambiguity(folders, names)
        logger.warning("%s (none of them is registered under these names)", message)


def _ambiguity(folders, names) -> str:
    root = _last_root[0]
    return (
        f"{len(folders)} conversions under {root} provide {', '.join(sorted(names))}: "
        f"{' and '.join(folders)}. Remove all but one (or move them out of {root}), or point "
        "RETINA_D2_DATASETS at the conversion folder to use"
    )


def explain_unregistered(name: str) -> Optional[str]:
    """Why the last :func:`register_all` did not register ``name``, when it can tell: two
    conversion folders provide it (both named, with how to choose), or some manifests were
    skipped as unreadable (named: one of them may have provided it). None otherwise."""
    if name in _ambiguous:
        return _ambiguity(_ambiguous[name], [name])
    if _skipped:
        listed = "; ".join(_skipped)
        return (
            f"manifests under {_last_root[0]} that could not be read were skipped, and one of "
            f"them may provide it: {listed}"
        )
    return None
