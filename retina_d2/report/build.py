"""Assemble the evaluation report of one evaluation folder (``OUTPUT_DIR/inference/<dataset>``).

What the evaluators left there decides what the page holds: ``instance_metrics.json`` (mAP tables),
``froc.json`` (its table, and a FROC curve per lesion drawn from its operating points),
``semantic_metrics.json`` and ``semantic_pr_curves.json`` (pixel PR curves), any other
``*_metrics.json`` (grading, with confusion matrices drawn from ``grading_confusion.json``;
localization); with the predictions (``coco_instances_results.json``) and the ground truth
(``eval_info.json``, or ``gt=``) also instance PR curves and the gallery. The evaluators write
numbers only: every picture is drawn here (``curves.py``), except that the PR-curve and
confusion PNGs an evaluation made before that change left in its folder are shown as they are.
The page names the model scored (weights file and iteration) where ``eval_info.json`` records it.
"""
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Set, Tuple

from ..data.image_io import read_image
from ..evaluation.coco_io import InstanceEvalError, check_results, load_coco_gt, load_coco_results
from ..evaluation.instance_eval import precision_recall_curves
from ..schema import (
    COCO_RESULTS_FILE,
    EVAL_INFO_FILE,
    FROC_FILE,
    FROC_IOU,
    FROC_MATCH,
    FROC_SCORE_THRESHOLD,
    GRADING_CONFUSION_FILE,
    GRADING_METRICS_FILE,
    INSTANCE_METRICS_FILE,
    IOU_THRESHOLDS,
    METRICS_SUFFIX,
    PR_CURVE_DIR,
    SEMANTIC_METRICS_FILE,
    SEMANTIC_PR_CURVES_FILE,
    confusion_file,
)
from .curves import (
    draw_confusion_matrices,
    draw_froc_curves,
    draw_semantic_pr_curves,
    save_instance_pr_curves,
)
from .gallery import COLOURS, ImageOutcome, draw_outcome, pick_gallery, score_images
from .page import GalleryItem, render_page
from .paper_vs_ours import paper_vs_ours_section
from .tables import froc_tables, metric_tables

__all__ = ["ReportError", "build_report", "EVAL_INFO", "REPORT_DIR", "REPORT_MARKER"]

logger = logging.getLogger(__name__)

# Written by the instance evaluators: GT file, image root, dataset, and the model scored
# (retina_d2/evaluation/scored_model.py: weights, iteration, during_training).
EVAL_INFO = EVAL_INFO_FILE
REPORT_DIR = "report"
# Written into every report folder: only a folder holding it is ever replaced by a new report.
REPORT_MARKER = ".retina_d2_report"
RESULTS = COCO_RESULTS_FILE
_KNOWN = (INSTANCE_METRICS_FILE, FROC_FILE, SEMANTIC_METRICS_FILE)


class ReportError(ValueError):
    """An evaluation folder the report cannot be made from; the message names the file."""


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; anything else (unreadable, not JSON, a list) names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{what} {path} cannot be read as JSON: {e}") from e
    if not isinstance(content, dict):
        raise ReportError(
            f"{what} {path} holds a JSON {type(content).__name__}, not an object of "
            "name -> value"
        )
    return content


def _find_upwards(eval_dir: Path, name: str, levels: int = 2) -> Optional[Path]:
    """``name`` in the eval folder or up to two folders above (OUTPUT_DIR holds config.yaml)."""
    for folder in [eval_dir, *list(eval_dir.parents)[:levels]]:
        if (folder / name).is_file():
            return folder / name
    return None


def _gallery_params(eval_dir: Path, froc: Optional[dict]) -> Tuple[float, str, float]:
    """(score threshold, match, IoU threshold): those of the FROC table when there is one, else
    the config's RETINA.EVAL.FROC_* keys, else their defaults."""
    if froc and "params" in froc:
        p = froc["params"]
        match = p.get("match", FROC_MATCH)
        return float(p["score_threshold"]), match, float(p.get("iou_threshold", FROC_IOU))
    config = _find_upwards(eval_dir, "config.yaml")
    if config is not None:
        import yaml

        try:
            content = yaml.safe_load(config.read_text()) or {}
            evaluation = content.get("RETINA", {}).get("EVAL", {})
        except yaml.YAMLError:
            evaluation = {}
        return (
            float(evaluation.get("FROC_SCORE_THRESHOLD", FROC_SCORE_THRESHOLD)),
            evaluation.get("FROC_MATCH", FROC_MATCH),
            float(evaluation.get("FROC_IOU", FROC_IOU)),
        )
    return FROC_SCORE_THRESHOLD, FROC_MATCH, FROC_IOU


def _drawn_figures(
    draw: Callable[[dict, Path], List[Path]], source: Path, numbers: Optional[dict],
    figures_dir: Path, report_dir: Path,
) -> List[Tuple[str, str]]:
    """(page path, caption) of each picture ``draw`` makes of ``numbers``, read from ``source``
    (loaded here when None); numbers that do not draw are a ReportError naming the file."""
    if numbers is None:
        numbers = _read_json(source, "curve file")
    try:
        paths = draw(numbers, figures_dir)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ReportError(f"{source} cannot be drawn: malformed numbers ({e!r})") from e
    return [(p.relative_to(report_dir).as_posix(), p.stem.replace("_", " ")) for p in paths]


def _copy_figures(
    sources: List[Path], figures_dir: Path, report_dir: Path
) -> List[Tuple[str, str]]:
    """Pictures an evaluation made before the evaluators stopped drawing, shown as they are."""
    figures = []
    for source in sources:
        target = figures_dir / source.name
        figures_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        figures.append((target.relative_to(report_dir).as_posix(), source.stem.replace("_", " ")))
    return figures


def _figures_or_older_pictures(
    draw: Callable[[dict, Path], List[Path]], source: Path, older: List[Path],
    figures_dir: Path, report_dir: Path,
) -> List[Tuple[str, str]]:
    """The pictures drawn from ``source`` when the evaluation wrote it, else the ``older``
    pictures an evaluation from before the evaluators stopped drawing left in its folder."""
    if source.is_file():
        return _drawn_figures(draw, source, None, figures_dir, report_dir)
    return _copy_figures(older, figures_dir, report_dir)


def build_report(
    eval_dir,
    out_dir=None,
    *,
    gt=None,
    image_root=None,
    gallery_size: int = 4,
    score_threshold: Optional[float] = None,
    title: Optional[str] = None,
) -> Path:
    """Write ``index.html`` and its PNGs for one evaluation folder; return the page's path.

    Args:
        eval_dir: the folder an evaluation wrote (``OUTPUT_DIR/inference/<dataset>``).
        out_dir: where the report goes (default ``<eval_dir>/report``): a new or empty folder,
            or an earlier report (recognised by its ``.retina_d2_report`` file), which is
            replaced whole; any other folder is refused, so nothing else is ever deleted.
        gt, image_root: the COCO GT file and its images' folder, when ``eval_info.json`` does
            not give them (an evaluation by ``tools/evaluate.py``, say).
        gallery_size: images shown among the worst and among the best of the images with
            lesions, and among the healthy eyes with false alarms (0: no gallery).
        score_threshold: predictions kept for the gallery (default: the FROC table's).

    Raises:
        ReportError: a missing folder, no metrics in it, an unreadable file or one that is not
            a JSON object, predictions for another ground truth, an ``out_dir`` that is neither
            new, empty nor an earlier report (or is, or holds, ``eval_dir``), or one that cannot
            be written.
    """
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise ReportError(f"evaluation folder {eval_dir} does not exist")
    eval_dir = eval_dir.resolve()
    info = {}
    if (eval_dir / EVAL_INFO).is_file():
        info = _read_json(eval_dir / EVAL_INFO, "evaluation info")
    gt = Path(gt) if gt is not None else (Path(info["gt_json"]) if info.get("gt_json") else None)
    if image_root is None and info.get("image_root"):
        image_root = info["image_root"]

    metric_files = [eval_dir / n for n in _KNOWN if (eval_dir / n).is_file()]
    metric_files += sorted(
        p for p in eval_dir.glob("*" + METRICS_SUFFIX) if p.name not in _KNOWN
    )
    if not metric_files:
        raise ReportError(
            f"{eval_dir} holds no metrics file ({', '.join(_KNOWN)} or another *_metrics.json): "
            "evaluate first (tools/train_net.py --eval-only, or tools/evaluate.py --json into it)"
        )
    loaded = {p.name: _read_json(p, "metrics file") for p in metric_files}

    coco_gt = results = None
    results_path = eval_dir / RESULTS
    if gt is not None:
        try:
            coco_gt, _ = load_coco_gt(gt)
        except InstanceEvalError as e:
            raise ReportError(str(e)) from e
        lesions = [coco_gt.cats[c]["name"] for c in sorted(coco_gt.getCatIds())]
    else:
        lesions = _lesion_names(loaded)
    if coco_gt is not None and results_path.is_file():
        try:
            results, source = load_coco_results(results_path)
            check_results(results, coco_gt, source, str(gt), ("bbox",))
        except InstanceEvalError as e:
            raise ReportError(f"{results_path} does not fit the ground truth {gt}: {e}") from e

    out_dir = Path(out_dir) if out_dir is not None else eval_dir / REPORT_DIR
    _check_out_dir(out_dir, eval_dir)
    title = title or f"Evaluation report: {info.get('dataset', eval_dir.name)}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the old report and swapped in whole: a failed run leaves the old one.
        staging = _new_folder(out_dir.parent, f".{out_dir.name}.")
    except OSError as e:
        raise ReportError(f"cannot write the report to {out_dir}: {e}") from e
    try:
        page = _assemble(
            eval_dir, staging, loaded, lesions, coco_gt, results, image_root, gallery_size,
            score_threshold, title, _scored_model(info),
        )
        (staging / "index.html").write_text(page, encoding="utf-8")
        (staging / REPORT_MARKER).write_text(
            json.dumps({"eval_dir": str(eval_dir)}) + "\n", encoding="utf-8"
        )
        _swap_in(staging, out_dir)
    except OSError as e:
        raise ReportError(f"cannot write the report to {out_dir}: {e}") from e
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("report: %s", out_dir / "index.html")
    return out_dir / "index.html"


def _check_out_dir(out_dir: Path, eval_dir: Path) -> None:
    """A report replaces only an earlier report (a folder holding ``REPORT_MARKER``) or an empty
    folder: anything else would be deleted with it."""
    resolved = out_dir.resolve()
    if resolved == eval_dir or resolved in eval_dir.parents:
        raise ReportError(
            f"--out {out_dir} is the evaluation folder {eval_dir} or holds it; the report needs "
            f"a folder of its own (default: {eval_dir / REPORT_DIR})"
        )
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ReportError(f"--out {out_dir} exists and is not a folder")
    try:
        replaceable = _is_earlier_report(out_dir) or next(out_dir.iterdir(), None) is None
    except OSError as e:
        raise ReportError(f"--out {out_dir} cannot be read: {e}") from e
    if not replaceable:
        raise ReportError(
            f"--out {out_dir} is not empty and holds no earlier report ({REPORT_MARKER}); "
            "choose a new or empty folder, nothing in it is deleted"
        )


def _is_earlier_report(folder: Path) -> bool:
    """A report: it holds ``REPORT_MARKER``, or (written before the marker existed) exactly what
    a report writes: ``index.html`` and PNGs in ``figures/`` and ``gallery/``."""
    if (folder / REPORT_MARKER).is_file():
        return True
    if not (folder / "index.html").is_file():
        return False
    for entry in folder.iterdir():
        if entry.is_symlink():
            return False
        if entry.name == "index.html":
            continue
        if entry.name not in ("figures", "gallery") or not entry.is_dir():
            return False
        if any(p.is_symlink() or not p.is_file() or p.suffix != ".png" for p in entry.iterdir()):
            return False
    return True


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><random>`` in ``parent``, with the permissions ``mkdir`` gives
    under the umask (``tempfile.mkdtemp`` would make the report 0700)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Put the staged report at ``out_dir``; an earlier report there is moved aside first and
    deleted only once the new one is in place."""
    if out_dir.exists() and next(out_dir.iterdir(), None) is not None:
        logger.info("replacing the report in %s", out_dir)
        old = _new_folder(out_dir.parent, f".{out_dir.name}.old.")
        os.replace(out_dir, old)  # onto the empty folder just made
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)  # rename(2) replaces an empty folder


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def gallery_file_name(image_id, used: Set[str]) -> str:
    """``<image id>.png`` for a plain id; other ids (``../../x``, ``a/b``, very long) become a
    plain name (other characters as ``_``), numbered when two would share one. ``used`` holds
    the names taken (compared ignoring case, as some disks do); the new one is added."""
    text = str(image_id)
    stem = text if _PLAIN_NAME.fullmatch(text) else re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    stem = stem.lstrip(".-")[:64] or "image"
    name, number = f"{stem}.png", 1
    while name.lower() in used:
        number += 1
        name = f"{stem}-{number}.png"
    used.add(name.lower())
    return name


def _lesion_names(loaded) -> List[str]:
    """Lesion names from ``<metric>-<lesion>`` keys, when no GT file names them."""
    names = []
    for name, content in loaded.items():
        if name == FROC_FILE:
            names += [n for n in content.get("categories", {}) if n not in names]
            continue
        for values in content.values():
            if isinstance(values, dict):
                for key in values:
                    if "-" in key and key.split("-", 1)[1] not in names:
                        names.append(key.split("-", 1)[1])
    return names


def _assemble(
    eval_dir, report_dir, loaded, lesions, coco_gt, results, image_root, gallery_size,
    score_threshold, title, model,
) -> str:
    figures_dir = report_dir / "figures"
    sections = []
    if INSTANCE_METRICS_FILE in loaded:
        figures = []
        if results is not None:
            task = "segm" if results and "segmentation" in results[0] else "bbox"
            iou = [float(k[2:]) / 100 for k in loaded[INSTANCE_METRICS_FILE].get(task, {})
                   if k[2:].isdigit() and k.startswith("AP")] or list(IOU_THRESHOLDS)
            curves = precision_recall_curves(coco_gt, results, task, iou)
            for name, path in save_instance_pr_curves(curves, figures_dir, task).items():
                caption = f"{name}: precision-recall ({task})"
                figures.append((path.relative_to(report_dir).as_posix(), caption))
        sections.append((
            "Instance detection (COCO AP, percent)",
            metric_tables(INSTANCE_METRICS_FILE, loaded[INSTANCE_METRICS_FILE], lesions),
            figures,
        ))
    froc = loaded.get(FROC_FILE)
    if froc is not None:
        sections.append((
            "Lesion-level FROC",
            froc_tables(froc),
            _drawn_figures(draw_froc_curves, eval_dir / FROC_FILE, froc, figures_dir, report_dir),
        ))
    if SEMANTIC_METRICS_FILE in loaded:
        sections.append((
            "Lesion segmentation (pixels, percent)",
            metric_tables(SEMANTIC_METRICS_FILE, loaded[SEMANTIC_METRICS_FILE], lesions),
            _figures_or_older_pictures(
                draw_semantic_pr_curves, eval_dir / SEMANTIC_PR_CURVES_FILE,
                sorted((eval_dir / PR_CURVE_DIR).glob("*.png")), figures_dir, report_dir,
            ),
        ))
    for name, content in loaded.items():
        if name in _KNOWN:
            continue
        stem = name[: -len(METRICS_SUFFIX)]
        figures = []
        if name == GRADING_METRICS_FILE:
            figures = _figures_or_older_pictures(
                draw_confusion_matrices, eval_dir / GRADING_CONFUSION_FILE,
                sorted(eval_dir.glob(confusion_file("*"))), figures_dir, report_dir,
            )
        sections.append((stem.replace("_", " ").capitalize(),
                         metric_tables(name, content, lesions), figures))
    # The paper's figures beside ours, when the run names its system (PUBLISHED_SYSTEM).
    published = paper_vs_ours_section(eval_dir, loaded, _find_upwards(eval_dir, "config.yaml"))
    if published is not None:
        sections.insert(0, published)

    groups, note = [], ""
    if coco_gt is None or results is None:
        note = (
            f"No gallery: the folder has no predictions ({RESULTS}) or no ground truth "
            f"({EVAL_INFO} or --gt)."
        )
    elif results and "segmentation" not in results[0]:
        note = "No gallery: the predictions carry no masks."
    elif gallery_size > 0:
        threshold, match, iou = _gallery_params(eval_dir, froc)
        if score_threshold is not None:
            threshold = score_threshold
        outcomes = score_images(
            coco_gt, results, score_threshold=threshold, match=match, iou_threshold=iou
        )
        gallery = pick_gallery(outcomes, gallery_size)
        rule = f"mask IoU ≥ {iou}" if match == "iou" else "centre inside"
        note = (
            f"Predictions scoring ≥ {threshold}; a hit is {rule}, as in the FROC table. Images "
            f"with lesions ranked by lesion F1 (all lesion types pooled); healthy eyes (no "
            f"lesion in the ground truth) apart, {gallery.clean_healthy} of them without a "
            f"false alarm. Each picture links to its full-resolution view."
        )
        used: Set[str] = set()
        draw = _GalleryWriter(report_dir, image_root, coco_gt, used)
        groups = [
            {"id": "worst", "heading": "Worst (images with lesions)",
             "pictures": [draw(o) for o in gallery.worst], "empty": "No image has lesions."},
            {"id": "best", "heading": "Best (images with lesions)",
             "pictures": [draw(o) for o in gallery.best],
             "empty": "No other image has lesions."},
            {"id": "healthy", "heading": "False alarms on healthy eyes",
             "pictures": [draw(o) for o in gallery.healthy],
             "empty": "No healthy eye has a false alarm."},
        ]

    config = _find_upwards(eval_dir, "config.yaml")
    env = _find_upwards(eval_dir, "env.txt")
    return render_page(
        title=title,
        eval_dir=str(eval_dir),
        sections=sections,
        gallery_groups=groups,
        colours=COLOURS if groups else None,
        gallery_note=note,
        model=model,
        eval_info_name=EVAL_INFO,
        config_text=config.read_text() if config else None,
        env_text=env.read_text() if env else None,
    )


class _GalleryWriter:
    """Draws one outcome as ``gallery/<name>.png`` (900 px) and ``gallery/full/<name>.png``
    (full resolution) and gives its gallery item."""

    def __init__(self, report_dir: Path, image_root, coco_gt, used: Set[str]):
        self.report_dir, self.image_root, self.coco_gt, self.used = (
            report_dir, image_root, coco_gt, used
        )

    def __call__(self, outcome: ImageOutcome) -> GalleryItem:
        path = Path(self.image_root or "") / outcome.file_name
        try:
            image = read_image(str(path), format="RGB")
        except (OSError, ValueError) as e:
            raise ReportError(f"gallery image {path} cannot be read: {e}") from e
        name = gallery_file_name(outcome.image_id, self.used)
        gallery_dir = self.report_dir / "gallery"
        thumb = draw_outcome(image, outcome, self.coco_gt, gallery_dir / name,
                             full_path=gallery_dir / "full" / name)
        file_name = Path(outcome.file_name).name
        if outcome.num_lesions:
            caption = (
                f"{file_name}: F1 {outcome.f1:.2f}, {len(outcome.hits)} found, "
                f"{len(outcome.misses)} missed, {len(outcome.false_alarms)} false alarms"
            )
        else:
            caption = f"{file_name}: healthy eye, {len(outcome.false_alarms)} false alarms"
        return GalleryItem(
            thumb=thumb.relative_to(self.report_dir).as_posix(),
            full=f"gallery/full/{name}",
            caption=caption,
            image_id=outcome.image_id,
        )


def _scored_model(info: dict) -> Optional[dict]:
    """eval_info.json's ``model`` record with its types checked; None when absent or malformed
    (an evaluation written before it was recorded, or by tools/evaluate.py)."""
    model = info.get("model")
    if not isinstance(model, dict):
        return None
    weights, iteration = model.get("weights"), model.get("iteration")
    if weights is not None and not isinstance(weights, str):
        return None
    if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool)):
        return None
    return {"weights": weights, "iteration": iteration,
            "during_training": bool(model.get("during_training", False))}
