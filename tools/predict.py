#!/usr/bin/env python
"""Predict lesions on images of any size: COCO results JSON, overlay PNGs, a lesion count table.

Example:
    python tools/predict.py --config-file configs/maskrcnn_heimed.yaml \\
        --weights output/maskrcnn_heimed/model_best.pth --input photos/ --output predictions/ \\
        [--gt datasets/heimed/val.json]

With --gt, results use that file's image ids (images matched by file name); without it, images
are numbered in sorted order and the JSON maps ids to files in "images".

Overlays are ``overlays/<image stem>.png``; images that share a stem (``eye.jpg`` and ``eye.png``,
or ``Eye.png``) get ``overlays/<image name>.png`` (``eye.jpg.png``), so none overwrites another.
An --output that cannot be written is one error line naming it (exit 2).
"""
import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import retina_d2  # noqa: E402,F401  (Detectron2 compat first)
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from retina_d2.config import ConfigError  # noqa: E402
from retina_d2.data.converters.base import IMAGE_EXTENSIONS, atomic_write  # noqa: E402
from retina_d2.data.image_io import read_image  # noqa: E402  (16-bit: scaled, not clipped)
from retina_d2.data.lesions import lesion  # noqa: E402
from retina_d2.engine import setup_cfg  # noqa: E402
from retina_d2.engine.predictor import LesionPredictor  # noqa: E402
from retina_d2.visualize import draw_prediction_overlay  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument(
        "--weights", required=True,
        help="a checkpoint on local disk that sets every parameter of the model (else refused, "
        "unless MODEL.ALLOW_PARTIAL_WEIGHTS True)",
    )
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="read --weights even if it needs full unpickling, which can run any code it "
        "carries: only a file you made or trust (sets MODEL.TRUST_CHECKPOINT; warns)",
    )
    p.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--gt", type=Path, help="COCO ground truth whose image ids the results use")
    p.add_argument("--score-threshold", type=float, help="default: MODEL.ROI_HEADS.SCORE_THRESH_TEST")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def list_inputs(path: Path):
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"--input {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return images


def image_ids(images, gt: Path = None):
    """file -> image id: from the GT's records matched by file name, else 1..N in order."""
    if gt is None:
        return {img: i + 1 for i, img in enumerate(images)}
    with open(gt) as f:
        by_name = {Path(r["file_name"]).name: r["id"] for r in json.load(f)["images"]}
    missing = [img.name for img in images if img.name not in by_name]
    if missing:
        raise ValueError(f"--gt {gt}: no image record for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {img: by_name[img.name] for img in images}


def overlay_names(images):
    """image -> its overlay's file name: ``<stem>.png``, or ``<name>.png`` for images sharing a
    stem (compared ignoring case, as some disks do), numbered where even that is taken."""
    stems = Counter(p.stem.lower() for p in images)
    names, used = {}, set()
    for path in images:
        name = f"{path.stem}.png" if stems[path.stem.lower()] == 1 else f"{path.name}.png"
        base, number = name[: -len(".png")], 1
        while name.lower() in used:
            number += 1
            name = f"{base}-{number}.png"
        used.add(name.lower())
        names[path] = name
    return names


def prepare_output(output: Path):
    """Create ``output/overlays``; a path that cannot hold it is a ValueError naming it."""
    try:
        (output / "overlays").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {output} cannot be written: {e.strerror or e}") from e


def write_tables(output: Path, results, ids, counts, classes):
    """The results JSON, the image id map and the lesion counts, each written atomically."""
    with atomic_write(output / "coco_instances_results.json") as f:
        json.dump(results, f)
    with atomic_write(output / "images.json") as f:
        json.dump({str(p): i for p, i in ids.items()}, f, indent=1)
    with atomic_write(output / "lesion_counts.csv") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "image_id"] + list(classes))
        writer.writeheader()
        writer.writerows(counts)


def main(argv=None):
    args = parse_args(argv)
    try:
        images = list_inputs(args.input)
        ids = image_ids(images, args.gt)
        opts = list(args.opts) + ["MODEL.WEIGHTS", str(args.weights)]
        if args.trust_checkpoint:
            opts += ["MODEL.TRUST_CHECKPOINT", "True"]
        cfg = setup_cfg(args.config_file, opts)
        predictor = LesionPredictor(cfg)
        prepare_output(args.output)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threshold = args.score_threshold if args.score_threshold is not None else cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    classes = metadata.thing_classes
    dataset_ids = [lesion(name).id for name in classes]
    overlay_files = {p: args.output / "overlays" / n for p, n in overlay_names(images).items()}
    results, counts, failed = [], [], []
    for path in tqdm(images, desc="predict"):
        try:
            image = read_image(str(path), format="RGB")
            outputs = predictor(path)
        except (OSError, ValueError) as e:
            print(f"warning: {path}: unreadable image ({e}); skipped", file=sys.stderr)
            failed.append(str(path))
            continue
        instances = outputs["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        for r in instances_to_coco_json(instances, ids[path]):
            r["category_id"] = dataset_ids[r["category_id"]]
            results.append(r)
        row = {"file": path.name, "image_id": ids[path]}
        row.update({name: int((instances.pred_classes == k).sum()) for k, name in enumerate(classes)})
        counts.append(row)
        overlay = draw_prediction_overlay(image, instances, metadata, threshold)
        try:
            Image.fromarray(overlay).save(overlay_files[path])
        except OSError as e:
            print(f"error: cannot write {overlay_files[path]}: {e}", file=sys.stderr)
            return 2
    try:
        write_tables(args.output, results, ids, counts, classes)
    except OSError as e:
        print(f"error: cannot write the results into --output {args.output}: {e}", file=sys.stderr)
        return 2
    print(f"{len(counts)} image(s), {len(results)} lesion(s) at score >= {threshold}: {args.output}")
    return 1 if failed and not counts else 0


if __name__ == "__main__":
    sys.exit(main())
