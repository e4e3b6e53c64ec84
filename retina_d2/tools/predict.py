"""Predict lesions on images of any size: COCO results JSON, overlay PNGs, a lesion count table.

Example:
    python tools/predict.py --weights output/maskrcnn_heimed/model_best.pth \\
        --input photos/ --output predictions/ [--gt datasets/heimed/val.json]

The checkpoint is all it needs: training stores the config and the class names in every
checkpoint, so no --config-file and no converted or registered dataset. A checkpoint saved before
they were stored needs --config-file (the config it was trained with).

With --gt, results use that file's image ids (images matched by file name) and only the images it
lists are predicted (a dataset's raw folder can be --input: its masks are left out, with a note);
without it, images are numbered in sorted order and the JSON maps ids to files in "images".

Detectors (LesionRCNN) give instances. Semantic models (SemanticLesionNet) give probability maps,
written as 8-bit PNGs ``maps/<image>/<lesion>.png`` (value = round(255 * probability); skip with
--no-maps), and their lesions are the maps' connected components (RETINA.COMPONENTS: pixels at or
above MASK_THRESHOLD, scored by their peak), written as instances; ``image_predictions.json``
holds each image's score per lesion type ("image_scores": the mean of its
RETINA.COMPONENTS.IMAGE_SCORE_TOP_K best lesion scores, every lesion counted whatever
--score-threshold keeps; retina_d2/evaluation/image_scores.py), the number to rank or screen eyes
by. MultiTaskLesionNet adds to it, per image, its grades (argmax and probabilities), landmarks
(x, y in the image's pixels, with a score) and lesion presence.

--score-threshold keeps the lesions scoring at least that much (default: the model's
MODEL.ROI_HEADS.SCORE_THRESH_TEST, RETINA.COMPONENTS.SCORE_THRESHOLD for components). Below the
model's own MODEL.ROI_HEADS.SCORE_THRESH_TEST, it lowers the model's threshold to it (the model
drops lower scores before they reach this tool) and says so.

Overlays are ``overlays/<image stem>.png``; images that share a stem (``eye.jpg`` and ``eye.png``,
or ``Eye.png``) get ``overlays/<image name>.png`` (``eye.jpg.png``), so none overwrites another.
An --output that cannot be written is one error line naming it (exit 2).

Archives (retina_d2/engine/predict_shards.py): --num-gpus N runs N processes (one GPU each; N CPU
processes where there is no CUDA), --num-machines / --machine-rank / --dist-url spread them over
machines sharing --output, as in training. Each process predicts every N-th image and appends a
JSON line per image to ``parts/rank<k>.jsonl`` once its overlay and maps are written (each file
atomically); the results, counts and image outputs are merged from those lines at the end, in
input order, so they are the same for any number of processes and memory stays flat.
--resume continues a stopped run: images with a complete line are skipped.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from PIL import Image
from tqdm import tqdm

from retina_d2.modeling.outputs import has_detector
from retina_d2.data.converters.base import IMAGE_EXTENSIONS, atomic_write
from retina_d2.data.image_io import read_image  # 16-bit: scaled, not clipped
from retina_d2.data.lesions import lesion
# Sharding over processes, per-process JSON-line parts, --resume, the merge.
from retina_d2.engine import predict_shards
from retina_d2.evaluation.image_scores import check_top_k, image_score
from retina_d2.modeling.components import components_to_coco, lesion_components
from retina_d2.modeling.model_file import inference_config
from retina_d2.predictor import LesionPredictor
from retina_d2.schema import OVERLAYS_DIR
# overlay_names: the naming the evaluation's overlays share (eye.jpg and eye.png both kept).
from retina_d2.visualize import draw_prediction_overlay, overlay_names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config-file",
        help="the config the model was trained with; default: the one stored in --weights "
        "(needed for checkpoints saved before configs were stored in them)",
    )
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
    p.add_argument(
        "--score-threshold", type=float,
        help="keep lesions scoring at least this (default: MODEL.ROI_HEADS.SCORE_THRESH_TEST; "
        "RETINA.COMPONENTS.SCORE_THRESHOLD for a semantic model); below the model's "
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST it lowers that too",
    )
    p.add_argument("--no-maps", action="store_true", help="write no probability-map PNGs")
    p.add_argument(
        "--show-scores", action="store_true",
        help="write each lesion's score beside it in the overlays (default: outlines in each "
        "lesion type's colour and a legend of the types found, no text per lesion)",
    )
    predict_shards.add_arguments(p)  # --num-gpus, --num-machines, ..., --resume
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
    """file -> image id: from the GT's records matched by file name, else 1..N in order.

    With a GT, an --input folder may hold more than its photographs (a dataset's raw folder, with
    masks or vessel maps beside them): only the images the GT lists are predicted, and a note
    says how many were left out and how many of the GT's images were not found. An image the GT
    does not list is an error only when no input is listed (another GT, or a single file)."""
    if gt is None:
        return {img: i + 1 for i, img in enumerate(images)}
    with open(gt) as f:
        by_name = {Path(r["file_name"]).name: r["id"] for r in json.load(f)["images"]}
    listed = [img for img in images if img.name in by_name]
    if not listed:
        names = [img.name for img in images]
        more = " ..." if len(names) > 5 else ""
        raise ValueError(f"--gt {gt}: no image record for {names[:5]}{more}")
    unlisted = len(images) - len(listed)
    unseen = len(set(by_name) - {img.name for img in listed})
    if unlisted or unseen:
        print(f"note: --gt {gt}: predicting the {len(listed)} input image(s) it lists; "
              f"{unlisted} other file(s) under --input left out, {unseen} of its image(s) not "
              "found there", file=sys.stderr)
    return {img: by_name[img.name] for img in listed}


def prepare_output(output: Path):
    """Create ``output/overlays``; a path that cannot hold it is a ValueError naming it."""
    try:
        (output / OVERLAYS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {output} cannot be written: {e.strerror or e}") from e


def build_predictor(args):
    """The predictor of --weights and the score threshold to keep (:func:`model_settings`)."""
    cfg, class_names, threshold = model_settings(args)
    return LesionPredictor(cfg, class_names=class_names), threshold


def model_settings(args):
    """The config of --weights (--config-file, else the checkpoint's own), its stored class
    names (None for an older checkpoint) and the score threshold to keep; a threshold below the
    model's own lowers the model's (said on stderr), else the detections between the two would
    be missing without a word."""
    opts = list(args.opts)
    if args.trust_checkpoint:
        opts += ["MODEL.TRUST_CHECKPOINT", "True"]
    cfg, info = inference_config(str(args.weights), args.config_file, opts)
    # Checked before any photograph: a bad k would otherwise stop the run at the first one.
    check_top_k(cfg.RETINA.COMPONENTS.IMAGE_SCORE_TOP_K,
                f"RETINA.COMPONENTS.IMAGE_SCORE_TOP_K of {args.weights}")
    detector = has_detector(cfg)
    model_threshold = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    default = model_threshold if detector else cfg.RETINA.COMPONENTS.SCORE_THRESHOLD
    threshold = default if args.score_threshold is None else args.score_threshold
    if detector and threshold < model_threshold:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = threshold
        cfg.freeze()
        print(
            f"note: --score-threshold {threshold} is below the model's "
            f"MODEL.ROI_HEADS.SCORE_THRESH_TEST {model_threshold}: the model's threshold is "
            f"lowered to {threshold}, so lesions scoring from {threshold} are kept",
            file=sys.stderr,
        )
    elif not detector and threshold < cfg.RETINA.COMPONENTS.MASK_THRESHOLD:
        print(
            f"note: --score-threshold {threshold} is below RETINA.COMPONENTS.MASK_THRESHOLD "
            f"{cfg.RETINA.COMPONENTS.MASK_THRESHOLD}: it lowers nothing, as a lesion is made of "
            "pixels at or above that probability (lower it with RETINA.COMPONENTS.MASK_THRESHOLD)",
            file=sys.stderr,
        )
    return cfg, (info.class_names if info is not None else None), threshold


def component_instances(cfg, probs: torch.Tensor, threshold: float):
    """A semantic model's lesions: the connected components of its (C, H, W) maps
    (RETINA.COMPONENTS) scoring at least ``threshold``, as (label maps, components, Instances
    with full-frame masks for the overlay, and each map's image score from all its components,
    any score: the mean of its IMAGE_SCORE_TOP_K best)."""
    options = cfg.RETINA.COMPONENTS
    label_maps, found = lesion_components(probs, options.MASK_THRESHOLD, options.MIN_AREA)
    eye_scores = [image_score((c.score for c in found if c.channel == k),
                              options.IMAGE_SCORE_TOP_K) for k in range(probs.shape[0])]
    found = [c for c in found if c.score >= threshold]
    instances = Instances(tuple(probs.shape[-2:]))
    boxes = torch.tensor([c.box for c in found], dtype=torch.float32).reshape(-1, 4)
    instances.pred_boxes = Boxes(boxes)
    instances.scores = torch.tensor([c.score for c in found], dtype=torch.float32)
    instances.pred_classes = torch.tensor([c.channel for c in found], dtype=torch.int64)
    masks = np.zeros((len(found),) + tuple(probs.shape[-2:]), bool)
    for i, c in enumerate(found):
        x0, y0, x1, y1 = c.box
        masks[i, y0:y1, x0:x1] = label_maps[c.channel][y0:y1, x0:x1] == c.label
    instances.pred_masks = torch.from_numpy(masks)
    return label_maps, found, instances, eye_scores


def lesion_slug(name: str) -> str:
    """A lesion name as a file name ("hard exudate" -> "hard_exudate")."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def write_maps(folder: Path, probs: torch.Tensor, classes):
    """One 8-bit PNG per lesion map, value = round(255 * probability), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(classes):
        values = (probs[k].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        with atomic_write(folder / f"{lesion_slug(name)}.png", "wb") as f:
            Image.fromarray(values, mode="L").save(f, format="PNG")


def image_level(outputs: dict, classes):
    """A multi-task model's image-level outputs as plain JSON: grades (argmax and
    probabilities), landmarks (x, y, score) and lesion presence; {} for other models."""
    found = {}
    for task in ("dr_grade", "dme_grade"):
        if task in outputs:
            probs = [float(p) for p in outputs[task].cpu()]
            found[task] = {"grade": int(np.argmax(probs)), "probabilities": probs}
    if "landmarks" in outputs:
        scores = outputs.get("landmark_scores", {})
        found["landmarks"] = {
            name: {"x": float(x), "y": float(y), "score": scores.get(name)}
            for name, (x, y) in outputs["landmarks"].items()
        }
    if "lesion_presence" in outputs and classes:
        found["lesion_presence"] = {
            name: float(p) for name, p in zip(classes, outputs["lesion_presence"].cpu())
        }
    return found


def predict_one(predictor, path: Path, image_id, threshold: float):
    """One image's RGB pixels, kept Instances, COCO results, image-level outputs and
    probability maps (None without a semantic head)."""
    image = read_image(str(path), format="RGB")
    outputs = predictor(image, format="RGB")  # read once: the overlay draws on the same pixels
    classes, ids = predictor.class_names, predictor.lesion_ids
    image_outputs = image_level(outputs, classes)
    if "instances" in outputs:
        instances = outputs["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        results = instances_to_coco_json(instances, image_id)
        for r in results:
            r["category_id"] = ids[r["category_id"]]
    elif "sem_seg" in outputs:
        label_maps, found, instances, eye_scores = component_instances(
            predictor.cfg, outputs["sem_seg"], threshold
        )
        results = components_to_coco(label_maps, found, image_id, ids)
        image_outputs["image_scores"] = dict(zip(classes, eye_scores))
    else:  # grades / landmarks only
        instances, results = Instances(image.shape[:2]), []
    return image, instances, results, image_outputs, outputs.get("sem_seg")


def main(argv=None):
    args = parse_args(argv)
    several = predict_shards.world_size(args) > 1
    try:
        predict_shards.check_arguments(args)
        ids = image_ids(list_inputs(args.input), args.gt)
        images = list(ids)
        cfg, class_names, threshold = model_settings(args)
        # Built here whatever the number of processes: a model file that cannot be loaded is one
        # error line before any starts (the processes build their own; this one is on the CPU).
        predictor = LesionPredictor(_on_cpu(cfg) if several else cfg, class_names=class_names)
        classes = predictor.class_names
        prepare_output(args.output)
        settings = predict_shards.run_settings(
            cfg, str(args.weights), class_names=classes, score_threshold=threshold,
            show_scores=args.show_scores, maps=not args.no_maps,
        )
        todo, done = predict_shards.start_parts(
            args.output, settings, args.resume, images, ids, args.machine_rank
        )
    except (FileNotFoundError, ValueError, KeyError) as e:  # ConfigError, CheckpointError too
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write into --output {args.output}: {e}", file=sys.stderr)
        return 2
    if done:
        print(f"--resume: {done} of {len(images)} image(s) already predicted, {len(todo)} to go",
              file=sys.stderr)
    if todo:
        if several:
            predictor = None  # each process builds its own
        job = (args, cfg, classes, threshold, images, ids, todo, predictor)
        status = predict_shards.run_on_every_rank(predict_shard, job, args)
        if status:
            return status
    if args.machine_rank != 0:
        return 0  # machine 0 merges
    try:
        summary = predict_shards.merge_parts(args.output, images, ids, classes)
    except (OSError, predict_shards.PartError) as e:
        print(f"error: cannot write the results into --output {args.output}: {e}", file=sys.stderr)
        return 2
    if summary.missing:
        print(f"warning: {len(summary.missing)} image(s) not predicted (unreadable: see the "
              "warnings); --resume tries them again", file=sys.stderr)
    if summary.others:
        print(f"note: {summary.others} image(s) predicted in {args.output / 'parts'} are not "
              "among --input: left out of the results", file=sys.stderr)
    print(f"{summary.images} image(s), {summary.lesions} lesion(s) at score >= {threshold}: "
          f"{args.output}")
    return 1 if summary.missing and not summary.images else 0


def _on_cpu(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def predict_shard(args, cfg, classes, threshold, images, ids, todo, predictor=None):
    """Predict this process's share of ``todo`` (every world-size-th image from its rank's),
    writing each image's overlay and maps, then its line in this process's part. Returns 0, or
    2 after an error line (an output that cannot be written)."""
    rank, world = comm.get_rank(), comm.get_world_size()
    if predictor is None:
        predictor = LesionPredictor(cfg, class_names=classes)
    metadata = Metadata(
        name="predict", thing_classes=classes, thing_colors=[lesion(n).color for n in classes]
    )
    overlay_files = {p: args.output / OVERLAYS_DIR / n for p, n in overlay_names(images).items()}
    mine = predict_shards.share(todo, rank, world)
    target = args.output / "parts"
    try:
        with predict_shards.PartWriter(args.output, rank) as part:
            target = part.path
            progress = tqdm(mine, desc="predict" if world == 1 else f"predict {rank}/{world}",
                            position=comm.get_local_rank())
            for path in progress:
                try:
                    image, instances, found, image_outputs, probs = predict_one(
                        predictor, path, ids[path], threshold
                    )
                except (OSError, ValueError) as e:
                    print(f"warning: {path}: unreadable image ({e}); skipped", file=sys.stderr)
                    continue
                overlay = draw_prediction_overlay(
                    image, instances, metadata, threshold, show_scores=args.show_scores
                )
                target = overlay_files[path]
                with atomic_write(target, "wb") as f:  # a killed run leaves no half picture
                    Image.fromarray(overlay).save(f, format="PNG")
                if probs is not None and not args.no_maps:
                    target = args.output / "maps" / target.stem
                    write_maps(target, probs, classes)
                counts = {
                    name: int((instances.pred_classes == k).sum()) for k, name in enumerate(classes)
                }
                extra = {"image": image_outputs} if image_outputs else {}
                target = part.path
                part.write(str(path), ids[path], results=found, counts=counts, **extra)
    except OSError as e:
        print(f"error: cannot write {e.filename or target}: {e}", file=sys.stderr)
        return 2
    return 0
