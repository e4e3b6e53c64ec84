"""The report's pictures, each drawn from numbers an evaluator wrote (the evaluators write no
pictures): instance PR curves from COCOeval's arrays, FROC curves from ``froc.json``, pixel PR
curves from ``semantic_pr_curves.json`` and confusion matrices from ``grading_confusion.json``."""
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..evaluation.froc import file_slug, rate_name  # noqa: E402
from ..schema import confusion_file, froc_plot_file  # noqa: E402

__all__ = [
    "draw_confusion_matrices",
    "draw_froc_curves",
    "draw_semantic_pr_curves",
    "save_instance_pr_curves",
]

# A graded task's name on its confusion matrix; others show their field name.
GRADE_TITLES = {"dr_grade": "DR grade", "dme_grade": "macular-oedema risk"}


def save_instance_pr_curves(
    curves: Mapping[str, Mapping[float, Tuple[np.ndarray, np.ndarray]]],
    out_dir: Path,
    task: str = "segm",
) -> Dict[str, Path]:
    """``<task>_pr_<lesion>.png`` per lesion type, a line per IoU threshold; name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, per_iou in curves.items():
        figure, axes = plt.subplots(figsize=(4.2, 3.6), dpi=100)
        for threshold, (recall, precision) in per_iou.items():
            axes.step(recall, precision, where="post", label=f"IoU {threshold:g}")
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axes.set_title(f"{name} ({task})")
        axes.grid(alpha=0.3)
        # Below the axes: inside, the legend covered the curves' high-precision end.
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=8,
                    frameon=False)
        path = out_dir / f"{task}_pr_{file_slug(name)}.png"
        figure.savefig(path, bbox_inches="tight")
        plt.close(figure)
        paths[name] = path
    return paths


def _new_figure(size: Tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: no pyplot state, nothing to close."""
    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def draw_froc_curves(froc: Mapping, out_dir: Path) -> List[Path]:
    """``froc_<lesion>.png`` per category of a ``froc.json`` with lesions and images: sensitivity
    against FPs per image (log2 axis) through every operating point, the standard rates marked.
    Returns the paths written."""
    rates = [float(r) for r in froc["params"]["fp_rates"]]
    low, high = min(rates) / 2, max(rates) * 2
    paths = []
    for name, curve in froc["categories"].items():
        if not curve["num_lesions"] or not curve["num_images"]:
            continue
        figure = _new_figure((5, 4))
        ax = figure.add_subplot(1, 1, 1)
        sensitivity = [float(v) for v in curve["sensitivity"]]
        # Start at (0 FPs, 0 found), clipped to the log axis; a step holds until the next point.
        xs = np.clip(np.r_[0.0, np.asarray(curve["fps_per_image"], float), high], low, high)
        ys = np.r_[0.0, sensitivity, sensitivity[-1:] or [0.0]]
        ax.step(xs, ys, where="post", label="operating points")
        at_rates = [np.nan if v is None else v for v in curve["sensitivity_at"].values()]
        ax.plot(rates, at_rates, "o", label="standard rates")
        ax.set_xscale("log", base=2)
        ax.set_xlim(low, high)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(rates)
        ax.set_xticklabels([rate_name(r) for r in rates])
        ax.set_xlabel("false positives per image")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{name}: FROC {curve['froc'] * 100:.1f}% ({curve['num_lesions']} lesions)")
        ax.grid(True, alpha=0.3)
        # Below the axes, not on them: inside, it hid the curve's end (high FP rates).
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        paths.append(_save(figure, out_dir / froc_plot_file(file_slug(name)), bbox_inches="tight"))
    return paths


def draw_semantic_pr_curves(curves: Mapping[str, Mapping], out_dir: Path) -> List[Path]:
    """``pr_<lesion>.png`` per lesion of a ``semantic_pr_curves.json``: the step function whose
    area is the AUC-PR (P_n held on (R_{n-1}, R_n]), read at the file's recall levels."""
    paths = []
    for lesion, curve in curves.items():
        recall = np.asarray(curve["recall"], dtype=float)
        precision = np.asarray(curve["precision"], dtype=float)
        if recall.size == 0 or recall.shape != precision.shape:
            raise ValueError(f"{lesion}: recall and precision must be lists of one length")
        figure = _new_figure((5, 5))
        axes = figure.add_subplot()
        # "pre" steps, starting from recall 0 at the first point's precision.
        axes.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre")
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axes.set_title(f"{lesion}: AUC-PR {float(curve['auc_pr']):.4f}")
        axes.grid(alpha=0.3)
        paths.append(_save(figure, out_dir / f"pr_{file_slug(lesion)}.png"))
    return paths


def draw_confusion_matrices(confusions: Mapping[str, Mapping], out_dir: Path) -> List[Path]:
    """``confusion_<task>.png`` per task of a ``grading_confusion.json`` (row = true grade,
    column = predicted), the counts written in the cells."""
    paths = []
    for task, entry in confusions.items():
        matrix = np.asarray(entry["matrix"], dtype=np.int64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
            raise ValueError(f"{task}: the confusion matrix must be square, got {matrix.shape}")
        num, top = matrix.shape[0], max(1, int(matrix.max()))
        figure = _new_figure((1.2 + 0.8 * num, 1.0 + 0.8 * num))
        ax = figure.add_subplot(1, 1, 1)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        for i in range(num):
            for j in range(num):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                        color="white" if matrix[i, j] > 0.6 * top else "black")
        ax.set_xticks(range(num))
        ax.set_yticks(range(num))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        title = GRADE_TITLES.get(task, task.replace("_", " "))
        ax.set_title(f"{title} ({int(matrix.sum())} images)")
        figure.tight_layout()
        paths.append(_save(figure, out_dir / confusion_file(file_slug(task))))
    return paths


def _save(figure: Figure, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", **kwargs)
    return path
