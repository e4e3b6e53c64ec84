"""Instance precision-recall curves per lesion type, one PNG each, from COCOeval's arrays."""
from pathlib import Path
from typing import Dict, Mapping, Tuple

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..evaluation.froc import file_slug  # noqa: E402

__all__ = ["save_instance_pr_curves"]


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
