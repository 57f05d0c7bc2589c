"""Reading one image file into the model's input: the single preprocessing used by preparation and prediction.

Every path that feeds the model an image goes through `load_rgb_image`, so training and prediction can never
disagree on colour mode, resizing or dtype.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Decompression bombs are refused by Pillow with a warning turned error at ~179 MP; real photos stay far below.
Image.MAX_IMAGE_PIXELS = 100_000_000


class UnreadableImage(ValueError):
    """The file cannot serve as a training or prediction image; str() is the reason for the data report."""


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # (size, size, 3) uint8, RGB
    original_mode: str  # Pillow mode before conversion: "RGB", "L", "RGBA", "P", "CMYK", ...
    original_size: tuple[int, int]  # (width, height)


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes: exact duplicates share it, whatever their names."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_rgb_image(path: Path, image_size: int) -> LoadedImage:
    """Decode, fix EXIF orientation, convert any mode to RGB and resize to image_size x image_size.

    Raises UnreadableImage for empty, non-image and truncated files, with the reason.
    """
    if path.stat().st_size == 0:
        raise UnreadableImage("zero-byte file")
    try:
        with Image.open(path) as image:
            image.load()  # forces the full decode, so truncated files fail here and not in training
            original_mode, original_size = image.mode, image.size
            upright = ImageOps.exif_transpose(image)
            rgb = _to_rgb(upright)
            resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"corrupt or truncated image ({error})") from None
    return LoadedImage(np.asarray(resized, dtype=np.uint8), original_mode, original_size)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels are composited on white rather than dropped to black, which would look like disease.
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def blur_score(pixels: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: low means poor focus (Pech-Pacheco et al., 2000)."""
    grey = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32)
    return float(ndimage.laplace(grey).var())


def list_image_files(folder: Path) -> list[Path]:
    """Every file under folder, sorted; non-image suffixes are kept so validation can report them."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
