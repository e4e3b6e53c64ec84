"""
``tools/benchmark.py convert``: how fast and how lean the HEI-MED converter is.

Rows, each measured in a fresh process (see :func:`.measure_in_subprocess`):

* ``decode floor``: what any converter must do at least: decode every JPEG fully and read every
  label map and ``.GND`` (``read_label_map`` + ``read_blob_labels``);
* ``retina_d2 (COCO)``: :func:`retina_d2.data.converters.heimed.convert` without semantic PNGs;
* ``retina_d2 (COCO + semantic PNGs)``: the converter as it runs by default;
* ``imantics``: the same label maps through the ``imantics`` package, the way its API is meant to
  be used (one full-size ``Mask`` per blob, ``Image.coco()`` per image), reading the maps and
  labels with the same readers as ours; each image's objects are freed before the next one.
  It writes polygons, so the row also counts how many blobs end up without any polygon of 3 or
  more points (tiny blobs that a COCO loader drops).

Times cover the work only (after imports), as images per second and as a ratio to the floor.
Peak memory is the whole process's; ``import_rss_mb`` is what the imports alone took (importing
``retina_d2`` brings in torch through the Detectron2 compat layer), so the difference is the work's.
"""
import gc
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import REPO_ROOT, format_table, machine_info, measure_in_subprocess

__all__ = ["add_arguments", "run", "decode_floor", "convert_retina_d2", "convert_imantics"]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data" / "heimed"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "convert.json"
_TARGET = f"{__name__}:{{}}"


def _names(root: str, limit: Optional[int]) -> List[str]:
    """The first ``limit`` HEI-MED image names of ``root`` in sorted order (all when None)."""
    from retina_d2.data.converters.heimed import image_name, list_heimed_images

    names = [image_name(p) for p in list_heimed_images(Path(root))]
    return names[:limit] if limit is not None else names


def decode_floor(root: str, limit: Optional[int] = None) -> Dict[str, Any]:
    """
    Decode the images fully and read the label maps and blob labels, nothing else.

    Args:
        root: the HEI-MED folder.
        limit: only the first ``limit`` images.

    Returns:
        dict: ``images``, ``seconds`` and ``blobs`` (labels read).
    """
    from PIL import Image

    from retina_d2.data.converters.heimed_io import read_blob_labels, read_label_map

    names = _names(root, limit)
    blobs = 0
    start = time.perf_counter()
    for name in names:
        with Image.open(Path(root) / f"{name}.jpg") as image:
            image.load()
        labels = read_blob_labels(Path(root) / f"{name}.GND")
        read_label_map(Path(root) / f"{name}.map.gz", num_blobs=len(labels))
        blobs += len(labels)
    return {"images": len(names), "seconds": time.perf_counter() - start, "blobs": blobs}


def convert_retina_d2(
    root: str, limit: Optional[int] = None, semantic: bool = True
) -> Dict[str, Any]:
    """
    Run the HEI-MED converter into a temporary folder.

    Args:
        root: the HEI-MED folder.
        limit: only the first ``limit`` images (passed as a one-split ``--split-file``).
        semantic: also write the semantic target PNGs (the converter's default).

    Returns:
        dict: ``images``, ``seconds`` (discovery, conversion and writing), ``instances``.
    """
    from retina_d2.data.converters import ConvertOptions, heimed

    names = _names(root, limit)
    with tempfile.TemporaryDirectory(prefix="retina_d2_bench_convert_") as tmp:
        split_file = Path(tmp) / "split.json"
        split_file.write_text(json.dumps({"all": names}))
        options = ConvertOptions(progress=False, semantic=semantic)
        start = time.perf_counter()
        summary = heimed.convert(Path(root), Path(tmp) / "out", options, split_file=split_file)
        seconds = time.perf_counter() - start
    split = summary["tasks"]["seg"]["all"]
    instances = sum(c["instances"] for c in split["categories"].values())
    return {"images": split["images"], "seconds": seconds, "instances": instances}


def convert_imantics(root: str, limit: Optional[int] = None) -> Dict[str, Any]:
    """
    Convert the same label maps to COCO with ``imantics``.

    Args:
        root: the HEI-MED folder.
        limit: only the first ``limit`` images.

    Returns:
        dict: ``images``, ``seconds``, ``instances`` (annotations written) and
            ``instances_without_polygon`` (annotations with no polygon of >= 3 points).
    """
    import imantics
    import numpy as np

    from retina_d2.data.converters.heimed_io import blob_category, read_blob_labels, read_label_map

    names = _names(root, limit)
    categories: Dict[str, Any] = {}
    images, annotations = [], []
    without_polygon = 0
    start = time.perf_counter()
    for image_id, name in enumerate(names, start=1):
        # from_path decodes the whole JPEG (cv2.imread), as our converter does with PIL.
        image = imantics.Image.from_path(str(Path(root) / f"{name}.jpg"))
        image.id = image_id
        labels = read_blob_labels(Path(root) / f"{name}.GND")
        label_map = read_label_map(Path(root) / f"{name}.map.gz", num_blobs=len(labels))
        for blob_id, label in enumerate(labels, start=1):
            category_name = blob_category(label)
            if category_name not in categories:
                categories[category_name] = imantics.Category(category_name, id=len(categories) + 1)
            mask = imantics.Mask(label_map == blob_id)
            image.add(imantics.Annotation.from_mask(mask, category=categories[category_name]))
        coco = image.coco()
        images.extend(coco["images"])
        for annotation in coco["annotations"]:
            annotation["id"] = len(annotations) + 1
            if not any(len(polygon) >= 6 for polygon in annotation["segmentation"]):
                without_polygon += 1
            annotations.append(annotation)
        # Annotations and their Image point at each other, so their full-size masks outlive the
        # image until the cycle collector runs (8.9 GB peak on the 40 images without this).
        del image
        gc.collect()
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [c.coco(include=False) for c in categories.values()],
    }
    with tempfile.TemporaryDirectory(prefix="retina_d2_bench_imantics_") as tmp:
        with open(Path(tmp) / "all.json", "w") as f:
            # imantics leaves numpy integers in bbox and area fields.
            json.dump(dataset, f, default=lambda value: np.asarray(value).tolist())
    return {
        "images": len(names),
        "seconds": time.perf_counter() - start,
        "instances": len(annotations),
        "instances_without_polygon": without_polygon,
    }


# Row name -> (function of this module, its extra keyword arguments).
VARIANTS = {
    "decode floor (PIL decode + map/GND read)": ("decode_floor", {}),
    "retina_d2 (COCO RLE)": ("convert_retina_d2", {"semantic": False}),
    "retina_d2 (COCO RLE + semantic PNGs)": ("convert_retina_d2", {"semantic": True}),
    "imantics 0.1.12 (COCO polygons)": ("convert_imantics", {}),
}
_FLOOR = "decode floor (PIL decode + map/GND read)"


def add_arguments(parser) -> None:
    """Flags of ``tools/benchmark.py convert``."""
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="HEI-MED folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per row (fresh process each); best time kept"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a row's process is killed"
    )


def _measure_row(name: str, root: Path, limit: Optional[int], repeat: int, timeout: float) -> dict:
    function, extra = VARIANTS[name]
    row: Dict[str, Any] = {"name": name}
    if function == "convert_imantics" and importlib.util.find_spec("imantics") is None:
        row["skipped"] = (
            "imantics is not installed; `pip install imantics` would also pull opencv-python, "
            "which shares the cv2 package with opencv-python-headless (install it with --no-deps "
            "plus lxml and xmljson)"
        )
        return row
    runs = []
    for _ in range(repeat):
        result = measure_in_subprocess(
            _TARGET.format(function), {"root": str(root), "limit": limit, **extra}, timeout
        )
        if "error" in result:
            row["error"] = result["error"]
            return row
        runs.append(result)
    best = min(runs, key=lambda r: r["seconds"])
    row.update(best)
    row["seconds_all"] = [r["seconds"] for r in runs]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    row["images_per_s"] = best["images"] / best["seconds"] if best["seconds"] > 0 else None
    row["work_rss_mb"] = row["peak_rss_mb"] - best["import_rss_mb"]
    return row


def run(args) -> dict:
    """
    Measure every row, write the results JSON and print the table.

    Args:
        args: parsed flags (see :func:`add_arguments`).

    Returns:
        dict: the results written to ``args.out``.
    """
    from retina_d2.data.converters.base import ConversionError, require_dir, write_json_atomic

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    root = require_dir(args.root.resolve(), "the HEI-MED folder")
    if not _names(str(root), args.limit):
        raise ConversionError(f"no HEI-MED images (NAME.jpg) in {root}")

    results = {"benchmark": "convert", "root": str(root), "limit": args.limit,
               "repeat": args.repeat, "machine_before": machine_info(), "rows": []}
    for name in VARIANTS:
        row = _measure_row(name, root, args.limit, args.repeat, args.timeout)
        results["rows"].append(row)
        logger.info("%s: %s", name, row.get("seconds", row.get("skipped") or row.get("error")))
    floor = next(r for r in results["rows"] if r["name"] == _FLOOR)
    for row in results["rows"]:
        if row.get("seconds") is not None and floor.get("seconds"):
            row["x_floor"] = row["seconds"] / floor["seconds"]
    results["machine_after"] = machine_info()

    write_json_atomic(args.out, results, indent=2)
    print(format_table(results["rows"], _COLUMNS))
    for row in results["rows"]:
        if "skipped" in row or "error" in row:
            print(f"{row['name']}: {row.get('skipped') or row.get('error')}")
    print(f"load average before/after: {results['machine_before']['load_average']} / "
          f"{results['machine_after']['load_average']} on {results['machine_after']['cpus']} CPUs")
    print(f"written to {args.out}")
    return results


_COLUMNS = (
    ("row", "name", ""),
    ("images", "images", "d"),
    ("seconds", "seconds", ".2f"),
    ("images/s", "images_per_s", ".2f"),
    ("x floor", "x_floor", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("after imports MB", "import_rss_mb", ".0f"),
    ("work MB", "work_rss_mb", ".0f"),
    ("instances", "instances", "d"),
    ("no polygon", "instances_without_polygon", "d"),
)
