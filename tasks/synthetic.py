"""Procedurally generated, seeded, cassava-like leaf images for the five cassava classes.

Why this exists: the real Cassava Leaf Disease data set is large and licensed, so tests, CI and
quick experiments use this stand-in. It is written as ordinary image files in class folders
(``<out_dir>/<class>/<class>_<index:05d>.png``), so the loader that reads the real data reads this
one too.

The images are meant to be *hard but learnable*: a palmate leaf on clutter, with random pose,
lighting and focus, and disease cues whose severity is drawn per image, so that mild cases of
different classes look alike (cgm vs cmd vs healthy above all), as in the real data.

Only numpy and Pillow are used, so importing this module is cheap (no TensorFlow).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

__all__ = ["CLASS_NAMES", "generate_synthetic_dataset", "image_path", "render_leaf"]

CLASS_NAMES: tuple[str, ...] = ("cbb", "cbsd", "cgm", "cmd", "healthy")

Rng = np.random.Generator

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
class LeafShape:
    """Shape parameters of one leaf; diseases change some of them (cmd narrows and warps lobes)."""

    centre: tuple[float, float]  # (x, y) of the petiole point in pixels
    radius_px: float  # length of the longest lobe
    facing: float  # direction of the middle lobe, radians
    n_lobes: int
    width_ratio: float  # lobe half-width over lobe length
    edge_wave: float  # relative amplitude of a wavy lobe outline
    droop: float  # how far lobe tips bend sideways (wilting), radians at the tip


@dataclass(frozen=True)
class LeafGeometry:
    """Per-pixel description of one rasterised leaf; arrays have shape (size, size).

    Disease painters work in lobe coordinates (``along``, ``across``) rather than image
    coordinates, so their patterns follow the lobes whatever the pose.
    """

    coverage: np.ndarray  # soft leaf mask in [0, 1]; the soft edge is the anti-aliasing
    lobe: np.ndarray  # index of the lobe each pixel belongs to
    along: np.ndarray  # 0 at the petiole point, 1 at the lobe tip
    across: np.ndarray  # -1 .. 1 from one lobe edge to the other, 0 on the midrib
    along_px: np.ndarray  # distance along the lobe axis in pixels (for vein spacing)
    across_px: np.ndarray  # distance from the midrib in pixels
    radius_px: float  # length of the longest lobe; sets the scale of all leaf textures


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each of shape (size, size)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)


def _smooth_noise(rng: Rng, size: int, cells: float) -> np.ndarray:
    """Value noise in [0, 1] with about ``cells`` random features across the image.

    A tiny random grid upsampled bicubically by Pillow is far cheaper than Perlin noise and
    looks organic enough for soil, mottling and shading.
    """
    grid = max(2, round(cells)) + 1
    values = rng.random((grid, grid), dtype=np.float32)
    field = np.asarray(Image.fromarray(values).resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(field, 0.0, 1.0)


def _soft_threshold(field: np.ndarray, level: float, sharpness: float) -> np.ndarray:
    """0 below ``level``, rising to 1 over 1/``sharpness``: patches with soft, not jagged, edges."""
    return np.clip((field - level) * sharpness, 0.0, 1.0)


def _random_colour(rng: Rng, low: Colour, high: Colour) -> np.ndarray:
    """A colour drawn uniformly per channel between ``low`` and ``high``."""
    # Scaling rng.random is several times faster than rng.uniform with array bounds.
    low_array, high_array = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    return low_array + (high_array - low_array) * rng.random(3, dtype=np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Quantise a float image in [0, 1] (values outside are clipped) to 8-bit."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _rgb255(colour: np.ndarray) -> tuple[int, int, int]:
    """A float colour as the 8-bit tuple that ImageDraw expects."""
    red, green, blue = (int(channel) for channel in _to_uint8(colour))
    return red, green, blue


def _blend(image: np.ndarray, colour: Colour | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend a colour (or a colour image) over ``image`` with a per-pixel alpha."""
    return image + (np.asarray(colour, dtype=np.float32) - image) * alpha[..., None]


# Scales _lanceolate_profile to a peak of 1: its maximum, at 1 - 1/sqrt(3), is 2 / (3 sqrt(3)).
_LANCEOLATE_PEAK = 1.5 * math.sqrt(3.0)


def _lanceolate_profile(along: np.ndarray) -> np.ndarray:
    """Lobe half-width shape: zero at the base, widest at ~42 % of the length, pointed tip.

    A cubic rather than a fractional power or a sine, because it runs for every pixel and
    polynomials are several times cheaper.
    """
    return along * (1.0 - along) * (2.0 - along)


def _leaf_geometry(rng: Rng, shape: LeafShape, size: int) -> LeafGeometry:
    """Rasterise a palmate leaf: lanceolate lobes fanning out from the petiole point.

    Each pixel belongs to the lobe whose (drooping) axis is angularly nearest; lobes are far
    enough apart that this is the lobe it lies in, and it lets the costly shape maths run once
    per pixel instead of once per pixel and lobe. A signed distance to the outline in pixels
    gives a one-pixel soft edge, i.e. anti-aliasing without supersampling.
    """
    xs, ys = _pixel_grid(size)
    dx, dy = xs - shape.centre[0], ys - shape.centre[1]
    distance = np.hypot(dx, dy)
    bearing = np.arctan2(dy, dx)

    # Cassava lobes fan over most of a circle, leaving a gap for the petiole; the middle lobes
    # are the longest.
    fan = rng.uniform(0.55, 0.8) * 2.0 * math.pi
    offsets = np.linspace(-0.5, 0.5, shape.n_lobes)
    angles = shape.facing + offsets * fan + rng.normal(0.0, 0.08, shape.n_lobes)
    taper = 1.0 - 0.5 * np.abs(2.0 * offsets) ** 1.5
    lengths = (shape.radius_px * taper * rng.uniform(0.85, 1.1, shape.n_lobes)).astype(np.float32)
    droops = shape.droop * rng.uniform(0.5, 1.5, shape.n_lobes)
    wave_phases = rng.uniform(0.0, 2.0 * math.pi, shape.n_lobes).astype(np.float32)

    def per_lobe(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[:, None, None]

    # Bending each lobe axis with distance makes the tips droop sideways (wilting) cheaply.
    scaled_distance = distance / per_lobe(lengths)
    turn = per_lobe(angles) + per_lobe(droops) * scaled_distance * scaled_distance
    relative_all = (bearing - turn + math.pi) % (2.0 * math.pi) - math.pi
    lobe = np.argmin(np.abs(relative_all), axis=0)
    relative = np.take_along_axis(relative_all, lobe[None], 0)[0]

    length = lengths[lobe]
    along_px = distance * np.cos(relative)
    across_px = distance * np.sin(relative)
    along = np.clip(along_px / length, 0.0, 1.0)
    wave = 1.0 + shape.edge_wave * np.sin(6.0 * math.pi * along + wave_phases[lobe])
    half_width = shape.width_ratio * _LANCEOLATE_PEAK * length * _lanceolate_profile(along) * wave
    # Pixels behind the petiole point have a negative along_px, so the margin is negative there.
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


def _secondary_vein_closeness(geometry: LeafGeometry) -> np.ndarray:
    """1 on the feather-like secondary veins, falling to 0 between them.

    Secondary veins leave the midrib at an angle towards the tip, i.e. along lines where
    ``along - across`` is constant, repeated every few percent of the leaf radius.
    """
    spacing = max(2.5, 0.09 * geometry.radius_px)
    phase = (geometry.along_px - 0.8 * geometry.across_px) / spacing
    return (np.cos(2.0 * math.pi * phase) * 0.5 + 0.5) ** 6


def _healthy_leaf_colour(rng: Rng, geometry: LeafGeometry) -> np.ndarray:
    """Green leaf surface with lighter veins and gentle natural variation of shade."""
    size = geometry.coverage.shape[0]
    base = _random_colour(rng, (0.12, 0.32, 0.08), (0.26, 0.52, 0.18))
    shade = 0.9 + 0.2 * _smooth_noise(rng, size, size / geometry.radius_px * 2.0)
    # Each lobe is tilted slightly differently towards the light.
    lobe_tilt = rng.uniform(0.88, 1.12, geometry.lobe.max() + 1).astype(np.float32)[geometry.lobe]
    surface = base * (shade * lobe_tilt)[..., None]
    midrib = np.clip(1.0 - geometry.across_px / max(0.6, 0.025 * geometry.radius_px), 0.0, 1.0)
    veins = np.maximum(midrib, 0.35 * _secondary_vein_closeness(geometry))
    return _blend(surface, PALE_GREEN, 0.45 * veins)


# A painter adds the symptoms of one class to a healthy leaf colour image.
Painter = Callable[[Rng, np.ndarray, LeafGeometry, float], np.ndarray]


def _paint_healthy(
    rng: Rng, leaf: np.ndarray, geometry: LeafGeometry, severity: float
) -> np.ndarray:
    """Healthy leaves stay plain green, but some get pale age patches: a confounder for cmd/cgm.

    ``severity`` is unused; it is part of the common painter signature.
    """
    if rng.random() < 0.3:
        ageing = 0.8 * _soft_threshold(_smooth_noise(rng, leaf.shape[0], 3.0), 0.7, 1.0)
        leaf = _blend(leaf, PALE_GREEN, ageing)
    return leaf


def _paint_cmd(rng: Rng, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava mosaic: blotchy yellow or pale-green mosaic patches over the lobes."""
    size = leaf.shape[0]
    blotches = _smooth_noise(rng, size, size / geometry.radius_px * rng.uniform(3.0, 5.0))
    # Higher severity lowers the threshold, so a larger fraction of the lamina turns pale.
    patches = _soft_threshold(blotches, 0.75 - 0.3 * severity, 8.0)
    colour = YELLOW if rng.random() < 0.6 else PALE_GREEN
    return _blend(leaf, colour, patches * (0.45 + 0.5 * severity))


def _paint_cgm(rng: Rng, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava green mottle: small yellowish-green speckles, finer and fainter than the mosaic."""
    size = leaf.shape[0]
    speckles = _smooth_noise(rng, size, size / geometry.radius_px * rng.uniform(7.0, 10.0))
    # Mottle is often concentrated on part of the leaf.
    region = np.clip(2.0 * _smooth_noise(rng, size, 2.0), 0.0, 1.0)
    spots = _soft_threshold(speckles, 0.68 - 0.15 * severity, 6.0) * region
    return _blend(leaf, SPECKLE_GREEN, spots * (0.5 + 0.4 * severity))


def _paint_cbsd(rng: Rng, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava brown streak: feathery yellow chlorosis along veins, a few necrotic patches."""
    size = leaf.shape[0]
    affected = _soft_threshold(_smooth_noise(rng, size, 3.0), 0.55 - 0.35 * severity, 3.0)
    feathers = np.sqrt(_secondary_vein_closeness(geometry)) * affected
    leaf = _blend(leaf, YELLOW, feathers * (0.3 + 0.55 * severity))
    necrotic_noise = _smooth_noise(rng, size, size / geometry.radius_px * 5.0)
    necrosis = _soft_threshold(necrotic_noise, 0.85 - 0.15 * severity, 8.0) * affected
    return _blend(leaf, NECROTIC_BROWN, necrosis)


def _paint_cbb(rng: Rng, leaf: np.ndarray, geometry: LeafGeometry, severity: float) -> np.ndarray:
    """Cassava bacterial blight: angular water-soaked brown spots and browned lobe tips.

    Spots fill cells of a coarse grid in lobe coordinates, so they are angular and bounded by
    veins like real blight lesions.
    """
    n_along, n_across = 6, 3
    cells = rng.random((geometry.lobe.max() + 1, n_along, n_across), dtype=np.float32)
    cell_along = np.minimum((geometry.along * n_along).astype(np.int64), n_along - 1)
    across_01 = (geometry.across + 1.0) * 0.5
    cell_across = np.minimum((across_01 * n_across).astype(np.int64), n_across - 1)
    cell_value = cells[geometry.lobe, cell_along, cell_across]
    spot_chance = 0.05 + 0.25 * severity
    # A water-soaked dark halo surrounds and precedes the brown lesion.
    halo = (cell_value < 1.8 * spot_chance).astype(np.float32)
    lesion = (cell_value < spot_chance).astype(np.float32)
    leaf = _blend(leaf, WATER_SOAKED, 0.5 * halo)
    leaf = _blend(leaf, LESION_BROWN, 0.85 * lesion)
    # Blight dries lobes from the tip inwards.
    tip_start = 1.0 - rng.uniform(0.2, 0.5) * severity
    return _blend(leaf, NECROTIC_BROWN, _soft_threshold(geometry.along, tip_start, 12.0))


_PAINTERS: dict[str, Painter] = {
    "cbb": _paint_cbb,
    "cbsd": _paint_cbsd,
    "cgm": _paint_cgm,
    "cmd": _paint_cmd,
    "healthy": _paint_healthy,
}


def _random_leaf_shape(rng: Rng, size: int) -> LeafShape:
    """Random pose and shape of the main leaf; sometimes placed so that the border cuts it."""
    near_border = rng.random() < 0.25
    spread = (0.05, 0.95) if near_border else (0.3, 0.7)
    return LeafShape(
        centre=(size * rng.uniform(*spread), size * rng.uniform(*spread)),
        radius_px=size * rng.uniform(0.45, 0.7),
        facing=rng.uniform(0.0, 2.0 * math.pi),
        n_lobes=int(rng.integers(5, 8)),
        width_ratio=rng.uniform(0.14, 0.21),
        edge_wave=rng.uniform(0.0, 0.06),
        droop=rng.uniform(-0.15, 0.15),
    )


def _diseased_shape(label: str, shape: LeafShape, severity: float, rng: Rng) -> LeafShape:
    """Shape symptoms: mosaic narrows and warps the lobes, blight makes them wilt."""
    if label == "cmd":
        narrower = shape.width_ratio * (1.0 - 0.35 * severity)
        return replace(shape, width_ratio=narrower, edge_wave=shape.edge_wave + 0.25 * severity)
    if label == "cbb":
        wilting = math.copysign(0.4 * severity * rng.random(), shape.droop)
        return replace(shape, droop=shape.droop + wilting)
    return shape


def _background(rng: Rng, size: int) -> np.ndarray:
    """Cluttered field background: soil/grass noise, stones and grass blades."""
    soil = _random_colour(rng, (0.3, 0.25, 0.12), (0.5, 0.4, 0.25))
    grass = _random_colour(rng, (0.2, 0.35, 0.1), (0.4, 0.55, 0.2))
    grassiness = _smooth_noise(rng, size, rng.uniform(2.0, 5.0)) * rng.uniform(0.0, 1.0)
    image = soil + (grass - soil) * grassiness[..., None]
    texture = 0.75 + 0.5 * _smooth_noise(rng, size, size / 4.0)
    image = image * texture[..., None] + rng.normal(0.0, 0.03, (size, size, 1)).astype(np.float32)

    canvas = Image.fromarray(_to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 6))):
        # Stones and dead leaves: earthy greys and browns.
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.03, 0.12) * size
        fill = _random_colour(rng, (1.0, 0.8, 0.55), (1.0, 1.0, 0.9)) * rng.uniform(0.3, 0.75)
        draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.0), x + r, y + r), fill=_rgb255(fill))
    for _ in range(int(rng.integers(0, 12))):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35) * size
        end = (x + length * math.cos(angle), y + length * math.sin(angle))
        fill = _random_colour(rng, (0.3, 0.45, 0.1), (0.7, 0.7, 0.3))
        draw.line((x, y, *end), fill=_rgb255(fill), width=max(1, size // 64))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _add_leaf_fragment(rng: Rng, image: np.ndarray) -> np.ndarray:
    """Half the time, another plain leaf sticks in from outside the frame, as in field photos."""
    if rng.random() < 0.5:
        return image
    size = image.shape[0]
    # Centre outside the image so that only a few lobes show.
    side = rng.uniform(0, 2 * math.pi)
    shape = LeafShape(
        centre=(size * (0.5 + 0.85 * math.cos(side)), size * (0.5 + 0.85 * math.sin(side))),
        radius_px=size * rng.uniform(0.45, 0.7),
        facing=side + math.pi + rng.normal(0.0, 0.5),
        n_lobes=int(rng.integers(5, 8)),
        width_ratio=rng.uniform(0.14, 0.2),
        edge_wave=0.0,
        droop=rng.uniform(-0.2, 0.2),
    )
    geometry = _leaf_geometry(rng, shape, size)
    # Fragments are in the shade of the main leaf or further from the light, so darker.
    colour = _healthy_leaf_colour(rng, geometry) * rng.uniform(0.55, 0.9)
    return _blend(image, colour, geometry.coverage)


def _draw_petiole(image: np.ndarray, shape: LeafShape) -> np.ndarray:
    """The reddish leaf stalk, leaving the petiole point opposite the middle lobe."""
    size = image.shape[0]
    canvas = Image.new("L", (size, size), 0)
    x, y = shape.centre
    back = shape.facing + math.pi
    end = (x + 0.6 * shape.radius_px * math.cos(back), y + 0.6 * shape.radius_px * math.sin(back))
    ImageDraw.Draw(canvas).line((x, y, *end), fill=255, width=max(1, round(shape.radius_px * 0.04)))
    return _blend(image, PETIOLE_RED, np.asarray(canvas, dtype=np.float32) / 255.0)


def _cast_shadow(rng: Rng, image: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Darken the background under the leaf's offset silhouette, a depth cue of real photos."""
    size = image.shape[0]
    shift = rng.integers(-size // 12, size // 12 + 1, 2)
    shadow = np.roll(coverage, (int(shift[0]), int(shift[1])), axis=(0, 1))
    return image * (1.0 - rng.uniform(0.2, 0.45) * shadow)[..., None]


def _lighting(rng: Rng, image: np.ndarray) -> np.ndarray:
    """Sun and camera: brightness, contrast, colour cast, a gradient shadow, sensor noise."""
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


def _disease_severity(rng: Rng) -> float:
    """Severity in [0.25, 1]; low values make diseased leaves look almost healthy."""
    return float(0.25 + 0.75 * rng.beta(1.8, 1.2))


def render_leaf(label: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Render one RGB ``image_size`` x ``image_size`` image of a leaf of class ``label``.

    The leaf lies on a cluttered field background with random pose, lighting and a symptom
    severity; all of it is drawn from ``rng``, so the image is a pure function of its state.
    """
    if label not in _PAINTERS:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASS_NAMES}")
    # The scene (background, pose, lighting) and the symptoms draw from separate streams, so
    # the same generator state gives the same scene for every class: classes differ only by
    # their symptoms, which makes controlled comparisons possible.
    scene_seed, symptom_seed = rng.integers(0, 2**63, size=2)
    scene, symptoms = np.random.default_rng(scene_seed), np.random.default_rng(symptom_seed)
    severity = _disease_severity(symptoms)
    image = _add_leaf_fragment(scene, _background(scene, image_size))
    shape = _diseased_shape(label, _random_leaf_shape(scene, image_size), severity, symptoms)
    geometry = _leaf_geometry(scene, shape, image_size)
    image = _draw_petiole(_cast_shadow(scene, image, geometry.coverage), shape)
    leaf = _PAINTERS[label](symptoms, _healthy_leaf_colour(scene, geometry), geometry, severity)
    image = _blend(image, leaf, geometry.coverage)
    return Image.fromarray(_to_uint8(_lighting(scene, image)))


def _defocus(rng: Rng, image: Image.Image, blur_fraction: float) -> Image.Image:
    """With probability ``blur_fraction``, blur the image as a badly focused phone photo is."""
    if rng.random() >= blur_fraction:
        return image
    radius = rng.uniform(0.8, 2.0) * image.width / 64.0
    return image.filter(ImageFilter.GaussianBlur(radius))


def _counts_per_class(images_per_class: int | Mapping[str, int]) -> dict[str, int]:
    """Normalise the count argument; a mapping must name every class, so typos fail loudly."""
    if isinstance(images_per_class, Mapping):
        unknown = sorted(set(images_per_class) - set(CLASS_NAMES))
        missing = sorted(set(CLASS_NAMES) - set(images_per_class))
        if unknown or missing:
            raise ValueError(
                f"images_per_class must give a count for each of {CLASS_NAMES}; "
                f"unknown {unknown}, missing {missing}"
            )
        counts = {label: int(images_per_class[label]) for label in CLASS_NAMES}
    else:
        counts = {label: int(images_per_class) for label in CLASS_NAMES}
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"image counts must be >= 0, got {counts}")
    return counts


def image_path(out_dir: pathlib.Path, label: str, index: int) -> pathlib.Path:
    """Where image ``index`` of class ``label`` is written."""
    return pathlib.Path(out_dir) / label / f"{label}_{index:05d}.png"


def _remove_stale_images(class_dir: pathlib.Path, label: str, keep: set[pathlib.Path]) -> None:
    """Delete our images left by an earlier, larger run, so the folder holds exactly this set.

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
    does not depend on generation order or on the other counts, and the same arguments always
    give byte-identical files. A folder is made for every class, even with a count of 0, so
    that class indices inferred from folder names stay stable. Our own ``<class>_*.png`` files
    beyond the requested counts, left by an earlier run, are deleted.

    Args:
        out_dir: Root folder of the data set; created if missing.
        images_per_class: One count for all classes, or a mapping with a count for every class
            (for imbalanced sets like the real data).
        image_size: Width and height of the square images in pixels (at least 16).
        seed: Master seed (non-negative).
        blur_fraction: Probability that an image is out of focus (Gaussian blur).
        progress: Show a tqdm progress bar.

    Returns:
        The number of images written per class, in ``CLASS_NAMES`` order.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 0.0 <= blur_fraction <= 1.0:
        raise ValueError(f"blur_fraction must be in [0, 1], got {blur_fraction}")
    counts = _counts_per_class(images_per_class)
    total = sum(counts.values())
    with tqdm(total=total, desc="synthetic cassava", unit="img", disable=not progress) as bar:
        for class_index, label in enumerate(CLASS_NAMES):
            paths = [image_path(out_dir, label, index) for index in range(counts[label])]
            class_dir = pathlib.Path(out_dir) / label
            class_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_images(class_dir, label, set(paths))
            for index, path in enumerate(paths):
                # Separate streams for content and focus: blur_fraction changes which images
                # are blurred but never what they show.
                image_seed = np.random.SeedSequence([seed, class_index, index])
                content_seed, focus_seed = image_seed.spawn(2)
                image = render_leaf(label, np.random.default_rng(content_seed), image_size)
                image = _defocus(np.random.default_rng(focus_seed), image, blur_fraction)
                image.save(path, format="PNG")
                bar.update()
    return counts
