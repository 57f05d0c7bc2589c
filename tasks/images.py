"""Reading one image file into the model's input: the single preprocessing used by preparation and prediction.

Every path that feeds the model an image goes through `load_rgb_image`, so training and prediction can never
disagree on colour mode, resizing or dtype. Every Pillow mode is brought to 8-bit RGB with its own scaling
(16-bit and 32-bit grey by their range, not clipped; float by its range; alpha composited on white; CMYK,
palette, bilevel, YCbCr, HSV and LAB by colour conversion). Pillow's decompression-bomb limit
(`Image.MAX_IMAGE_PIXELS`, about 89 megapixels) is kept, and even its warning range is refused: a file
whose header claims more pixels is skipped as a bomb without being decoded. Large JPEGs are decoded at a
reduced scale (`draft`), so a 48-megapixel photo costs a fraction of its full size in memory.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from scipy import ndimage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class UnreadableImage(ValueError):
    """The file cannot serve as a training or prediction image; str() is the reason for the data report and
    `kind` its category (zero-byte, unreadable-file, not-an-image, truncated, corrupt, decompression-bomb,
    too-small, unsupported-mode)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # (size, size, 3) uint8, RGB
    original_mode: str  # Pillow mode before conversion: "RGB", "L", "I;16", "RGBA", "P", "CMYK", ...
    original_size: tuple[int, int]  # (width, height)
    notes: tuple[tuple[str, str], ...] = ()  # (kind, note), kept but worth a look: "very-large", "upscaled"


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes: exact duplicates share it, whatever their names."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise UnreadableImage("unreadable-file", f"cannot read the file ({error.strerror or error})") from None


def load_rgb_image(path: Path, image_size: int, min_side: int = 1, large_megapixels: float = math.inf) -> LoadedImage:
    """Decode, fix EXIF orientation, convert any mode to 8-bit RGB and resize to image_size x image_size.

    Raises UnreadableImage, with the reason and its kind, for files that cannot or should not be used:
    empty, unreadable, not an image, truncated, corrupt, decompression bombs, a side below `min_side`.
    Images above `large_megapixels` or smaller than `image_size` are kept with a note.
    """
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("zero-byte", "zero-byte file")
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                original_mode, original_size = image.mode, image.size
                notes = _size_notes(original_size, image_size, min_side, large_megapixels)
                image.draft(None, (image_size, image_size))  # JPEG: decode at 1/2..1/8 scale, still >= image_size
                image.load()  # forces the full decode, so truncated files fail here and not in training
                upright = ImageOps.exif_transpose(image)
                rgb = to_rgb(upright)
                resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's message names the pixel count the header claims and the limit; nothing was decoded.
        raise UnreadableImage("decompression-bomb", f"decompression bomb, not decoded: {error}") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not-an-image", "not an image (unrecognised format)") from None
    except (PermissionError, FileNotFoundError, IsADirectoryError) as error:
        raise UnreadableImage("unreadable-file", f"cannot read the file ({error.strerror or error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if "truncated" in str(error) or isinstance(error, EOFError):
            raise UnreadableImage("truncated", f"truncated image ({error})") from None
        raise UnreadableImage("corrupt", f"corrupt image data ({type(error).__name__}: {error})") from None
    return LoadedImage(np.asarray(resized, dtype=np.uint8), original_mode, original_size, notes)


def _size_notes(
    size: tuple[int, int], image_size: int, min_side: int, large_megapixels: float
) -> tuple[tuple[str, str], ...]:
    width, height = size
    if min(width, height) < min_side:
        raise UnreadableImage("too-small", f"too small: {width}x{height} pixels, below data.min_image_side = {min_side}")
    notes = []
    if width * height > large_megapixels * 1e6:
        notes.append(("very-large", f"very large: {width * height / 1e6:.1f} megapixels (above data.large_image_megapixels = "
                     f"{large_megapixels:g}); decoded at reduced scale where the format allows"))
    if min(width, height) < image_size:
        notes.append(("upscaled", f"upscaled: {width}x{height} pixels is smaller than data.image_size = {image_size}"))
    return tuple(notes)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, scaled by what its values mean (see the module doc)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _grey_to_8bit(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels are composited on white rather than dropped to black, which would look like disease.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "LAB":
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    try:
        return image.convert("RGB")
    except ValueError:
        raise UnreadableImage("unsupported-mode", f"unsupported colour mode {mode}") from None


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey divides by 257 (65535 -> 255). 32-bit integer and float grey are read by their range:
    within 0..1 (float) x255, within 0..255 as is, within 0..65535 as 16-bit, otherwise stretched min..max."""
    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in SIXTEEN_BIT_MODES:
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def blur_score(pixels: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: low means poor focus (Pech-Pacheco et al., 2000)."""
    grey = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32)
    return float(ndimage.laplace(grey).var())


def list_image_files(folder: Path) -> list[Path]:
    """Every file under folder, sorted; non-image suffixes are kept so validation can report them."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
