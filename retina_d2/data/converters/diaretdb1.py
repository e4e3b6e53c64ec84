"""DIARETDB1 v2.1 (Kauppi et al., BMVC 2007; Lappeenranta University of Technology) -> COCO.

Layout as published (89 images of 1500x1152, four experts)::

    ddb1_v02_01/images/diaretdb1_image001.png .. diaretdb1_image089.png
    ddb1_v02_01/groundtruth/diaretdb1_image001_01.xml .. _04.xml   (one file per expert)
    ddb1_v02_01/groundtruth/diaretdb1_image001_01_plain.xml ..     (the same without the DTD URL)
    ddb1_v02_01/ddb1_v02_01_train.txt, ddb1_v02_01_test.txt        (28 / 61 images)
    ddb1_v02_01/ddb1_v02_01_train_plain.txt, ..._test_plain.txt

The root may be ``ddb1_v02_01`` or the folder holding it. The official split lists decide what is
converted: each line is ``images/<file> groundtruth/<file>_01.xml ...``, the image and its
experts' files (``--plain`` reads the ``_plain`` lists instead). ``train.json`` and ``test.json``
are written; an image in no list is not converted.

Each expert file is ``imgannotool`` XML: a ``<markinglist>`` of ``<marking>`` elements, each with
one region, a ``<confidencelevel>`` (``High``, ``Medium``, ``Low``) and a ``<markingtype>``:

* ``<circleregion>``: ``<centroid><coords2d>x,y</coords2d></centroid>`` and
  ``<radius direction="x">r</radius>``: the pixels within r of the centre;
* ``<ellipseregion>``: centroid, ``<radius direction="x">``, ``<radius direction="y">`` and
  ``<angle>`` in degrees, by which the x radius's axis is turned from the image's x axis towards
  its y axis (clockwise on screen, as rows run down);
* ``<polygonregion>``: a centroid, then the vertices as ``<coords2d>`` children. Experts'
  polygons can cross themselves; each is made valid with shapely's ``make_valid`` before it is
  drawn, and the summary's notes count the repaired ones.

Coordinates are taken as 0-based pixel positions (x = column, y = row); a pixel belongs to a region
when its centre lies inside or on the outline. ``<representativepoint>`` is not used.

Lesion types: ``Hard_exudates`` -> hard exudate, ``Soft_exudates`` -> soft exudate,
``Haemorrhages`` -> haemorrhage, ``Red_small_dots`` -> microaneurysm, ``Neovascularisation`` ->
neovascularization, ``IRMA`` -> intraretinal microvascular abnormality. ``Disc`` gives the image's
``optic_disc_center``: the mean over the experts who marked the disc of each one's disc centre
(the area-weighted centre of their Disc regions; with ``experts=K`` expert K's alone).
``Fundus_area`` is not a lesion and is not used. A marking type outside this list is warned about
and its regions (any expert, any confidence) become ignore regions of every lesion, or with
``unknown_labels="stop"`` it is an error.

Experts are fused as the dataset's protocol does: per pixel, each expert's confidence (High 1,
Medium 2/3, Low 1/3; the highest of their markings of that type covering it, 0 where none does),
averaged over the image's experts; the lesion is where the mean is >= 0.75 (``min_confidence``).
``experts="union"`` takes every pixel any expert marked, ``experts=K`` expert K's markings
(``<file>_0K.xml``), in both cases at any confidence. Instances are the connected components of
the fused mask of each lesion type (``--connectivity``, ``--min-area`` apply). Each image record
carries ``lesion_labels``: lesion name -> 1 if the fused mask of that type has a pixel (before
``--min-area``), else 0, for all six lesion types.

The COCO categories are those of HEI-MED (microaneurysm, haemorrhage, hard exudate, soft exudate,
other bright lesion, in vocabulary order), so a model trained on HEI-MED evaluates on this
conversion unchanged: the same class count and the same contiguous class ids. DIARETDB1 does not
mark other bright lesions; ``annotated_category_ids`` leaves that category out. With
``all_lesions`` neovascularization and IRMA are instance categories too (seven classes).
"""
import functools
import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import ConversionError, ConvertOptions, Sample, convert_samples, require_dir
from .heimed_io import HEIMED_CATEGORIES, UNKNOWN_LABEL_POLICIES

__all__ = [
    "DATASET",
    "CATEGORIES",
    "MARKING_LESIONS",
    "Region",
    "Marking",
    "add_arguments",
    "convert",
    "read_expert_file",
    "fuse_markings",
    "optic_disc_center",
]

logger = logging.getLogger(__name__)

DATASET = "diaretdb1"
DATASET_FOLDER = "ddb1_v02_01"
SPLIT_LISTS = {"train": "ddb1_v02_01_train.txt", "test": "ddb1_v02_01_test.txt"}
PLAIN_SPLIT_LISTS = {"train": "ddb1_v02_01_train_plain.txt", "test": "ddb1_v02_01_test_plain.txt"}

# The marking types that are lesions, and their vocabulary names.
MARKING_LESIONS: Dict[str, str] = {
    "Hard_exudates": "hard exudate",
    "Soft_exudates": "soft exudate",
    "Haemorrhages": "haemorrhage",
    "Red_small_dots": "microaneurysm",
    "Neovascularisation": "neovascularization",
    "IRMA": "intraretinal microvascular abnormality",
}
DISC = "Disc"
NOT_LESIONS = ("Fundus_area",)
# Confidence in thirds, so that the fused mean is compared exactly (0.75 of four experts is 9/12).
CONFIDENCE_THIRDS = {"High": 3, "Medium": 2, "Low": 1}
DEFAULT_MIN_CONFIDENCE = 0.75

# HEI-MED's categories: a model trained there has these classes, in this (vocabulary) order.
CATEGORIES: Tuple[str, ...] = HEIMED_CATEGORIES
ANNOTATED: Tuple[str, ...] = ("microaneurysm", "haemorrhage", "hard exudate", "soft exudate")
EXTRA_CATEGORIES: Tuple[str, ...] = ("neovascularization", "intraretinal microvascular abnormality")

REGION_TAGS = ("circleregion", "ellipseregion", "polygonregion")
_EXPERT_NUMBER_RE = re.compile(r"_(\d+)(?:_plain)?\.xml$", re.IGNORECASE)


@dataclass(frozen=True)
class Region:
    """One drawn region. ``kind`` is "circle", "ellipse" or "polygon"; ``radii`` = (rx, ry) for
    circles (rx == ry) and ellipses; ``polygon`` the valid shapely geometry of a polygon."""

    kind: str
    center: Tuple[float, float]
    radii: Tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0  # degrees
    polygon: object = None

    def area_and_centroid(self) -> Tuple[float, Tuple[float, float]]:
        """The region's area and centre in pixels, computed from its geometry (not clipped)."""
        if self.kind == "polygon":
            centroid = self.polygon.centroid
            return float(self.polygon.area), (float(centroid.x), float(centroid.y))
        return math.pi * self.radii[0] * self.radii[1], self.center

    def bounds(self) -> Tuple[float, float, float, float]:
        """(x0, y0, x1, y1) enclosing the region."""
        if self.kind == "polygon":
            return tuple(float(v) for v in self.polygon.bounds)
        reach = max(self.radii)
        return (self.center[0] - reach, self.center[1] - reach,
                self.center[0] + reach, self.center[1] + reach)

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether each pixel centre (xs, ys) lies inside or on the region's outline."""
        if self.kind == "polygon":
            import shapely

            return shapely.intersects_xy(self.polygon, xs, ys)
        dx, dy = xs - self.center[0], ys - self.center[1]
        theta = math.radians(self.angle)
        # Coordinates along the ellipse's own axes (a circle's angle is 0).
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        rx, ry = self.radii
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    def mask(self, height: int, width: int) -> Tuple[Tuple[slice, slice], np.ndarray]:
        """The region drawn in its bounding window of the image: (window, bool mask)."""
        x0, y0, x1, y1 = self.bounds()
        cols = slice(max(0, math.floor(x0)), min(width, math.ceil(x1) + 1))
        rows = slice(max(0, math.floor(y0)), min(height, math.ceil(y1) + 1))
        if cols.start >= cols.stop or rows.start >= rows.stop:
            return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), bool)
        ys, xs = np.mgrid[rows, cols]
        return (rows, cols), self.contains(xs.astype(np.float64), ys.astype(np.float64))


@dataclass(frozen=True)
class Marking:
    """One ``<marking>``: its region, confidence (in thirds: High 3, Medium 2, Low 1) and type."""

    region: Region
    confidence: int
    marking_type: str


@dataclass
class ExpertFile:
    """The markings of one expert's file, and what reading it found."""

    path: Path
    expert: Optional[int]  # K of <file>_0K.xml
    markings: List[Marking] = field(default_factory=list)
    polygons_repaired: int = 0
    polygons_without_area: int = 0
    unknown_types: List[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the XML


def _error(path: Path, what: str, marking: Optional[int] = None) -> ConversionError:
    where = f"{path}: marking {marking}: " if marking is not None else f"{path}: "
    return ConversionError(where + what)


def _text(element: Optional[ET.Element]) -> Optional[str]:
    return element.text.strip() if element is not None and element.text else None


def _point(element: Optional[ET.Element], path: Path, index: int, what: str) -> Tuple[float, float]:
    text = _text(element)
    try:
        x, y = (float(v) for v in (text or "").split(","))
    except ValueError:
        raise _error(path, f"{what} is {text!r}, expected 'x,y'", index) from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise _error(path, f"{what} is {text!r}, not finite", index)
    return x, y


def _number(element: Optional[ET.Element], path: Path, index: int, what: str) -> float:
    text = _text(element)
    try:
        value = float(text or "")
    except ValueError:
        raise _error(path, f"{what} is {text!r}, expected a number", index) from None
    if not math.isfinite(value):
        raise _error(path, f"{what} is {text!r}, not finite", index)
    return value


def _radius(region: ET.Element, direction: str, path: Path, index: int) -> float:
    found = [r for r in region.findall("radius") if r.get("direction", "x") == direction]
    if len(found) != 1:
        raise _error(
            path, f"<{region.tag}> needs one <radius direction=\"{direction}\">, found "
            f"{len(found)}", index,
        )
    radius = _number(found[0], path, index, f"radius {direction}")
    if radius <= 0:
        raise _error(path, f"radius {direction} is {radius}, must be positive", index)
    return radius


def _polygon(region: ET.Element, path: Path, index: int) -> Tuple[object, bool]:
    """The valid shapely geometry of a ``<polygonregion>`` and whether it had to be repaired."""
    import shapely
    from shapely.geometry import Polygon

    vertices = [
        _point(c, path, index, f"vertex {i}")
        for i, c in enumerate(region.findall("coords2d"), start=1)  # not the centroid's
    ]
    if len(vertices) < 3:
        return Polygon(), False
    polygon = Polygon(vertices)
    if polygon.is_valid:
        return polygon, False
    # make_valid may add the lines of collapsed parts: only the areas are drawn.
    valid = shapely.make_valid(polygon)
    pieces = getattr(valid, "geoms", [valid])
    parts = [g for g in pieces if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else Polygon(), True


def _region(marking: ET.Element, path: Path, index: int) -> Tuple[Region, bool]:
    """The one region of a ``<marking>`` and whether its polygon was repaired."""
    regions = [child for child in marking if child.tag in REGION_TAGS]
    if len(regions) != 1:
        found = [child.tag for child in marking]
        raise _error(
            path, f"expected one of <{'>, <'.join(REGION_TAGS)}>, found {found}", index
        )
    element = regions[0]
    center = _point(element.find("centroid/coords2d"), path, index, "centroid")
    if element.tag == "circleregion":
        radius = _radius(element, "x", path, index)
        return Region("circle", center, (radius, radius)), False
    if element.tag == "ellipseregion":
        radii = (_radius(element, "x", path, index), _radius(element, "y", path, index))
        angle = _number(element.find("angle"), path, index, "angle")
        return Region("ellipse", center, radii, angle), False
    polygon, repaired = _polygon(element, path, index)
    return Region("polygon", center, polygon=polygon), repaired


def read_expert_file(path: Path, unknown_labels: str = "ignore") -> ExpertFile:
    """
    Read one expert's ``imgannotool`` ground-truth file.

    Args:
        path: ``groundtruth/<file>_0K.xml`` (or its ``_plain`` twin).
        unknown_labels: a marking type outside :data:`MARKING_LESIONS`, ``Disc`` and
            ``Fundus_area`` is kept with a warning naming the file, the marking and the type
            ("ignore"; it becomes an ignore region), or is an error ("stop").

    Returns:
        ExpertFile: the markings in file order; polygons made valid.

    Raises:
        ConversionError: a file that is not valid XML or not imgannotool ground truth, or a
            marking without one region, a known confidence level, a type or readable numbers;
            the message names the file (and the marking, counted from 1).
    """
    path = Path(path)
    try:
        # ElementTree resolves no external entity: the DOCTYPE's DTD URL is never fetched.
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise _error(path, f"not valid XML ({e})") from None
    except OSError as e:
        raise _error(path, f"unreadable ({e.strerror or e})") from None
    if root.tag != "imgannotooldata":
        raise _error(path, f"root element is <{root.tag}>, expected <imgannotooldata>")
    marking_list = root.find("markinglist")
    if marking_list is None:
        raise _error(path, "no <markinglist>: not imgannotool ground truth")
    number = _EXPERT_NUMBER_RE.search(path.name)
    expert = ExpertFile(path, int(number.group(1)) if number else None)
    for index, element in enumerate(marking_list.findall("marking"), start=1):
        marking_type = _text(element.find("markingtype"))
        if not marking_type:
            raise _error(path, "no <markingtype>", index)
        level = _text(element.find("confidencelevel"))
        if level not in CONFIDENCE_THIRDS:
            raise _error(
                path, f"confidence level {level!r}, expected one of {list(CONFIDENCE_THIRDS)}",
                index,
            )
        known = marking_type in MARKING_LESIONS or marking_type in (DISC,) + NOT_LESIONS
        if not known:
            if unknown_labels == "stop":
                raise _error(path, f"unknown DIARETDB1 marking type {marking_type!r}", index)
            logger.warning(
                "%s: marking %d: unknown DIARETDB1 marking type %r: made an ignore region "
                "(neither lesion nor background)", path, index, marking_type,
            )
            expert.unknown_types.append(marking_type)
        if marking_type in NOT_LESIONS:
            continue  # not drawn: a polygon here could be large, and nothing reads it
        region, repaired = _region(element, path, index)
        expert.polygons_repaired += int(repaired)
        if region.kind == "polygon" and region.polygon.area == 0:
            logger.warning(
                "%s: marking %d: a %s polygon that encloses no area: not drawn",
                path, index, marking_type,
            )
            expert.polygons_without_area += 1
            continue
        expert.markings.append(Marking(region, CONFIDENCE_THIRDS[level], marking_type))
    return expert


# ---------------------------------------------------------------- fusing experts


def _confidence_map(markings: Sequence[Marking], height: int, width: int) -> np.ndarray:
    """One expert's confidence (in thirds) per pixel: the highest of the markings covering it."""
    confidence = np.zeros((height, width), np.uint8)
    for marking in markings:
        window, inside = marking.region.mask(height, width)
        if inside.any():
            view = confidence[window]
            np.maximum(view, np.where(inside, marking.confidence, 0).astype(np.uint8), out=view)
    return confidence


def fuse_markings(
    experts: Sequence[ExpertFile],
    marking_types: Sequence[str],
    height: int,
    width: int,
    experts_mode: Union[str, int] = "mean",
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> np.ndarray:
    """
    The fused mask of some marking types over an image's experts.

    Args:
        experts: the image's expert files.
        marking_types: the marking types drawn (e.g. ``["Hard_exudates"]``).
        height, width: the image's size.
        experts_mode: "mean" (mean confidence >= min_confidence), "union" (any expert, any
            confidence) or an expert number K (expert K's markings, any confidence).
        min_confidence: the mean confidence a pixel needs with "mean".

    Returns:
        np.ndarray: bool (height, width).
    """
    chosen = list(experts)
    if experts_mode not in ("mean", "union"):
        chosen = [e for e in experts if e.expert == experts_mode]
    total = np.zeros((height, width), np.uint16)
    if not chosen:
        return total > 0
    for expert in chosen:
        markings = [m for m in expert.markings if m.marking_type in marking_types]
        total += _confidence_map(markings, height, width)
    if experts_mode != "mean":
        return total > 0
    # In thirds, with a margin below float rounding: 0.75 of 4 experts is exactly 9.
    needed = min_confidence * 3 * len(chosen)
    return total >= needed - 1e-6


def optic_disc_center(experts: Sequence[ExpertFile]) -> Optional[List[float]]:
    """
    The consensus optic-disc centre [x, y]: the mean over the experts who marked ``Disc`` of each
    one's disc centre (the area-weighted centre of that expert's Disc regions); None if nobody
    marked it.
    """
    centers = []
    for expert in experts:
        regions = [m.region.area_and_centroid() for m in expert.markings if m.marking_type == DISC]
        total = sum(area for area, _ in regions)
        if total > 0:
            centers.append([sum(a * c[i] for a, c in regions) / total for i in (0, 1)])
    if not centers:
        return None
    return [float(np.mean([c[0] for c in centers])), float(np.mean([c[1] for c in centers]))]


# ---------------------------------------------------------------- the dataset


@dataclass
class _Listed:
    """One line of a split list."""

    image: Path
    expert_files: List[Path]
    line: str  # "<list file>, line N" for messages


def find_root(root: Path) -> Path:
    """``ddb1_v02_01`` itself, or the folder holding it."""
    root = require_dir(Path(root), "the DIARETDB1 folder (ddb1_v02_01)")
    if not (root / SPLIT_LISTS["train"]).is_file() and (root / DATASET_FOLDER).is_dir():
        return root / DATASET_FOLDER
    return root


def _inside(root: Path, text: str, where: str) -> Path:
    """A path of a split list: relative, inside the root."""
    relative = PurePosixPath(text.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ConversionError(f"{where}: {text!r} is not a path inside the dataset folder")
    return root / Path(*relative.parts)


def read_split_list(root: Path, path: Path) -> List[_Listed]:
    """
    Read an official split list: one ``images/<file> groundtruth/<file>_0K.xml ...`` per line.

    Raises:
        ConversionError: a missing list, a line without expert files, or a path outside the
            dataset folder; the message names the list and the line.
    """
    if not path.is_file():
        raise ConversionError(f"expected the DIARETDB1 split list at {path}, but no such file")
    listed = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}, line {number}"
        if len(tokens) < 2:
            raise ConversionError(f"{where}: {line.strip()!r} lists no expert ground-truth file")
        listed.append(
            _Listed(
                image=_inside(root, tokens[0], where),
                expert_files=[_inside(root, t, where) for t in tokens[1:]],
                line=where,
            )
        )
    return listed


class _Conversion:
    """The DIARETDB1 conversion's choices and the counts its summary notes report."""

    def __init__(self, experts: Union[str, int], min_confidence: float, all_lesions: bool,
                 unknown_labels: str):
        self.experts = experts
        self.min_confidence = min_confidence
        self.categories = CATEGORIES + (EXTRA_CATEGORIES if all_lesions else ())
        self.annotated = ANNOTATED + (EXTRA_CATEGORIES if all_lesions else ())
        self.unknown_labels = unknown_labels
        self.polygons_repaired = 0
        self.polygons_without_area = 0
        self.unknown_markings = 0

    def sample(self, listed: _Listed) -> Sample:
        """The sample of one listed image; a bad or missing file becomes its ``error``."""
        sample = Sample(image=listed.image, annotated=self.annotated)
        try:
            experts = self._read_experts(listed)
        except ConversionError as e:
            sample.error = str(e)
            return sample
        # One chosen expert gives the landmark alone; otherwise every expert has a say.
        chosen = [e for e in experts if self.experts in ("mean", "union", e.expert)]
        center = optic_disc_center(chosen)
        if center is not None:
            sample.fields["optic_disc_center"] = center
        sample.mask_arrays = functools.partial(self._masks, experts, sample)
        return sample

    def _read_experts(self, listed: _Listed) -> List[ExpertFile]:
        missing = [p for p in [listed.image] + listed.expert_files if not p.is_file()]
        if missing:
            raise ConversionError(f"{missing[0]}: missing (listed in {listed.line})")
        experts = [read_expert_file(p, self.unknown_labels) for p in listed.expert_files]
        if self.experts not in ("mean", "union") and not any(
            e.expert == self.experts for e in experts
        ):
            raise ConversionError(
                f"{listed.line}: no ground truth of expert {self.experts} "
                f"(groundtruth/<file>_{self.experts:02d}.xml) for {listed.image.name}"
            )
        for expert in experts:
            self.polygons_repaired += expert.polygons_repaired
            self.polygons_without_area += expert.polygons_without_area
            self.unknown_markings += len(expert.unknown_types)
        return experts

    def _masks(self, experts: List[ExpertFile], sample: Sample) -> Dict[str, tuple]:
        """Lesion name -> (fused mask, ignore mask); fills the record's ``lesion_labels``."""
        from PIL import Image

        with Image.open(sample.image) as img:
            width, height = img.size
        unknown = sorted({t for e in experts for t in e.unknown_types})
        # Unknown types: anything any expert drew, at any confidence.
        ignore = fuse_markings(experts, unknown, height, width, "union") if unknown else None
        masks, labels = {}, {}
        for marking_type, name in MARKING_LESIONS.items():
            fused = fuse_markings(
                experts, [marking_type], height, width, self.experts, self.min_confidence
            )
            labels[name] = int(fused.any())
            if name in self.annotated:
                masks[name] = (fused, ignore)
        # Filled here, where the masks are drawn: base reads all masks before it builds the record.
        sample.fields["lesion_labels"] = labels
        return masks

    def notes(self) -> dict:
        fusion = (
            f"mean expert confidence >= {self.min_confidence:g}" if self.experts == "mean"
            else "any expert's marking" if self.experts == "union"
            else f"expert {self.experts}'s markings"
        )
        return {
            "fusion": fusion,
            "polygons_repaired": self.polygons_repaired,
            "polygons_without_area": self.polygons_without_area,
            "unknown_markings": self.unknown_markings,
        }


def parse_experts(text: str) -> Union[str, int]:
    """``--experts``: "mean", "union" or an expert number."""
    if text in ("mean", "union"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--experts takes mean, union or an expert number (1-4), got {text!r}")


def _experts_arg(text: str) -> Union[str, int]:
    import argparse

    try:
        return parse_experts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _confidence_arg(text: str) -> float:
    import argparse

    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--min-confidence lies in (0, 1], got {text}")
    return value


def add_arguments(parser) -> None:
    """DIARETDB1's flags: expert fusion, the _plain lists, the extra lesion types."""
    parser.add_argument(
        "--experts",
        type=_experts_arg,
        default="mean",
        metavar="mean|union|K",
        help="fuse the experts by mean confidence (High 1, Medium 2/3, Low 1/3) >= "
        "--min-confidence (default, the dataset's protocol), take any expert's marking (union), "
        "or expert K's markings only",
    )
    parser.add_argument(
        "--min-confidence",
        type=_confidence_arg,
        default=DEFAULT_MIN_CONFIDENCE,
        help="mean confidence a pixel needs with --experts mean (default 0.75)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="read the _plain split lists (ground truth without the DTD URL)",
    )
    parser.add_argument(
        "--all-lesions",
        action="store_true",
        help="neovascularization and IRMA become instance categories too (7 classes instead of "
        "HEI-MED's 5, so a HEI-MED model no longer evaluates on it unchanged)",
    )


def convert(
    root: Path,
    out_dir: Path,
    options: Optional[ConvertOptions] = None,
    experts: Union[str, int] = "mean",
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    plain: bool = False,
    all_lesions: bool = False,
    unknown_labels: str = "ignore",
) -> dict:
    """
    Convert DIARETDB1 v2.1's official train and test lists.

    Args:
        root: ``ddb1_v02_01`` or the folder holding it.
        out_dir: output folder (see :mod:`.base`).
        options: common converter options; default :class:`ConvertOptions`.
        experts: "mean", "union" or an expert number (see the module docstring).
        min_confidence: the fused mean confidence a lesion pixel needs with "mean".
        plain: read the ``_plain`` lists and files.
        all_lesions: also convert neovascularization and IRMA as instance categories.
        unknown_labels: an unknown marking type warns and becomes an ignore region ("ignore")
            or stops the run ("stop"; skips the image with ``options.on_error="skip"``).

    Returns:
        dict: the summary written to ``summary.json``; its ``notes`` give the fusion and the
            numbers of repaired polygons, polygons without area and unknown markings.

    Raises:
        ConversionError: a missing folder or split list, an image in both lists, or (with
            ``on_error="stop"``) the first bad image or ground-truth file, named.
    """
    options = options if options is not None else ConvertOptions()
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(
            f"unknown_labels must be one of {UNKNOWN_LABEL_POLICIES}, got {unknown_labels!r}"
        )
    if isinstance(experts, str):
        experts = parse_experts(experts)
    if not 0 < min_confidence <= 1:
        raise ValueError(f"min_confidence lies in (0, 1], got {min_confidence}")
    root = find_root(root)
    conversion = _Conversion(experts, min_confidence, all_lesions, unknown_labels)
    lists = PLAIN_SPLIT_LISTS if plain else SPLIT_LISTS
    seen: Dict[Path, str] = {}
    splits = {}
    for split, name in lists.items():
        listed = read_split_list(root, root / name)
        for item in listed:
            if item.image in seen:
                raise ConversionError(
                    f"{item.line}: {item.image.name} is listed again (first in {seen[item.image]})"
                )
            seen[item.image] = item.line
        splits[split] = [conversion.sample(item) for item in listed]
    return convert_samples(
        DATASET, {"seg": splits}, root, out_dir, conversion.categories, options,
        notes=conversion.notes,
    )
