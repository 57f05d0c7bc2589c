"""Procedurally generated, seeded, cassava-like leaf images for the five cassava classes.

Why this exists: the real Cassava Leaf Disease data set is large and licensed, so tests, CI and
quick experiments use this stand-in. It is written as ordinary image files in class folders
(``<out_dir>/<class>/<class>_<index:05d>.png``), so the loader that reads the real data reads this
one too.

The images are meant to be *hard but learnable*: a palmate leaf on clutter, random pose, lighting
and focus, with disease cues whose severity is drawn per image so that mild cases of different
classes look alike (cgm vs cmd vs healthy above all), as in the real data.

Only numpy and Pillow are used, so importing this module is cheap (no TensorFlow).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

CLASS_NAMES: tuple[str, ...] = ("cbb", "cbsd", "cgm", "cmd", "healthy")

# Colours are RGB floats in [0, 1]; the whole image is composed in float and quantised once.
Colour = tuple[float, float, float]
YELLOW: Colour = (0.86, 0.80, 0.30)
PALE_GREEN: Colour = (0.58, 0.72, 0.28)
SPECKLE_GREEN: Colour = (0.50, 0.62, 0.24)
NECROTIC_BROWN: Colour = (0.42, 0.28, 0.12)
LESION_BROWN: Colour = (0.28, 0.18, 0.08)
WATER_SOAKED: Colour = (0.12, 0.24, 0.10)
PETIOLE_RED: Colour = (0.55, 0.22, 0.18)


@dataclass(frozen=True)
class LeafGeometry:
    """Per-pixel description of one rendered leaf, all arrays of shape (size, size).

    Texture painters work in lobe coordinates (``along``, ``across``) rather than image
    coordinates, so disease patterns follow the lobes whatever the pose.
    """

    coverage: np.ndarray  # soft leaf mask in [0, 1]; the soft edge is the anti-aliasing
    lobe: np.ndarray  # index of the lobe each pixel belongs to
    along: np.ndarray  # 0 at the petiole point, 1 at the lobe tip
    across: np.ndarray  # -1 .. 1 from one lobe edge to the other, 0 on the midrib
    along_px: np.ndarray  # distance along the lobe axis in pixels (for vein spacing)
    across_px: np.ndarray  # distance from the midrib in pixels
    radius_px: float  # length of the longest lobe in pixels; sets the scale of all textures


@dataclass(frozen=True)
class LeafShape:
    """Shape parameters of one leaf; diseases change some of them (cmd narrows and warps lobes)."""

    centre: tuple[float, float]  # (x, y) of the petiole point in pixels
    radius_px: float
    facing: float  # direction of the middle lobe, radians
    n_lobes: int
    width_ratio: float  # lobe half-width over lobe length
    edge_wave: float  # relative amplitude of a wavy lobe outline
    droop: float  # how far lobe tips bend sideways (wilting), radians at the tip


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each of shape (size, size)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)


def smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Value noise in [0, 1] with about ``cells`` random features across the image.

    A tiny random grid upsampled bicubically by Pillow is far cheaper than Perlin noise and
    looks organic enough for soil, mottling and lighting.
    """
    grid = max(2, round(cells)) + 1
    values = rng.random((grid, grid), dtype=np.float32)
    field = np.asarray(Image.fromarray(values, mode="F").resize((size, size), Image.BICUBIC))
    return np.clip(field, 0.0, 1.0)


def _blend(image: np.ndarray, colour: Colour | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend a colour (or a colour image) over ``image`` with a per-pixel alpha."""
    return image + (np.asarray(colour, dtype=np.float32) - image) * alpha[..., None]


def random_leaf_shape(rng: np.random.Generator, size: int) -> LeafShape:
    """Random pose and shape of the main leaf; sometimes placed so that it is cut by the border."""
    radius = size * rng.uniform(0.45, 0.7)
    near_border = rng.random() < 0.25
    spread = (0.05, 0.95) if near_border else (0.3, 0.7)
    return LeafShape(
        centre=(size * rng.uniform(*spread), size * rng.uniform(*spread)),
        radius_px=radius,
        facing=rng.uniform(0.0, 2.0 * math.pi),
        n_lobes=int(rng.integers(5, 8)),
        width_ratio=rng.uniform(0.14, 0.21),
        edge_wave=rng.uniform(0.0, 0.06),
        droop=rng.uniform(-0.15, 0.15),
    )


# Normalises lanceolate_profile to a peak of 1 (its maximum, at along = 1 - 1/sqrt(3)).
LANCEOLATE_PEAK = 1.0 / 0.3849


def lanceolate_profile(along: np.ndarray) -> np.ndarray:
    """Lobe half-width shape: zero at the base, widest at ~42 % of the length, pointed tip.

    A cubic rather than a fractional power or sine, because it is evaluated for every pixel
    and lobe and polynomials are several times cheaper.
    """
    return along * (1.0 - along) * (2.0 - along)


def leaf_geometry(rng: np.random.Generator, shape: LeafShape, size: int) -> LeafGeometry:
    """Rasterise a palmate leaf: lanceolate lobes fanning out from the petiole point.

    Each pixel belongs to the lobe whose (drooping) axis is angularly nearest; lobes are far
    enough apart that this matches "the lobe it lies in", and it lets the costly shape maths
    run once per pixel instead of once per pixel and lobe. A signed distance to the outline in
    pixels gives a one-pixel soft edge, i.e. anti-aliasing without supersampling.
    """
    xs, ys = _pixel_grid(size)
    dx, dy = xs - shape.centre[0], ys - shape.centre[1]
    distance = np.hypot(dx, dy)
    bearing = np.arctan2(dy, dx)

    # Cassava lobes fan over most of a circle, leaving a gap where the petiole is; the middle
    # lobes are the longest.
    fan = rng.uniform(0.55, 0.8) * 2.0 * math.pi
    offsets = np.linspace(-0.5, 0.5, shape.n_lobes)
    angles = shape.facing + offsets * fan + rng.normal(0.0, 0.08, shape.n_lobes)
    lengths = shape.radius_px * (1.0 - 0.5 * np.abs(2.0 * offsets) ** 1.5) * rng.uniform(0.85, 1.1, shape.n_lobes)
    droops = shape.droop * rng.uniform(0.5, 1.5, shape.n_lobes)
    wave_phases = rng.uniform(0.0, 2.0 * math.pi, shape.n_lobes)

    def per_lobe(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[:, None, None]

    # Bending the lobe axis with distance makes tips droop sideways (wilting) cheaply.
    scaled_distance = distance / per_lobe(lengths)
    turn = per_lobe(angles) + per_lobe(droops) * scaled_distance * scaled_distance
    relative_all = (bearing - turn + math.pi) % (2.0 * math.pi) - math.pi
    lobe = np.argmin(np.abs(relative_all), axis=0)
    relative = np.take_along_axis(relative_all, lobe[None], 0)[0]

    length = lengths.astype(np.float32)[lobe]
    along_px = distance * np.cos(relative)
    across_px = distance * np.sin(relative)
    along = np.clip(along_px / length, 0.0, 1.0)
    wave = 1.0 + shape.edge_wave * np.sin(6.0 * math.pi * along + wave_phases.astype(np.float32)[lobe])
    half_width = (shape.width_ratio * LANCEOLATE_PEAK) * length * lanceolate_profile(along) * wave
    # Pixels behind the petiole point have negative along_px, so this margin is negative there.
    margin = np.minimum(half_width - np.abs(across_px), along_px)
    # A small disc fills the junction where all lobes meet the petiole.
    margin = np.maximum(margin, 0.06 * shape.radius_px - distance)
    return LeafGeometry(
        coverage=np.clip(margin + 0.5, 0.0, 1.0),
        lobe=lobe,
        along=along,
        across=np.clip(across_px / np.maximum(half_width, 1e-3), -1.0, 1.0),
        along_px=along_px,
        across_px=np.abs(across_px),
        radius_px=shape.radius_px,
    )


def secondary_vein_closeness(geometry: LeafGeometry) -> np.ndarray:
    """1 on the feather-like secondary veins, falling to 0 between them.

    Secondary veins leave the midrib at an angle towards the tip, i.e. lines where
    ``along - across`` is constant, repeated every few percent of the leaf radius.
    """
    spacing = max(2.5, 0.09 * geometry.radius_px)
    phase = (geometry.along_px - 0.8 * geometry.across_px) / spacing
    return (np.cos(2.0 * math.pi * phase) * 0.5 + 0.5) ** 6


def healthy_leaf_colour(rng: np.random.Generator, geometry: LeafGeometry, size: int) -> np.ndarray:
    """Green leaf surface with lighter veins and gentle natural variation of shade."""
    base = np.array(
        [rng.uniform(0.12, 0.26), rng.uniform(0.32, 0.52), rng.uniform(0.08, 0.18)], dtype=np.float32
    )
    shade = 0.9 + 0.2 * smooth_noise(rng, size, size / geometry.radius_px * 2.0)
    # Each lobe is tilted slightly differently towards the light.
    lobe_tilt = rng.uniform(0.88, 1.12, geometry.lobe.max() + 1).astype(np.float32)[geometry.lobe]
    surface = base * (shade * lobe_tilt)[..., None]
    midrib = np.clip(1.0 - geometry.across_px / max(0.6, 0.025 * geometry.radius_px), 0.0, 1.0)
    veins = np.maximum(midrib, 0.35 * secondary_vein_closeness(geometry))
    return _blend(surface, PALE_GREEN, 0.45 * veins)


def paint_healthy(rng: np.random.Generator, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Healthy leaves keep their plain green; occasionally a little age yellowing (a confounder)."""
    size = leaf.shape[0]
    if rng.random() < 0.3:
        ageing = np.clip(smooth_noise(rng, size, 3.0) - 0.7, 0.0, 1.0) * 0.8
        leaf = _blend(leaf, PALE_GREEN, ageing)
    return leaf


def paint_cmd(rng: np.random.Generator, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava mosaic: blotchy yellow / pale-green mosaic patches over the lobes."""
    size = leaf.shape[0]
    blotches = smooth_noise(rng, size, size / geometry.radius_px * rng.uniform(4.0, 7.0))
    # Higher severity lowers the threshold, so a larger fraction of the lamina turns pale.
    threshold = 0.75 - 0.3 * severity
    patches = np.clip((blotches - threshold) * 8.0, 0.0, 1.0)
    colour = YELLOW if rng.random() < 0.5 else PALE_GREEN
    return _blend(leaf, colour, patches * (0.35 + 0.5 * severity))


def paint_cgm(rng: np.random.Generator, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava green mottle: faint, small yellowish-green speckles, subtler than the mosaic."""
    size = leaf.shape[0]
    speckles = smooth_noise(rng, size, size / geometry.radius_px * rng.uniform(7.0, 10.0))
    # Mottle is often concentrated on part of the leaf.
    region = smooth_noise(rng, size, 2.0)
    spots = np.clip((speckles - (0.7 - 0.15 * severity)) * 6.0, 0.0, 1.0) * np.clip(region * 2.0, 0.0, 1.0)
    return _blend(leaf, SPECKLE_GREEN, spots * (0.4 + 0.45 * severity))


def paint_cbsd(rng: np.random.Generator, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava brown streak: feathery yellow chlorosis along the secondary veins, a few necrotic patches."""
    size = leaf.shape[0]
    affected = np.clip((smooth_noise(rng, size, 3.0) - (0.55 - 0.35 * severity)) * 3.0, 0.0, 1.0)
    feathers = np.sqrt(secondary_vein_closeness(geometry)) * affected
    leaf = _blend(leaf, YELLOW, feathers * (0.25 + 0.55 * severity))
    necrosis = np.clip((smooth_noise(rng, size, size / geometry.radius_px * 5.0) - (0.85 - 0.15 * severity)) * 8.0, 0.0, 1.0)
    return _blend(leaf, NECROTIC_BROWN, necrosis * affected)


def paint_cbb(rng: np.random.Generator, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava bacterial blight: angular water-soaked brown spots and browned lobe tips.

    Spots are drawn on a coarse grid in lobe coordinates, so they are angular and bounded by
    veins like real blight lesions.
    """
    n_along, n_across = 6, 3
    cells = rng.random((geometry.lobe.max() + 1, n_along, n_across), dtype=np.float32)
    cell_along = np.minimum((geometry.along * n_along).astype(np.int64), n_along - 1)
    cell_across = np.minimum(((geometry.across + 1.0) * 0.5 * n_across).astype(np.int64), n_across - 1)
    spot_chance = 0.05 + 0.25 * severity
    spots = (cells[geometry.lobe, cell_along, cell_across] < spot_chance).astype(np.float32)
    halo = (cells[geometry.lobe, cell_along, cell_across] < spot_chance * 1.8).astype(np.float32)
    leaf = _blend(leaf, WATER_SOAKED, 0.5 * halo)
    leaf = _blend(leaf, LESION_BROWN, 0.85 * spots)
    # Blight dries lobes from the tip inwards.
    tip_start = 1.0 - rng.uniform(0.2, 0.5) * severity
    tips = np.clip((geometry.along - tip_start) * 12.0, 0.0, 1.0)
    return _blend(leaf, NECROTIC_BROWN, tips)


Painter = Callable[[np.random.Generator, np.ndarray, LeafGeometry, float], np.ndarray]
PAINTERS: dict[str, Painter] = {
    "cbb": paint_cbb,
    "cbsd": paint_cbsd,
    "cgm": paint_cgm,
    "cmd": paint_cmd,
    "healthy": paint_healthy,
}


def diseased_shape(label: str, shape: LeafShape, severity: float, rng: np.random.Generator) -> LeafShape:
    """Shape symptoms: mosaic narrows and warps lobes, blight makes them wilt."""
    if label == "cmd":
        return LeafShape(
            **{**shape.__dict__,
               "width_ratio": shape.width_ratio * (1.0 - 0.35 * severity),
               "edge_wave": shape.edge_wave + 0.25 * severity}
        )
    if label == "cbb":
        droop = shape.droop + math.copysign(0.4 * severity * rng.random(), shape.droop)
        return LeafShape(**{**shape.__dict__, "droop": droop})
    return shape


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cluttered field background: soil/grass noise, stones and grass blades."""
    soil = np.array([rng.uniform(0.3, 0.5), rng.uniform(0.25, 0.4), rng.uniform(0.12, 0.25)], dtype=np.float32)
    grass = np.array([rng.uniform(0.2, 0.4), rng.uniform(0.35, 0.55), rng.uniform(0.1, 0.2)], dtype=np.float32)
    grassiness = smooth_noise(rng, size, rng.uniform(2.0, 5.0)) * rng.uniform(0.0, 1.0)
    image = soil + (grass - soil) * grassiness[..., None]
    texture = 0.75 + 0.5 * smooth_noise(rng, size, size / 4.0)
    image = image * texture[..., None] + rng.normal(0.0, 0.03, (size, size, 1)).astype(np.float32)

    canvas = Image.fromarray(_to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 6))):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.03, 0.12) * size
        # Stones and dead leaves: earthy greys and browns.
        tone = rng.uniform(0.3, 0.75)
        fill = tuple(int(255 * tone * c) for c in (1.0, rng.uniform(0.8, 1.0), rng.uniform(0.55, 0.9)))
        draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.0), x + r, y + r), fill=fill)
    for _ in range(int(rng.integers(0, 12))):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35) * size
        fill = tuple(int(255 * c) for c in (rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.7), rng.uniform(0.1, 0.3)))
        draw.line((x, y, x + length * math.cos(angle), y + length * math.sin(angle)), fill=fill, width=max(1, size // 64))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def add_leaf_fragments(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Other plain leaves sticking in from outside the frame, as in real field photos."""
    size = image.shape[0]
    for _ in range(int(rng.random() < 0.5)):
        # Centre outside the image so that only a few lobes show.
        side = rng.uniform(0, 2 * math.pi)
        centre = (size * (0.5 + 0.85 * math.cos(side)), size * (0.5 + 0.85 * math.sin(side)))
        shape = LeafShape(
            centre=centre,
            radius_px=size * rng.uniform(0.45, 0.7),
            facing=side + math.pi + rng.normal(0.0, 0.5),
            n_lobes=int(rng.integers(5, 8)),
            width_ratio=rng.uniform(0.14, 0.2),
            edge_wave=0.0,
            droop=rng.uniform(-0.2, 0.2),
        )
        geometry = leaf_geometry(rng, shape, size)
        # Fragments are out of the focal plane and in shadow, so darker and flatter.
        colour = healthy_leaf_colour(rng, geometry, size) * rng.uniform(0.55, 0.9)
        image = _blend(image, colour, geometry.coverage)
    return image


def draw_petiole(image: np.ndarray, shape: LeafShape) -> np.ndarray:
    """The reddish leaf stalk leaving the petiole point opposite the middle lobe."""
    size = image.shape[0]
    canvas = Image.new("L", (size, size), 0)
    x, y = shape.centre
    back = shape.facing + math.pi
    end = (x + 0.6 * shape.radius_px * math.cos(back), y + 0.6 * shape.radius_px * math.sin(back))
    ImageDraw.Draw(canvas).line((x, y, *end), fill=255, width=max(1, round(shape.radius_px * 0.04)))
    return _blend(image, PETIOLE_RED, np.asarray(canvas, dtype=np.float32) / 255.0)


def cast_shadow(image: np.ndarray, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darken the background where the leaf's offset silhouette falls, for depth cues."""
    size = image.shape[0]
    shift = rng.integers(-size // 12, size // 12 + 1, 2)
    shadow = np.roll(coverage, tuple(int(s) for s in shift), axis=(0, 1))
    return image * (1.0 - rng.uniform(0.2, 0.45) * shadow)[..., None]


def lighting(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera and sun variation: brightness, contrast, colour cast, a gradient shadow, sensor noise."""
    size = image.shape[0]
    xs, ys = _pixel_grid(size)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (xs * math.cos(direction) + ys * math.sin(direction)) / size
    gradient = 1.0 - rng.uniform(0.0, 0.45) * np.clip(ramp - ramp.min(), 0.0, 1.0)
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    image = image * gradient[..., None] * cast * rng.uniform(0.7, 1.3)
    mean = image.mean()
    image = mean + (image - mean) * rng.uniform(0.75, 1.25)
    return image + rng.normal(0.0, rng.uniform(0.005, 0.025), image.shape).astype(np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def disease_severity(rng: np.random.Generator) -> float:
    """Severity in (0, 1], skewed towards mild so that many diseased leaves look almost healthy."""
    return float(0.15 + 0.85 * rng.beta(1.6, 1.2))


def render_leaf(label: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Render one RGB image of a leaf of class ``label`` on a cluttered field background."""
    if label not in PAINTERS:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASS_NAMES}")
    severity = disease_severity(rng)
    image = add_leaf_fragments(rng, background(rng, image_size))
    shape = diseased_shape(label, random_leaf_shape(rng, image_size), severity, rng)
    geometry = leaf_geometry(rng, shape, image_size)
    image = draw_petiole(cast_shadow(image, geometry.coverage, rng), shape)
    leaf = PAINTERS[label](rng, healthy_leaf_colour(rng, geometry, image_size), geometry, severity)
    image = _blend(image, leaf, geometry.coverage)
    return Image.fromarray(_to_uint8(lighting(rng, image)), mode="RGB")


def _counts_per_class(images_per_class: int | Mapping[str, int]) -> dict[str, int]:
    """Normalise the count argument; a mapping must name every class exactly, so typos fail loudly."""
    if isinstance(images_per_class, Mapping):
        unknown = set(images_per_class) - set(CLASS_NAMES)
        missing = set(CLASS_NAMES) - set(images_per_class)
        if unknown or missing:
            raise ValueError(f"images_per_class must give a count for exactly {CLASS_NAMES}; "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        counts = {label: int(images_per_class[label]) for label in CLASS_NAMES}
    else:
        counts = {label: int(images_per_class) for label in CLASS_NAMES}
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"image counts must be >= 0, got {counts}")
    return counts


def image_path(out_dir: pathlib.Path, label: str, index: int) -> pathlib.Path:
    """Where image ``index`` of class ``label`` is written."""
    return out_dir / label / f"{label}_{index:05d}.png"


def _remove_stale_images(class_dir: pathlib.Path, label: str, keep: set[pathlib.Path]) -> None:
    """Delete images of ours left from an earlier, larger run, so the folder holds exactly this set.

    Only files matching our own naming pattern are touched; anything else is left alone.
    """
    for path in class_dir.glob(f"{label}_*.png"):
        if path not in keep:
            path.unlink()


def generate_synthetic_dataset(
    out_dir: pathlib.Path,
    images_per_class: int | Mapping[str, int],
    image_size: int,
    seed: int,
    blur_fraction: float = 0.1,
    progress: bool = True,
) -> dict[str, int]:
    """Write a synthetic cassava data set as ``<out_dir>/<class>/<class>_<index:05d>.png``.

    Every image gets its own generator seeded by (seed, class index, image index), so an image
    does not depend on the order of generation or on the other counts, and the same arguments
    always give byte-identical files. A folder is created for every class, even with a count of
    0, so that class indices inferred from folder names stay stable.

    Args:
        out_dir: Root folder of the data set; created if missing.
        images_per_class: One count for all classes, or a mapping with a count for every class
            (for imbalanced sets like the real data).
        image_size: Width and height of the square images in pixels.
        seed: Master seed.
        blur_fraction: Probability that an image is out of focus (Gaussian blur).
        progress: Show a tqdm progress bar.

    Returns:
        The number of images written per class.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 0.0 <= blur_fraction <= 1.0:
        raise ValueError(f"blur_fraction must be in [0, 1], got {blur_fraction}")
    counts = _counts_per_class(images_per_class)
    out_dir = pathlib.Path(out_dir)
    with tqdm(total=sum(counts.values()), desc="synthetic cassava", unit="img", disable=not progress) as bar:
        for class_index, label in enumerate(CLASS_NAMES):
            class_dir = out_dir / label
            class_dir.mkdir(parents=True, exist_ok=True)
            paths = [image_path(out_dir, label, index) for index in range(counts[label])]
            _remove_stale_images(class_dir, label, set(paths))
            for index, path in enumerate(paths):
                # Separate streams for content and focus: blur_fraction changes which images are
                # blurred but never what they show.
                content_seed, focus_seed = np.random.SeedSequence([seed, class_index, index]).spawn(2)
                image = render_leaf(label, np.random.default_rng(content_seed), image_size)
                image = defocus(image, np.random.default_rng(focus_seed), blur_fraction)
                image.save(path, format="PNG")
                bar.update()
    return counts


def defocus(image: Image.Image, rng: np.random.Generator, blur_fraction: float) -> Image.Image:
    """With probability ``blur_fraction``, blur the image as a badly focused phone photo would be."""
    if rng.random() >= blur_fraction:
        return image
    radius = rng.uniform(0.8, 2.0) * image.width / 64.0
    return image.filter(ImageFilter.GaussianBlur(radius))
