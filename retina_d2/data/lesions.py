"""The lesion vocabulary shared by every dataset: ids, names, abbreviations and colours.

COCO files written by the converters use these ids as ``category_id``, so the same lesion has the
same id in every dataset; each file lists only the categories its dataset annotates, and
Detectron2 maps them to contiguous training ids per dataset.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

__all__ = ["Lesion", "LESIONS", "lesion", "lesion_by_abbrev", "coco_categories", "is_exudate"]


@dataclass(frozen=True)
class Lesion:
    id: int
    name: str  # lower-case words; the COCO category name
    abbrev: str  # the short form datasets use in file and folder names
    color: Tuple[int, int, int]  # RGB for overlays
    bright: bool  # bright lesions (exudates, spots) vs. red/dark ones (MA, haemorrhages)


LESIONS: Tuple[Lesion, ...] = (
    Lesion(1, "microaneurysm", "MA", (255, 64, 64), False),
    Lesion(2, "haemorrhage", "HE", (160, 0, 200), False),
    Lesion(3, "hard exudate", "EX", (255, 220, 0), True),
    # "Soft exudate" and "cotton wool spot" are the same finding under two names.
    Lesion(4, "soft exudate", "SE", (0, 200, 255), True),
    Lesion(5, "optic disc", "OD", (0, 255, 120), True),
    Lesion(6, "other bright lesion", "OBL", (255, 140, 0), True),
    Lesion(7, "vitreous haemorrhage", "VHE", (120, 0, 60), False),
    Lesion(8, "preretinal haemorrhage", "PHE", (200, 0, 120), False),
    Lesion(9, "neovascularization", "NV", (0, 120, 255), False),
    Lesion(10, "fibrous proliferation", "FP", (180, 180, 180), True),
    # DIARETDB1's "IRMA": shunt vessels within the retina, a sign of severe NPDR; no other
    # vocabulary entry describes it.
    Lesion(11, "intraretinal microvascular abnormality", "IRMA", (255, 0, 255), False),
)

_BY_NAME: Dict[str, Lesion] = {les.name: les for les in LESIONS}
_BY_ABBREV: Dict[str, Lesion] = {les.abbrev: les for les in LESIONS}


def lesion(name: str) -> Lesion:
    """Look a lesion up by its vocabulary name (e.g. ``"hard exudate"``).

    Raises:
        KeyError: naming the unknown lesion and the known ones.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown lesion {name!r}; known: {sorted(_BY_NAME)}") from None


def lesion_by_abbrev(abbrev: str) -> Lesion:
    """Look a lesion up by its abbreviation (``"MA"``, ``"EX"``, ...)."""
    try:
        return _BY_ABBREV[abbrev.upper()]
    except KeyError:
        raise KeyError(f"unknown lesion abbreviation {abbrev!r}; known: {sorted(_BY_ABBREV)}") from None


def coco_categories(names: Iterable[str]) -> List[dict]:
    """The COCO ``categories`` list for the given lesion names, ordered by vocabulary id."""
    chosen = sorted({lesion(n) for n in names}, key=lambda les: les.id)
    return [{"id": les.id, "name": les.name, "supercategory": "lesion"} for les in chosen]


def is_exudate(name: str) -> bool:
    """Whether a category name denotes an exudate (hard or soft): the name contains 'exudate'."""
    return "exudate" in name.lower()
