"""Reading fundus photographs: Detectron2's ``read_image``, plus 16-bit greyscale and a file name
in every error.

Detectron2's reader converts a 16-bit greyscale PNG (PIL mode ``I;16``) to RGB by clipping each
value to 0..255, so a photograph whose values span 0..65535 comes out nearly all white: 0/255.
Here such an image is scaled to 8 bit by its type's range (``round(value * 255 / 65535)``) before
the usual conversion; 8-bit images and 16-bit RGB (which PIL itself reduces to 8 bit) read exactly
as Detectron2 reads them. A file that cannot be decoded (truncated, not an image) raises
:class:`ImageReadError` naming it, where PIL's message ("image file is truncated") does not.

Masks are labels, not intensities: :func:`mask_to_8bit` reads a 16-bit mask as nonzero = lesion
(scaling would turn small label values into 0).
"""
import numpy as np
from PIL import Image, ImageOps

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

__all__ = ["ImageReadError", "read_image", "to_8bit", "mask_to_8bit"]

# PIL's modes for 16-bit greyscale (native, little- and big-endian).
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_MAX16 = 65535


class ImageReadError(OSError):
    """An image file that cannot be read; the message names the file. An ``OSError``, as PIL's
    own errors are, so callers that skip unreadable images keep doing so."""


def to_8bit(image: Image.Image, path: str) -> Image.Image:
    """A 16-bit greyscale (or 32-bit integer) PIL image as 8-bit greyscale ("L"), scaled by the
    16-bit range; other images unchanged.

    Raises:
        ImageReadError: integer values outside 0..65535, or a floating-point image (no range to
            scale by).
    """
    if image.mode == "F":
        raise ImageReadError(
            f"{path}: floating-point image; save the photograph as 8- or 16-bit integers"
        )
    if image.mode not in _GREY16 + ("I",):
        return image
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > _MAX16):
        raise ImageReadError(
            f"{path}: {image.mode} image with values {values.min()}..{values.max()}, outside "
            f"0..{_MAX16}; save the photograph as 8- or 16-bit"
        )
    scaled = np.rint(values.astype(np.float64) * (255.0 / _MAX16)).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def read_image(file_name: str, format: str = None) -> np.ndarray:
    """:func:`detectron2.data.detection_utils.read_image`'s array (EXIF orientation applied, in
    ``format``), with 16-bit greyscale scaled to 8 bit as the module docstring says.

    Raises:
        ImageReadError: the file is missing, truncated, or not an image it can decode.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode here: a truncated file fails now, inside this try
            image = ImageOps.exif_transpose(image)
            return utils.convert_PIL_to_numpy(to_8bit(image, file_name), format)
    except ImageReadError:
        raise
    except FileNotFoundError as e:
        raise ImageReadError(f"{file_name}: no such file") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{file_name}: unreadable or truncated image ({e})") from e


def mask_to_8bit(values: np.ndarray) -> np.ndarray:
    """A lesion mask of any integer type as uint8, its meaning kept:

    - values within 0..255 (0/1, 0/255, an ignore value such as 127) stay as they are;
    - an 8-bit mask saved as 16-bit (every value a multiple of 257: 255 -> 65535) is divided by
      257, so its 0 / ignore / lesion codes stay distinct;
    - otherwise a mask with one nonzero value is binary: nonzero = lesion, 255.

    Raises:
        ValueError: negative values, or several distinct values above 255 (a label image, not a
            binary mask); the message gives the values found.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == bool:
        return values.astype(np.uint8)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = values.min(), values.max()
    if low < 0:
        raise ValueError(f"mask values {low}..{high}: negative values in a mask")
    if high <= 255:
        return values.astype(np.uint8)
    if not np.any(values % 257):
        return (values // 257).astype(np.uint8)
    nonzero = np.unique(values[values != 0])
    if nonzero.size == 1:
        return np.where(values != 0, 255, 0).astype(np.uint8)
    more = " ..." if nonzero.size > 8 else ""
    raise ValueError(
        f"{values.dtype} mask with values {nonzero[:8].tolist()}{more} besides 0: expected a "
        "binary mask (0 and one lesion value)"
    )
