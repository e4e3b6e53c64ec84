# -*- coding: utf-8 -*-
"""
Readers for the native files of HEI-MED (Hamilton Eye Institute Macular Edema Dataset, formerly
DMED; Giancardo et al., Medical Image Analysis 16(1):216-226, 2012).

Per image ``NAME`` (names may contain parentheses and dots, e.g. ``0907440_(625).dcm``):

* ``NAME.map.gz``: gzip of a label map. Bytes 0-11 are three little-endian int32 ``tag``,
  ``width``, ``height``; then ``width * height`` little-endian int32, row-major. 0 is background,
  k >= 1 is the k-th annotated blob (one lesion instance as the grader drew it).
* ``NAME.GND``: text, CRLF line ends. An optional first line ``GNDVERSION2.0 (INCLUDES NOTES AT
  THE END OF THE FILE)``, then the blob count N, then the N blob labels (``Exudate 1``, ...).
  What follows the labels is image-level and not needed for instance segmentation; per the
  dataset's own ReadGNDFile.m it is: a count C of "relevant characteristics" and C lines; the
  number of manifestations M; the number of states per manifestation plus one (S + 1); M blocks of
  a manifestation name followed by S state lines (e.g. ``NPDR``, ``7: NPDR Severe + CSME``, ...);
  M lines with the state chosen for each manifestation (``1: Absent``); three feature lines; the
  cup-to-disc ratio; and, with GNDVERSION2.0, one line of free-text notes. In the 40-image sample
  39 files carry the empty form (``0``, ``0``, ``0`` then ``NA`` lines) and one carries a filled
  38-manifestation diabetic-retinopathy grading form.
  Across all 169 images the labels are ``Exudate``, ``Other Bright Lesion``, ``MicroAneurysm``,
  ``Cotton Wool Spot``, ``Flame Hemmorhage``, ``Intraretinal Hemmorhage`` (sic), ``Bright Scar``,
  ``Soft Drusen``, ``Basal Laminar Drusen``, ``Artifact`` and ``Fluid without CSME``; see
  :func:`blob_category` for what each becomes.
* ``NAME.meta``: ``~Key~Value`` lines (``ImageName:``, ``PatientGender``, ``PatientRace``,
  ``PatientDOB``, ``QualityValue``, ``DiabetesType``, ``ONrow``, ``ONcol``).

Every reader raises :class:`HeimedFormatError` naming the file and the defect. A missing file is
not a format error: the ``OSError`` from opening it propagates, so that a converter can apply the
dataset's rule that a missing ``.map.gz`` / ``.GND`` means zero blobs.
"""
import gzip
import logging
import math
import os
import re
import zlib
from typing import BinaryIO, Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "HEIMED_CATEGORIES",
    "HeimedFormatError",
    "MAX_MAP_PIXELS",
    "UNKNOWN_LABEL_POLICIES",
    "blob_category",
    "optic_nerve_center",
    "read_blob_categories",
    "read_blob_labels",
    "read_label_map",
    "read_meta",
]

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)

# The project's lesion vocabulary names for the HEI-MED blob labels, in a fixed order that
# converters may use for contiguous category ids.
HEIMED_CATEGORIES: Tuple[str, ...] = (
    "hard exudate",
    "other bright lesion",
    "microaneurysm",
    "haemorrhage",
    "soft exudate",
)

_MAP_HEADER_BYTES = 12
# HEI-MED's maps are image-sized (2196 x 1958 = 4.3 million pixels, 17 MB inflated). A header
# that claims more than this, about 9 times that, is corrupt or hostile: it is refused before
# anything is inflated, so a small .map.gz never inflates into gigabytes of memory.
MAX_MAP_PIXELS = 40_000_000
_INFLATE_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"

# Keys are label names lower-cased with all whitespace removed, so "Other  Bright lesion" and
# "OtherBrightLesion" match too. Haemorrhage spellings are handled by _HAEMORRHAGE_RE instead.
_LABEL_TO_CATEGORY: Dict[str, str] = {
    "exudate": "hard exudate",
    "exudates": "hard exudate",
    "hardexudate": "hard exudate",
    "hardexudates": "hard exudate",
    "otherbrightlesion": "other bright lesion",
    "otherbrightlesions": "other bright lesion",
    "microaneurysm": "microaneurysm",
    "microaneurysms": "microaneurysm",
    "cottonwoolspot": "soft exudate",
    "cottonwoolspots": "soft exudate",
    "softexudate": "soft exudate",
    "softexudates": "soft exudate",
    # Drusen and laser scars are bright findings that are not exudates: exactly what the
    # dataset's own "Other Bright Lesion" gathers.
    "drusen": "other bright lesion",
    "softdrusen": "other bright lesion",
    "basallaminardrusen": "other bright lesion",
    "brightscar": "other bright lesion",
}
# Labels that name no lesion: their blobs become ignore regions, neither lesion nor background.
# An artifact (dust, reflex) is not a lesion. Fluid (retinal thickening) is judged in stereo or
# OCT, not seen as a lesion in one colour photograph, and no vocabulary entry describes it.
_IGNORED_LABELS = frozenset({"artifact", "artifacts", "artefact", "artefacts", "fluidwithoutcsme"})
# What read_blob_categories does with a label it does not know.
UNKNOWN_LABEL_POLICIES = ("ignore", "stop")
# The dataset itself writes "Intraretinal Hemmorhage"; accept every doubling of m / r and both
# the US and the British spelling: hemorrhage, haemorrhage, hemmorhage, hemorhage, hemorrage.
_HAEMORRHAGE_RE = re.compile(r"ha?em+or+h?ages?")
# The last token of a label is 1 for bright and 0 for dark lesions; the category already implies
# it, so it is dropped before matching.
_BRIGHTNESS_DIGIT_RE = re.compile(r"\s*[01]$")
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


class HeimedFormatError(ValueError):
    """
    A HEI-MED file (or label) does not follow the dataset's published format. The message names
    the file and what is wrong with it.
    """


def read_label_map(
    path: PathLike, num_blobs: Optional[int] = None, max_pixels: int = MAX_MAP_PIXELS
) -> np.ndarray:
    """
    Read a HEI-MED blob label map (``NAME.map.gz``).

    The header's ``tag`` is not interpreted: the sample holds -43 in 39 maps and -42 in one, and
    its meaning is not documented. An uncompressed map (no gzip magic) is read the same way,
    because the dataset ships a stray raw ``.map`` beside one ``.map.gz``.

    Args:
        path: the ``.map.gz`` file (or an uncompressed ``.map``).
        num_blobs: if given, the number of blobs in the matching ``.GND``; values above it are
            reported as an error, since they would point at a blob without a label.
        max_pixels: the largest width * height accepted. The data is inflated in chunks and
            never beyond what the header announces, so memory stays within 4 * max_pixels.

    Returns:
        np.ndarray: int32 array of shape (height, width); 0 is background, k >= 1 is blob k.
            The array is a private writable copy.

    Raises:
        HeimedFormatError: corrupt or truncated gzip, short header, non-positive width/height,
            width * height above ``max_pixels``, byte count that does not match width*height,
            negative values, or values above ``num_blobs``.
    """
    path_str = os.fspath(path)
    with open(path_str, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
        header = _read_map_bytes(stream, _MAP_HEADER_BYTES, path_str)
        if len(header) < _MAP_HEADER_BYTES:
            raise HeimedFormatError(
                f"{path_str}: label map header truncated: {len(header)} bytes, "
                f"need {_MAP_HEADER_BYTES} (tag, width, height as little-endian int32)"
            )
        tag, width, height = (int(v) for v in np.frombuffer(header, dtype="<i4", count=3))
        if width <= 0 or height <= 0:
            raise HeimedFormatError(
                f"{path_str}: bad label map header: width={width}, height={height} (tag={tag}); "
                "both must be positive"
            )
        # Python ints: width * height must not overflow for a corrupt but positive header.
        if width * height > max_pixels:
            raise HeimedFormatError(
                f"{path_str}: label map header says {width}x{height} (width x height), "
                f"{width * height} pixels, more than the {max_pixels} a label map may have "
                "(HEI-MED's maps have their image's size); refusing to inflate it"
            )
        expected = 4 * width * height
        # One byte more than announced tells trailing data apart, without inflating all of it.
        payload = _read_map_bytes(stream, expected + 1, path_str)
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "has trailing bytes"
        held = (
            f"holds {_MAP_HEADER_BYTES + len(payload)} bytes"
            if len(payload) < expected
            else "holds more (not inflated further)"
        )
        raise HeimedFormatError(
            f"{path_str}: label map {what}: header says {width}x{height} "
            f"(width x height), i.e. {_MAP_HEADER_BYTES + expected} bytes with the 12-byte "
            f"header, but the data {held}"
        )
    data = header + payload

    # frombuffer is zero-copy; astype gives a writable native-int32 array in one copy.
    label_map = (
        np.frombuffer(data, dtype="<i4", count=width * height, offset=_MAP_HEADER_BYTES)
        .reshape(height, width)
        .astype(np.int32)
    )
    min_value, max_value = int(label_map.min()), int(label_map.max())
    if min_value < 0:
        raise HeimedFormatError(
            f"{path_str}: label map holds negative value {min_value}; "
            "0 is background and blob ids start at 1"
        )
    if num_blobs is not None and max_value > num_blobs:
        raise HeimedFormatError(
            f"{path_str}: label map values go up to {max_value}, "
            f"above the blob count {num_blobs} of its .GND file"
        )
    return label_map


def _read_map_bytes(stream: BinaryIO, size: int, path_str: str) -> bytes:
    """
    Up to ``size`` bytes of a (possibly gzip) stream, read in chunks so that a stream longer
    than announced costs no more memory than ``size``.

    Raises:
        HeimedFormatError: truncated or corrupt gzip data, naming the file.
    """
    chunks, remaining = [], size
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, _INFLATE_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except EOFError as e:
        raise HeimedFormatError(f"{path_str}: truncated gzip stream: {e}") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise HeimedFormatError(f"{path_str}: corrupt gzip data: {e}") from e
    return b"".join(chunks)


def _read_text_lines(path_str: str) -> List[str]:
    """
    Read a small text file as lines, accepting CRLF, LF and CR line ends.

    Args:
        path_str: the file path.

    Returns:
        list[str]: the lines without line terminators; no empty line for the final newline.
    """
    with open(path_str, "rb") as f:
        raw = f.read()
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    # latin-1 never fails: free-text notes after the labels may hold bytes that are not UTF-8,
    # and the fields parsed here are plain ASCII either way.
    lines = re.split(r"\r\n|\r|\n", raw.decode("latin-1"))
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_blob_labels(path: PathLike) -> List[str]:
    """
    Read the blob labels of a HEI-MED ``.GND`` file.

    Args:
        path: the ``.GND`` file (CRLF or LF line ends; an optional first line starting with
            ``GNDVERSION`` is skipped).

    Returns:
        list[str]: N stripped labels, the i-th for blob id i + 1 of the label map, e.g.
            ``'Exudate 1'``. Empty when the count line is 0. Lines after the labels
            (image-level grading form, see the module docstring) are ignored.

    Raises:
        HeimedFormatError: empty file, count line missing or not a non-negative integer,
            fewer label lines than the count, or an empty label line.
    """
    path_str = os.fspath(path)
    lines = _read_text_lines(path_str)
    count_index = 0
    if lines and lines[0].strip().upper().startswith("GNDVERSION"):
        count_index = 1
    if len(lines) <= count_index:
        raise HeimedFormatError(
            f"{path_str}: no blob count line (file has {len(lines)} line(s)); "
            "expected the number of blobs on line 1 (line 2 after a GNDVERSION line)"
        )

    count_text = lines[count_index].strip()
    if not _INTEGER_RE.fullmatch(count_text):
        raise HeimedFormatError(
            f"{path_str}: blob count line {count_index + 1} is {count_text!r}, not an integer"
        )
    num_blobs = int(count_text)
    if num_blobs < 0:
        raise HeimedFormatError(
            f"{path_str}: blob count line {count_index + 1} is negative ({num_blobs})"
        )

    labels = [line.strip() for line in lines[count_index + 1 : count_index + 1 + num_blobs]]
    if len(labels) < num_blobs:
        raise HeimedFormatError(
            f"{path_str}: blob count is {num_blobs} but only {len(labels)} label line(s) follow"
        )
    for blob_index, label in enumerate(labels):
        if not label:
            line_number = count_index + 2 + blob_index
            raise HeimedFormatError(
                f"{path_str}: label of blob {blob_index + 1} (line {line_number}) is empty"
            )
    return labels


def read_meta(path: PathLike) -> Dict[str, str]:
    """
    Read a HEI-MED ``.meta`` file of ``~Key~Value`` lines.

    Args:
        path: the ``.meta`` file.

    Returns:
        dict[str, str]: value (stripped) per key. Keys keep their spelling, including the
            trailing colon of ``ImageName:``; only surrounding whitespace is removed.
            Blank lines are skipped.

    Raises:
        HeimedFormatError: a non-blank line that is not ``~Key~Value``, an empty key, or a key
            that appears twice.
    """
    path_str = os.fspath(path)
    meta: Dict[str, str] = {}
    for line_number, line in enumerate(_read_text_lines(path_str), start=1):
        if not line.strip():
            continue
        # maxsplit=2 keeps any '~' inside the value.
        parts = line.strip().split("~", 2)
        if len(parts) != 3 or parts[0] != "" or not parts[1].strip():
            raise HeimedFormatError(
                f"{path_str}: line {line_number} is {line!r}, expected '~Key~Value'"
            )
        key, value = parts[1].strip(), parts[2].strip()
        if key in meta:
            raise HeimedFormatError(f"{path_str}: key {key!r} repeated on line {line_number}")
        meta[key] = value
    return meta


def optic_nerve_center(meta: Dict[str, str]) -> Optional[Tuple[float, float]]:
    """
    The hand-marked optic-nerve centre of an image.

    Args:
        meta: the dict returned by :func:`read_meta`.

    Returns:
        tuple[float, float] or None: (x, y) = (ONcol, ONrow) in pixels; None when either key
            is absent or its value is not a finite number.
    """
    try:
        x = float(meta["ONcol"])
        y = float(meta["ONrow"])
    except (KeyError, ValueError):
        return None
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return x, y


def blob_category(label: str) -> Optional[str]:
    """
    Map a ``.GND`` blob label to the project's lesion vocabulary.

    Matching is case-insensitive and ignores whitespace; the trailing bright (1) / dark (0)
    digit is dropped. ``Exudate`` -> 'hard exudate'; ``Other Bright Lesion``, ``Soft Drusen``,
    ``Basal Laminar Drusen``, ``Drusen`` and ``Bright Scar`` -> 'other bright lesion' (bright
    findings that are not exudates); ``MicroAneurysm`` -> 'microaneurysm'; any label spelling
    haemorrhage (the dataset's ``Intraretinal Hemmorhage`` and ``Flame Hemmorhage`` included) ->
    'haemorrhage'; ``Cotton Wool Spot`` -> 'soft exudate'. ``Artifact`` and ``Fluid without
    CSME`` name no lesion: None, an ignore region.

    Args:
        label: a label as returned by :func:`read_blob_labels`, e.g. ``'Exudate 1'``.

    Returns:
        str or None: one of :data:`HEIMED_CATEGORIES`, or None for a blob that is neither
            lesion nor background.

    Raises:
        HeimedFormatError: the label is not known; the message names it. The caller decides
            whether to stop or to make the blob an ignore region.
    """
    name = _BRIGHTNESS_DIGIT_RE.sub("", label.strip())
    key = re.sub(r"\s+", "", name.lower())
    category = _LABEL_TO_CATEGORY.get(key)
    if category is not None:
        return category
    if key in _IGNORED_LABELS:
        return None
    if _HAEMORRHAGE_RE.search(key):
        return "haemorrhage"
    raise HeimedFormatError(
        f"unknown HEI-MED blob label {label!r}; known: Exudate, Other Bright Lesion, "
        "MicroAneurysm, any haemorrhage spelling, Cotton Wool Spot, Soft Drusen, Basal Laminar "
        "Drusen, Bright Scar, Artifact, Fluid without CSME"
    )


def read_blob_categories(path: PathLike, unknown: str = "stop") -> List[Optional[str]]:
    """
    Read a ``.GND`` file and map each blob label with :func:`blob_category`.

    Args:
        path: the ``.GND`` file.
        unknown: what a label :func:`blob_category` does not know does: "stop" raises;
            "ignore" logs a warning naming the file, the blob and the label, and makes the blob
            an ignore region (None), as a label that names no lesion is.

    Returns:
        list[str or None]: one name of :data:`HEIMED_CATEGORIES`, or None for an ignore region,
            per blob; the i-th for blob id i + 1.

    Raises:
        HeimedFormatError: as :func:`read_blob_labels`, or an unknown label with
            ``unknown="stop"``; the message then names the file, the blob id and the label.
    """
    if unknown not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_LABEL_POLICIES}, got {unknown!r}")
    path_str = os.fspath(path)
    categories: List[Optional[str]] = []
    for blob_id, label in enumerate(read_blob_labels(path_str), start=1):
        try:
            categories.append(blob_category(label))
        except HeimedFormatError as e:
            if unknown == "stop":
                raise HeimedFormatError(f"{path_str}: blob {blob_id}: {e}") from e
            logger.warning(
                "%s: blob %d: unknown HEI-MED blob label %r: made an ignore region (neither "
                "lesion nor background)", path_str, blob_id, label,
            )
            categories.append(None)
    return categories
