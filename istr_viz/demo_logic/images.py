"""Images from the outside world, read safely: size checked from the header, then decoded.

An upload is opened with PIL, which reads only the file header; its width and height are checked
against :class:`ImageLimits` before a single pixel is decoded, so a small file that claims to be a
gigapixel image (a decompression bomb) is refused at once. A picture that passes is decoded as the
data sets decode their files (EXIF orientation, grayscale / palette / RGBA / 16-bit to 8-bit RGB),
then downscaled so that its longer side is at most ``max_side``.

Every refusal is a :class:`~istr_viz.errors.DataError` whose ``one_line()`` names the upload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from istr_viz.errors import DataError
from istr_viz.predictor import image_to_array

# Modes that mean something was converted on the way to RGB: mode -> what the page says.
MODE_NOTES = {
    "1": "black-and-white image, shown and predicted as RGB",
    "L": "grayscale image, shown and predicted as RGB",
    "LA": "grayscale image with transparency: transparency dropped, predicted as RGB",
    "P": "palette image, converted to RGB",
    "PA": "palette image with transparency: transparency dropped, converted to RGB",
    "RGBA": "RGBA image: transparency dropped, predicted as RGB",
    "CMYK": "CMYK image, converted to RGB",
    "I": "32-bit grayscale image, scaled to 8-bit RGB",
    "I;16": "16-bit grayscale image, scaled to 8-bit RGB",
    "F": "floating-point image, scaled to 8-bit RGB",
}


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what an upload may be.

    max_pixels: width x height read from the header above which the file is refused undecoded.
    max_side: the longer side after loading; larger pictures are downscaled to it.
    min_side: the shorter side below which a picture is refused (too small to detect anything).
    max_aspect: longer side / shorter side above which a picture is refused.
    """

    max_pixels: int = 40_000_000
    max_side: int = 1024
    min_side: int = 16
    max_aspect: float = 12.0


@dataclass
class LoadedImage:
    """An image ready for the model: ``array`` (H, W, 3) uint8 RGB and notes for the page."""

    array: np.ndarray
    name: str
    original_size: tuple[int, int]  # (H, W) of the file, before any downscaling
    notes: list[str] = field(default_factory=list)


def check_size(width: int, height: int, limits: ImageLimits, name: str) -> None:
    """Raise :class:`DataError` when a ``width`` x ``height`` picture is out of ``limits``."""
    if width * height > limits.max_pixels:
        raise DataError(
            f"image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels), over "
            f"the limit of {limits.max_pixels / 1e6:.0f} megapixels; it was not decoded",
            file=name)
    if min(width, height) < limits.min_side:
        raise DataError(f"image is {width} x {height} pixels, smaller than "
                        f"{limits.min_side} pixels on a side", file=name)
    if max(width, height) > limits.max_aspect * min(width, height):
        raise DataError(f"image is {width} x {height} pixels, longer than {limits.max_aspect:g} "
                        "times its width or height", file=name)


def downscale(array: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 shrunk (area-averaged) so that its longer side is at most ``max_side``."""
    h, w = array.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BOX))


def load_upload(path: str | Path, limits: ImageLimits = ImageLimits(),
                name: str | None = None) -> LoadedImage:
    """Read an uploaded file as an RGB picture within ``limits``.

    The header is read first (``Image.open`` is lazy) and checked with :func:`check_size`; only
    then are the pixels decoded. ``name`` is what messages call the file (default: its name).

    Raises:
        DataError: not an image PIL can read, truncated or corrupt, or out of ``limits``.
    """
    path = Path(path)
    name = name or path.name
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:  # PIL's own header check, far above ours
        claimed = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise DataError(f"image header claims more than {claimed:.0f} megapixels, over the limit "
                        f"of {limits.max_pixels / 1e6:.0f} megapixels; it was not decoded",
                        file=name) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError("not an image file (PIL cannot identify it; PNG, JPEG, WebP, BMP, TIFF "
                        "and GIF are read)", file=name) from err
    with img:
        width, height = img.size
        check_size(width, height, limits, name)
        mode = img.mode
        try:
            img.draft("RGB", (limits.max_side, limits.max_side))  # JPEG: decode at reduced scale
            img.load()
            array = image_to_array(ImageOps.exif_transpose(img))
        except (OSError, SyntaxError, ValueError, EOFError, struct.error,
                Image.DecompressionBombError) as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            raise DataError(f"image data cannot be decoded ({first or type(err).__name__})",
                            file=name) from err
    return from_array(array, name, limits, notes=mode_notes(mode), original=(height, width))


def mode_notes(mode: str) -> list[str]:
    """What the page says about converting a PIL ``mode`` to RGB (nothing for RGB)."""
    if mode == "RGB":
        return []
    return [MODE_NOTES.get(mode, f"{mode} image, converted to RGB")]


def from_array(array: np.ndarray, name: str, limits: ImageLimits = ImageLimits(),
               notes: list[str] | None = None,
               original: tuple[int, int] | None = None) -> LoadedImage:
    """An in-memory picture (any of ``image_to_array``'s inputs) checked and bounded like an
    upload: (H, W) or (H, W, 3|4) arrays become (H, W, 3) uint8 RGB, downscaled to ``max_side``.
    Without ``notes``, a grayscale (H, W) or (H, W, 1) array or an RGBA one gets the same note
    as a grayscale or RGBA file."""
    if notes is None and isinstance(array, np.ndarray):
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
            notes = mode_notes("L")
        elif array.ndim == 3 and array.shape[2] == 4:
            notes = mode_notes("RGBA")
    array = image_to_array(array)
    h, w = array.shape[:2]
    check_size(w, h, limits, name)
    notes = list(notes or [])
    oh, ow = original or (h, w)
    small = downscale(array, limits.max_side)
    if small.shape[:2] != (h, w):
        notes.append(f"downscaled from {ow} x {oh} to {small.shape[1]} x {small.shape[0]} pixels")
    return LoadedImage(small, name, (oh, ow), notes)


__all__ = ["ImageLimits", "LoadedImage", "check_size", "downscale", "from_array", "load_upload",
           "mode_notes"]
