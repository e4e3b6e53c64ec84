"""Tiny raw datasets in the published layouts, shaped for the paper systems' runs
(``retina-d2 reproduce``): each has the splits its system trains, selects and tests on. They
reuse the converter tests' writers (test_idrid.py, test_ddr.py, test_retinal_lesions.py,
dataset_checks.py)."""
from pathlib import Path

from dataset_checks import random_lesion_mask, write_image, write_mask
from test_ddr import make_ddr
from test_idrid import (
    GRADE_CSV,
    GRADE_HEADER,
    GRADING,
    IMAGES,
    LESION_FOLDERS,
    SEG,
    SEG_TRUTH,
    SPLIT_FOLDERS,
    TRUTH,
    _write_csv,
)
from test_retinal_lesions import make_retinal_lesions

from retina_d2.data.lesions import lesion

__all__ = [
    "make_ddr_layout",
    "make_eophtha_paper_layout",
    "make_idrid_layout",
    "make_retinal_lesions_layout",
]

HEIGHT, WIDTH = 40, 60
# Training images with IDRiD_05 and IDRiD_10, which the committed split carves out as
# validation (retina_d2/data/splits/idrid_val.json), and one official test image.
IDRID_SEG = {"train": ("IDRiD_01", "IDRiD_02", "IDRiD_05", "IDRiD_10"), "test": ("IDRiD_55",)}
# Grading images: IDRiD_005 and IDRiD_010 are validation by the same split file.
IDRID_GRADES = {
    "train": {"IDRiD_001": (2, 1), "IDRiD_002": (0, 0), "IDRiD_003": (4, 2), "IDRiD_004": (1, 0),
              "IDRiD_005": (3, 1), "IDRiD_010": (0, 0)},
    "test": {"IDRiD_001": (3, 2), "IDRiD_002": (0, 0)},
}


def make_idrid_layout(root: Path, grading: bool = False) -> Path:
    """IDRiD part A (every image has all five masks) and, with ``grading``, part B."""
    seed = 0
    for split, stems in IDRID_SEG.items():
        for stem in stems:
            seed += 1
            write_image(root / SEG / IMAGES / SPLIT_FOLDERS[split] / f"{stem}.jpg", HEIGHT, WIDTH,
                        seed=seed)
            for name, folder in LESION_FOLDERS.items():
                seed += 1
                mask = random_lesion_mask(HEIGHT, WIDTH, seed=seed, count=4)
                path = root / SEG / SEG_TRUTH / SPLIT_FOLDERS[split] / folder
                write_mask(path / f"{stem}_{lesion(name).abbrev}.tif", mask, rgb_red=True)
    if grading:
        for split, grades in IDRID_GRADES.items():
            for i, stem in enumerate(grades):
                write_image(root / GRADING / IMAGES / SPLIT_FOLDERS[split] / f"{stem}.jpg",
                            HEIGHT, WIDTH, seed=100 + i)
            rows = [f"{stem},{dr},{dme},," for stem, (dr, dme) in grades.items()]
            _write_csv(root / GRADING / TRUTH / GRADE_CSV[split], [GRADE_HEADER] + rows)
    return root


def make_ddr_layout(parent: Path) -> Path:
    """DDR's lesion_segmentation part: train 2, valid 1, test 1 images (test_ddr.py's)."""
    make_ddr(parent)
    return parent


def make_retinal_lesions_layout(root: Path) -> Path:
    """test_retinal_lesions.py's four images, with split files whose val and test images both
    hold lesions (its own val image has none)."""
    make_retinal_lesions(root)
    base = root / "retinal-lesions-v20191227"
    (base / "train.txt").write_text("10_left\n22_left\n")
    (base / "val.txt").write_text("10_right\n")
    (base / "test.txt").write_text("35_right\n")
    return root


def make_eophtha_paper_layout(root: Path) -> Path:
    """e-ophtha with the published image counts that the paper's split needs (47 EX and 148 MA
    lesion images, one healthy image each), tiny and written fast."""
    for subset, count, suffix in (("EX", 47, "_EX"), ("MA", 148, "")):
        folder = root / f"e_optha_{subset}"
        for i in range(count):
            patient = f"E{i // 10:07d}"
            stem = f"C{subset}{i:05d}"
            write_image(folder / subset / patient / f"{stem}.jpg", HEIGHT, WIDTH, seed=i)
            mask = random_lesion_mask(HEIGHT, WIDTH, seed=1000 + i, count=3, max_radius=3)
            write_mask(folder / f"Annotation_{subset}" / patient / f"{stem}{suffix}.png", mask)
        write_image(folder / "healthy" / "E9999999" / f"H{subset}.jpg", HEIGHT, WIDTH, seed=9)
    return root
