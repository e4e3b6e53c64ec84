"""Synthetic fundus photographs with known lesions: the embedded default dataset (no download).

Without --root, the raw images are generated into ``OUT/raw`` (seeded, --count images of --size
pixels) and converted like any other dataset; with --root, an earlier generation is converted.
Raw layout (see retina_d2/data/synthetic.py)::

    images/synth_0000.png, masks/{MA,HE,EX,SE,OD}/synth_0000.png (0/255),
    grades.csv, landmarks.csv, counts.csv, splits.json
"""
import csv
import os
from pathlib import Path
from typing import Dict, Optional

from ..lesions import lesion_by_abbrev
from ..synthetic import LESION_ABBREVS, generate_dataset
from .base import (
    MANIFEST_NAME,
    REPLACED_MANIFEST_NAME,
    ConversionError,
    ConvertOptions,
    OutputError,
    Sample,
    check_outputs_free,
    convert_samples,
    read_split_file,
    require_dir,
)

DATASET = "synthetic"
CATEGORIES = tuple(lesion_by_abbrev(a).name for a in LESION_ABBREVS)


def add_arguments(parser):
    parser.add_argument("--count", type=int, default=16, help="images to generate")
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.25)


def _read_rows(path: Path) -> Dict[str, dict]:
    with open(path, newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def convert(
    root: Optional[Path],
    out_dir: Path,
    options: ConvertOptions,
    count: int = 16,
    size: int = 512,
    seed: int = 0,
    val_fraction: float = 0.25,
) -> dict:
    """Generate (when ``root`` is None) and convert a synthetic dataset; returns the summary.

    Args:
        root: an existing generation, or None to generate into ``out_dir/raw``.
        out_dir: output folder.
        options: common converter options.
        count, size, seed, val_fraction: generation parameters (ignored with ``root``).
    """
    out_dir = Path(out_dir)
    if root is None:
        check_outputs_free(out_dir, options.overwrite)
        root = out_dir / "raw"
        try:
            if (out_dir / MANIFEST_NAME).is_file():
                # The images are regenerated in place: from here on the old conversion no
                # longer matches them, so its manifest goes (the run removes its files).
                os.replace(out_dir / MANIFEST_NAME, out_dir / REPLACED_MANIFEST_NAME)
            generate_dataset(root, count=count, size=size, seed=seed, val_fraction=val_fraction)
        except OSError as e:
            raise OutputError(f"cannot generate the synthetic images into {root}: {e}") from e
    root = require_dir(Path(root), "a synthetic dataset (images/, masks/, splits.json)")
    images = require_dir(root / "images", "the synthetic images folder")
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        raise ConversionError(f"expected {splits_file} (written by the synthetic generator)")
    grades = _read_rows(root / "grades.csv")
    landmarks = _read_rows(root / "landmarks.csv")
    tasks = {"seg": {}}
    for split, stems in read_split_file(splits_file).items():
        samples = []
        for stem in stems:
            if Path(stem).name != stem or stem in ("", ".", "..") or "\\" in stem:
                raise ConversionError(
                    f"{splits_file}: image name {stem!r} in split {split!r} is not a file name "
                    "in images/"
                )
            fields = {}
            if stem in grades:
                fields["dr_grade"] = int(grades[stem]["dr_grade"])
                fields["dme_grade"] = int(grades[stem]["dme_grade"])
            if stem in landmarks:
                row = landmarks[stem]
                fields["optic_disc_center"] = [float(row["od_x"]), float(row["od_y"])]
                fields["fovea_center"] = [float(row["fovea_x"]), float(row["fovea_y"])]
            masks = {
                lesion_by_abbrev(a).name: root / "masks" / a / f"{stem}.png" for a in LESION_ABBREVS
            }
            samples.append(Sample(image=images / f"{stem}.png", masks=masks, fields=fields))
        tasks["seg"][split] = samples
    return convert_samples(DATASET, tasks, root, out_dir, CATEGORIES, options)
