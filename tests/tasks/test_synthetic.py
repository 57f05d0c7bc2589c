"""Tests for the synthetic cassava data set: layout, counts, determinism, class cues and blur."""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from tasks.synthetic import CLASS_NAMES, generate_synthetic_dataset, render_leaf

SIZE = 48  # small images keep the whole file fast; the pipeline itself uses larger ones


def _generate(
    out_dir: pathlib.Path,
    counts: int | dict[str, int],
    seed: int = 0,
    image_size: int = SIZE,
    blur_fraction: float = 0.1,
) -> dict[str, int]:
    """generate_synthetic_dataset without a progress bar, defaults suited to fast tests."""
    return generate_synthetic_dataset(
        out_dir, counts, image_size, seed, blur_fraction=blur_fraction, progress=False
    )


def _png_files(root: pathlib.Path) -> dict[str, bytes]:
    """Relative path -> file bytes for every PNG under ``root``."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.png"))}


def _laplacian_variance(path: pathlib.Path) -> float:
    """Variance of the discrete Laplacian of the grey image: the usual sharpness measure."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    centre = grey[1:-1, 1:-1]
    laplacian = 4.0 * centre - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(laplacian.var())


def _hsv_fraction(
    image: Image.Image,
    hues: tuple[float, float],
    min_saturation: float,
    values: tuple[float, float],
) -> float:
    """Fraction of pixels with hue (degrees) and value in the given ranges, above a saturation."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float64) / 255.0
    hue, saturation, value = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    in_hues = (hue >= hues[0]) & (hue < hues[1])
    in_values = (value >= values[0]) & (value < values[1])
    return float((in_hues & in_values & (saturation > min_saturation)).mean())


def chlorotic_fraction(image: Image.Image) -> float:
    """Bright yellow to yellow-green pixels: the colour of mosaic, mottle and streak chlorosis."""
    return _hsv_fraction(image, (40.0, 90.0), 0.4, (0.4, 1.01))


def brown_fraction(image: Image.Image) -> float:
    """Dark saturated brown pixels: the colour of blight lesions and dried lobe tips."""
    return _hsv_fraction(image, (10.0, 45.0), 0.45, (0.0, 0.5))


@functools.cache
def _healthy_leaf(seed: int) -> Image.Image:
    """The healthy twin of a scene; cached because every disease is compared with it."""
    return render_leaf("healthy", np.random.default_rng(seed), 64)


def test_class_names_are_the_five_cassava_classes() -> None:
    assert CLASS_NAMES == ("cbb", "cbsd", "cgm", "cmd", "healthy")


def test_writes_class_folders_with_numbered_rgb_pngs(tmp_path: pathlib.Path) -> None:
    counts = _generate(tmp_path, 3)

    assert counts == {label: 3 for label in CLASS_NAMES}
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(CLASS_NAMES)
    for label in CLASS_NAMES:
        names = sorted(path.name for path in (tmp_path / label).iterdir())
        assert names == [f"{label}_{index:05d}.png" for index in range(3)]
        for name in names:
            with Image.open(tmp_path / label / name) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_mapping_gives_imbalanced_counts(tmp_path: pathlib.Path) -> None:
    wanted = {"cbb": 2, "cbsd": 0, "cgm": 1, "cmd": 6, "healthy": 3}

    counts = _generate(tmp_path, wanted)

    assert counts == wanted
    for label, count in wanted.items():
        assert len(list((tmp_path / label).glob("*.png"))) == count
    # An empty class still gets its folder, so folder-derived class indices stay stable.
    assert (tmp_path / "cbsd").is_dir()


@pytest.mark.parametrize(
    "bad_counts",
    [{"cbb": 1, "cbsd": 1, "cgm": 1, "cmd": 1}, {label: 1 for label in (*CLASS_NAMES, "rust")}],
    ids=["missing-class", "unknown-class"],
)
def test_mapping_must_name_exactly_the_classes(
    tmp_path: pathlib.Path, bad_counts: dict[str, int]
) -> None:
    with pytest.raises(ValueError, match="images_per_class"):
        _generate(tmp_path, bad_counts)


def test_rerun_with_fewer_images_removes_only_stale_generated_files(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path, 3)
    foreign = tmp_path / "cmd" / "notes.txt"
    foreign.write_text("not ours")

    _generate(tmp_path, 1)

    assert sorted(path.name for path in (tmp_path / "cmd").glob("*.png")) == ["cmd_00000.png"]
    assert foreign.read_text() == "not ours"


def test_same_seed_gives_byte_identical_files(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path / "a", 2, seed=7)
    _generate(tmp_path / "b", 2, seed=7)

    first, second = _png_files(tmp_path / "a"), _png_files(tmp_path / "b")
    assert len(first) == 2 * len(CLASS_NAMES)
    assert first == second


def test_different_seed_gives_different_images(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path / "a", 2, seed=7)
    _generate(tmp_path / "b", 2, seed=8)

    first, second = _png_files(tmp_path / "a"), _png_files(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_image_does_not_depend_on_how_many_images_are_generated(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path / "few", 1, seed=3)
    _generate(tmp_path / "many", {"cbb": 4, "cbsd": 2, "cgm": 1, "cmd": 3, "healthy": 2}, seed=3)

    few, many = _png_files(tmp_path / "few"), _png_files(tmp_path / "many")
    assert all(few[name] == many[name] for name in few)


def test_images_within_a_class_differ(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path, 4)

    assert len(set(_png_files(tmp_path).values())) == 4 * len(CLASS_NAMES)


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_render_leaf_returns_rgb_image_of_requested_size(label: str) -> None:
    image = render_leaf(label, np.random.default_rng(0), 40)

    assert (image.mode, image.size) == ("RGB", (40, 40))
    # Not a flat canvas: a leaf on clutter has a wide range of tones.
    assert np.asarray(image).std() > 10


def test_render_leaf_rejects_unknown_class() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        render_leaf("rust", np.random.default_rng(0), SIZE)


@pytest.mark.parametrize(
    ("label", "feature", "min_z", "min_share_up"),
    [
        ("cmd", chlorotic_fraction, 4.0, 0.75),
        ("cbsd", chlorotic_fraction, 4.0, 0.75),
        ("cgm", chlorotic_fraction, 2.5, 0.6),  # mottle is meant to be faint
        ("cbb", brown_fraction, 4.0, 0.75),
    ],
)
def test_diseased_leaves_show_their_symptom_colour_more_than_healthy_ones(
    label: str, feature: Callable[[Image.Image], float], min_z: float, min_share_up: float
) -> None:
    # Paired over the same generator states, so background, pose and lighting are shared and
    # only the symptoms differ; over a few dozen pairs the shift must be clearly significant.
    diseased = [render_leaf(label, np.random.default_rng(seed), 64) for seed in range(24)]
    shifts = np.array(
        [feature(image) - feature(_healthy_leaf(seed)) for seed, image in enumerate(diseased)]
    )

    standard_error = shifts.std(ddof=1) / np.sqrt(len(shifts))
    assert shifts.mean() > min_z * standard_error
    assert np.mean(shifts > 0) >= min_share_up


def test_blur_fraction_one_blurs_every_image(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path / "sharp", 2, seed=5, image_size=64, blur_fraction=0.0)
    _generate(tmp_path / "blurred", 2, seed=5, image_size=64, blur_fraction=1.0)

    for path in sorted((tmp_path / "sharp").rglob("*.png")):
        blurred = tmp_path / "blurred" / path.relative_to(tmp_path / "sharp")
        assert _laplacian_variance(blurred) < 0.5 * _laplacian_variance(path)


def test_blur_fraction_blurs_some_images_and_keeps_their_content(tmp_path: pathlib.Path) -> None:
    _generate(tmp_path / "sharp", 8, seed=5, blur_fraction=0.0)
    _generate(tmp_path / "mixed", 8, seed=5, blur_fraction=0.5)

    # Unblurred images are byte-identical to their sharp twins; the others must be softer.
    sharp, mixed = _png_files(tmp_path / "sharp"), _png_files(tmp_path / "mixed")
    blurred = [name for name in sharp if sharp[name] != mixed[name]]
    assert 8 <= len(blurred) <= 32  # of 40 at p = 0.5
    for name in blurred:
        sharpness = _laplacian_variance(tmp_path / "sharp" / name)
        assert _laplacian_variance(tmp_path / "mixed" / name) < sharpness
