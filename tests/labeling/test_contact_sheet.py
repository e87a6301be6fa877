"""write_contact_sheet: the grid's size, each image in its own cell in order, captions kept in their cells."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from PIL import Image

from saal_lightning.labeling.contact_sheet import (
    CAPTION_HEIGHT,
    CAPTION_MARGIN,
    CELL_PADDING,
    _shorten,
    write_contact_sheet,
)

WHITE = (255, 255, 255)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sample_images(tmp_path: Path) -> tuple[list[Image.Image | Path], list[tuple[int, int, int]]]:
    """Solid squares and oblongs in several modes (one given as a file path), and the RGB colour each shows."""
    saved = tmp_path / "saved.png"
    Image.new("RGB", (50, 50), (0, 128, 255)).save(saved)
    palette = Image.new("RGB", (30, 30), (200, 40, 40)).convert("P", palette=Image.Palette.ADAPTIVE)
    images: list[Image.Image | Path] = [
        Image.new("L", (28, 28), 0),  # grey-scale, enlarged
        Image.new("RGB", (200, 150), (255, 0, 0)),  # RGB, shrunk
        Image.new("RGB", (300, 12), (0, 160, 0)),  # very wide: a thin band across the square
        Image.new("RGBA", (40, 40), (0, 0, 255, 255)),  # opaque RGBA
        Image.new("L", (12, 60), 90),  # tall
        saved,  # a path, not an image
        palette,  # palette mode
        Image.new("RGBA", (40, 40), (10, 10, 10, 0)),  # fully transparent: shows as white
        Image.new("L", (10, 10), 200),  # the 9th image: second row of an 8-column sheet
    ]
    colours = [(0, 0, 0), (255, 0, 0), (0, 160, 0), (0, 0, 255), (90, 90, 90), (0, 128, 255), (200, 40, 40), WHITE,
               (200, 200, 200)]
    return images, colours


def _cell_origin(index: int, thumbnail: int, columns: int) -> tuple[int, int]:
    width, height = thumbnail + 2 * CELL_PADDING, thumbnail + CAPTION_HEIGHT + 2 * CELL_PADDING
    row, column = divmod(index, columns)
    return column * width, row * height


def test_layout_constants_are_the_documented_ones() -> None:
    # The dimensions asserted below are derived from these; a change to them should be a deliberate one.
    assert (CELL_PADDING, CAPTION_HEIGHT, CAPTION_MARGIN) == (4, 14, 1)


@pytest.mark.parametrize(("thumbnail", "columns"), [(96, 8), (32, 4), (20, 20)])
def test_sheet_size_is_the_grid_of_cells(tmp_path: Path, thumbnail: int, columns: int) -> None:
    images, _ = _sample_images(tmp_path)
    sheet = write_contact_sheet(tmp_path / "sheet.png", images, [f"#{i}" for i in range(9)], thumbnail, columns)
    cell_width, cell_height = thumbnail + 2 * 4, thumbnail + 14 + 2 * 4
    with Image.open(sheet) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == (min(columns, 9) * cell_width, math.ceil(9 / columns) * cell_height)
    # Spelled out for the defaults: 8 columns of 104 px, 2 rows of 118 px.
    if (thumbnail, columns) == (96, 8):
        assert png.size == (832, 236)


def test_each_cell_shows_its_own_image_in_order(tmp_path: Path) -> None:
    images, colours = _sample_images(tmp_path)
    thumbnail, columns = 40, 4
    sheet = write_contact_sheet(tmp_path / "sheet.png", images, [""] * len(images), thumbnail, columns)
    with Image.open(sheet) as png:
        png.load()
    for index, colour in enumerate(colours):
        left, top = _cell_origin(index, thumbnail, columns)
        centre = (left + CELL_PADDING + thumbnail // 2, top + CELL_PADDING + thumbnail // 2)
        assert png.getpixel(centre) == colour, f"cell {index}"


def test_aspect_ratio_is_kept_and_the_image_centred_on_white(tmp_path: Path) -> None:
    # A 4:1 image in a 40 px square: 40 x 10, rows 15..24 of the square, white above and below.
    sheet = write_contact_sheet(tmp_path / "wide.png", [Image.new("RGB", (200, 50), (255, 0, 0))], ["wide"], 40, 8)
    with Image.open(sheet) as png:
        column = [png.getpixel((CELL_PADDING + 20, CELL_PADDING + y)) for y in range(40)]
        row = [png.getpixel((CELL_PADDING + x, CELL_PADDING + 20)) for x in range(40)]
    assert column == [WHITE] * 15 + [(255, 0, 0)] * 10 + [WHITE] * 15
    assert row == [(255, 0, 0)] * 40


def test_a_long_caption_is_shortened_and_stays_in_its_cell(tmp_path: Path) -> None:
    thumbnail = 32
    captions = ["#0 T-shirt/top 0.812 and a great deal more text than fits", ""]
    images = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 0)]
    sheet = write_contact_sheet(tmp_path / "sheet.png", images, captions, thumbnail, 2)
    cell_width = thumbnail + 2 * CELL_PADDING
    with Image.open(sheet) as png:
        strip = range(CELL_PADDING + thumbnail, CELL_PADDING + thumbnail + CAPTION_HEIGHT)
        ink = {x for x in range(png.width) for y in strip if png.getpixel((x, y)) != WHITE}
    assert ink, "the caption was drawn"
    # All the ink lies inside the first cell's caption area, which ends a margin short of the second cell.
    assert min(ink) >= CAPTION_MARGIN and max(ink) < cell_width - CAPTION_MARGIN


def test_shorten_ends_with_an_ellipsis_and_fits() -> None:
    from PIL import ImageDraw, ImageFont

    font, draw = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert _shorten("#3 Bag 0.5", 200, draw, font) == "#3 Bag 0.5"
    short = _shorten("#3 T-shirt/top 0.812", 50, draw, font)
    assert short.endswith("…") and "#3 T-shirt/top 0.812".startswith(short[:-1])
    assert draw.textlength(short, font=font) <= 50
    assert _shorten("anything", 1, draw, font) == ""  # not even the ellipsis fits


def test_file_mode_is_an_ordinary_files(tmp_path: Path) -> None:
    sheet = write_contact_sheet(tmp_path / "sub" / "sheet.png", [Image.new("L", (5, 5))], ["x"])
    assert sheet == tmp_path / "sub" / "sheet.png"
    assert sheet.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in sheet.parent.iterdir()] == ["sheet.png"]  # no temporary file left behind


def test_rewriting_replaces_the_sheet(tmp_path: Path) -> None:
    target = tmp_path / "sheet.png"
    write_contact_sheet(target, [Image.new("L", (5, 5))] * 3, ["a", "b", "c"], thumbnail=10)
    write_contact_sheet(target, [Image.new("L", (5, 5))], ["a"], thumbnail=10)
    with Image.open(target) as png:
        assert png.size == (10 + 2 * CELL_PADDING, 10 + CAPTION_HEIGHT + 2 * CELL_PADDING)


@pytest.mark.parametrize(
    ("images", "captions", "options", "message"),
    [
        ([Image.new("L", (5, 5))] * 2, ["only one"], {}, "2 images but 1 captions; pass one caption per image"),
        ([], [], {}, "no images to show; pass at least one image"),
        ([Image.new("L", (5, 5))], ["x"], {"thumbnail": 0}, "thumbnail must be a positive whole number, got 0"),
        ([Image.new("L", (5, 5))], ["x"], {"columns": -1}, "columns must be a positive whole number, got -1"),
    ],
)
def test_bad_arguments_say_what_is_wrong(tmp_path: Path, images, captions, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_contact_sheet(tmp_path / "sheet.png", images, captions, **options)
    assert not (tmp_path / "sheet.png").exists()
