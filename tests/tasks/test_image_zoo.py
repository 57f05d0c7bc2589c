"""The image zoo: one file of every kind a user's photo folder may hold, through the real preparation.

Each kind has its expected outcome: kept (with the Pillow mode it came in, and a note when it is worth a
look) or skipped with the kind of reason. Pixel statistics check the scaling of the high-bit-depth kinds.
The bombs are PNGs whose header claims a huge size while the file stays a few kilobytes.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pytest
from PIL import Image

from tasks.data import prepare_dataset
from tasks.images import UnreadableImage, load_rgb_image, to_rgb
from tasks.params import validate_params
from tasks.prepared import PreparedData
from tests.conftest import tiny_params_tree

IMAGE_SIZE = 32  # tiny params: data.image_size


def _ramp(width: int = 48, height: int = 40) -> np.ndarray:
    """A 0..1 horizontal ramp (mean 0.5)."""
    return np.tile(np.linspace(0.0, 1.0, width), (height, 1))


def _write_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]) -> None:
    """A PNG written chunk by chunk, so a file can claim any size cheaply (rows of zeros compress ~1000:1)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    compressor, compressed = zlib.compressobj(9), bytearray()
    for row in rows:
        compressed += compressor.compress(b"\x00" + row)  # filter type 0 per row
    compressed += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(compressed)) + chunk(b"IEND", b""))


def _bomb(path: Path, side: int) -> None:
    _write_png(path, side, side, 1, 0, (bytes((side + 7) // 8) for _ in range(side)))


def _rgb(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _build_zoo(folder: Path) -> dict[str, tuple[str, str]]:
    """Writes the zoo; returns file -> (expected outcome "kept:<mode>" or "skipped", note or skip kind)."""
    folder.mkdir(parents=True)
    expected: dict[str, tuple[str, str]] = {}
    ramp = _ramp()

    def keep(name: str, image: Image.Image, mode: str, note: str = "", **save: object) -> None:
        image.save(folder / name, **save)
        expected[name] = (f"kept:{mode}", note)

    keep("rgb.jpg", _rgb(1), "RGB", quality=95)
    keep("grey.png", Image.fromarray((ramp * 200).astype(np.uint8)), "L")
    keep("grey16.png", Image.fromarray((ramp * 60000 + 2000).astype(np.uint16)), "I;16")
    keep("int32.tif", Image.fromarray((ramp * 50000 + 3000).astype(np.int32), "I"), "I")
    keep("float.tif", Image.fromarray((ramp * 0.9 + 0.05).astype(np.float32), "F"), "F")
    keep("grey_alpha.png", Image.fromarray((ramp * 150).astype(np.uint8)).convert("LA"), "LA")
    keep("bilevel.png", Image.fromarray(ramp > 0.5).convert("1"), "1")
    keep("cmyk.jpg", _rgb(2).convert("CMYK"), "CMYK", quality=95)
    transparent = _rgb(3).quantize(colors=8)
    keep("palette_transparent.png", transparent, "P", transparency=0)
    keep("palette.gif", _rgb(4).quantize(colors=16), "P")
    rgba = _rgb(5).convert("RGBA")
    rgba.putalpha(Image.fromarray((ramp * 255).astype(np.uint8)))
    keep("rgba.png", rgba, "RGBA")
    lightness = Image.fromarray((ramp * 255).astype(np.uint8))
    keep("lab.tif", Image.merge("LAB", [lightness, Image.new("L", (48, 40), 128), Image.new("L", (48, 40), 140)]), "LAB")
    keep("small_12px.png", _rgb(7, (12, 12)), "RGB", "upscaled")
    frames = [_rgb(8 + index) for index in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    expected["animated.gif"] = ("kept:P", "")
    rows16 = (np.tile(np.linspace(1000, 64000, 48), (40, 1))[..., None] * np.ones(3)).astype(">u2")
    _write_png(folder / "rgb48.png", 48, 40, 16, 2, (row.tobytes() for row in rows16))
    expected["rgb48.png"] = ("kept:RGB", "")
    keep("huge_41mp.jpg", Image.new("L", (8000, 5200), 90), "L", "very-large", quality=50)

    def skip(name: str, kind: str) -> None:
        expected[name] = ("skipped", kind)

    _rgb(9, (1, 1)).save(folder / "one_pixel.png")
    skip("one_pixel.png", "too-small")
    _rgb(10, (64, 4)).save(folder / "sliver_64x4.png")
    skip("sliver_64x4.png", "too-small")
    _bomb(folder / "bomb_400mp.png", 20000)  # past Pillow's error limit (~179 MP)
    skip("bomb_400mp.png", "decompression-bomb")
    _bomb(folder / "bomb_100mp.png", 10000)  # in Pillow's warning range (89-179 MP): refused too
    skip("bomb_100mp.png", "decompression-bomb")
    buffer = io.BytesIO()
    _rgb(11).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    skip("truncated.jpg", "truncated")
    buffer = io.BytesIO()
    _rgb(12).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 40] = bytes(38)  # the compressed stream is garbage; the file keeps its length
    (folder / "corrupt.png").write_bytes(bytes(data))
    skip("corrupt.png", "corrupt")
    (folder / "notes.jpg").write_text("not an image at all")
    skip("notes.jpg", "not-an-image")
    (folder / "empty.png").write_bytes(b"")
    skip("empty.png", "zero-byte")
    return expected


@pytest.mark.reliability
def test_every_kind_of_image_is_converted_or_skipped_with_its_reason(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    expected = _build_zoo(raw / "zoo")
    for index in range(8):  # a second class, so the zoo can be split like a real data set
        (raw / "filler").mkdir(exist_ok=True)
        _rgb(100 + index).save(raw / "filler" / f"filler_{index}.png")
    params = validate_params(tiny_params_tree(["data.min_images_per_class=4"]))

    report = prepare_dataset(params.data, raw, tmp_path / "prepared")
    written = json.loads(PreparedData(tmp_path / "prepared").report_file.read_text())
    skipped = {entry["path"].removeprefix("zoo/"): entry for entry in written["skipped"]}
    flagged = {entry["path"].removeprefix("zoo/"): entry["kind"] for entry in written["flagged"]}
    with PreparedData(tmp_path / "prepared").manifest_file.open() as handle:
        kept = {row["path"].removeprefix("zoo/"): row["original_mode"] for row in csv.DictReader(handle)}
    outcome = {}
    for name in expected:
        if name in kept:
            outcome[name] = (f"kept:{kept[name]}", flagged.get(name, ""))
        else:
            outcome[name] = ("skipped", skipped[name]["kind"])
    assert outcome == expected
    assert written["skipped_by_kind"] == {"corrupt": 1, "decompression-bomb": 2, "not-an-image": 1,
                                          "too-small": 2, "truncated": 1, "zero-byte": 1}
    assert "20000x20000" not in skipped["bomb_400mp.png"]["reason"]  # Pillow's own words, never decoded
    assert "400000000 pixels" in skipped["bomb_400mp.png"]["reason"]
    assert "data.min_image_side = 8" in skipped["one_pixel.png"]["reason"]
    assert report.images_kept == len(kept) == sum(1 for o, _ in expected.values() if o != "skipped") + 8
    print(f"image zoo: {len(expected)} kinds, {len(kept) - 8} kept, {len(skipped)} skipped with a named reason")


@pytest.mark.parametrize(
    ("name", "pixels", "mean_range"),
    [
        # 16-bit grey 2000..62000 must scale to ~8..241 (mean ~125), not saturate to white.
        ("grey16", (np.tile(np.linspace(0, 1, 48), (40, 1)) * 60000 + 2000).astype(np.uint16), (115, 135)),
        ("int32", (np.tile(np.linspace(0, 1, 48), (40, 1)) * 50000 + 3000).astype(np.int32), (95, 115)),
        ("float01", np.tile(np.linspace(0.05, 0.95, 48), (40, 1)).astype(np.float32), (120, 135)),
        ("float_wide", np.tile(np.linspace(-5, 5, 48), (40, 1)).astype(np.float32), (120, 135)),
    ],
)
def test_high_bit_depth_grey_is_scaled_not_clipped(tmp_path: Path, name: str, pixels: np.ndarray,
                                                   mean_range: tuple[float, float]) -> None:
    image = Image.fromarray(pixels)
    path = tmp_path / f"{name}.{'png' if pixels.dtype == np.uint16 else 'tif'}"
    image.save(path)
    loaded = load_rgb_image(path, IMAGE_SIZE)
    values = loaded.pixels.astype(float)
    assert mean_range[0] <= values.mean() <= mean_range[1]
    assert (values >= 250).mean() < 0.1 and values.max() - values.min() > 150  # a ramp, neither white nor flat


def test_modes_without_a_file_format_convert_too() -> None:
    palette = Image.new("RGB", (16, 16), (0, 0, 0)).convert("P")  # palette index 0 is black
    transparent = Image.merge("PA", [palette, Image.new("L", (16, 16), 0)])
    for image, colour in [
        (transparent, (255, 255, 255)),  # palette + alpha, fully transparent: white
        (Image.new("HSV", (16, 16), (0, 255, 255)), (255, 0, 0)),  # pure red
        (Image.new("YCbCr", (16, 16), (128, 128, 128)), (128, 128, 128)),
        (Image.new("RGBa", (16, 16), (0, 0, 0, 0)), (255, 255, 255)),  # fully transparent: white
    ]:
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == (16, 16)
        if colour:
            assert rgb.getpixel((0, 0)) == pytest.approx(colour, abs=2)


def test_a_bomb_is_refused_from_its_header_without_raising_pillows_limit(tmp_path: Path) -> None:
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default: nothing in tasks/ raises it
    _bomb(tmp_path / "bomb.png", 12000)
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(UnreadableImage, match="decompression bomb") as refused:
        load_rgb_image(tmp_path / "bomb.png", IMAGE_SIZE)
    assert refused.value.kind == "decompression-bomb"
