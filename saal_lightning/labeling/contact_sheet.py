"""One PNG that shows a query's images in a grid, each with its caption: what a person labels from.

Every image gets a cell of the same size: a ``thumbnail`` x ``thumbnail`` square, the image fitted into it
(aspect ratio kept, centred, on white), with a caption strip of :data:`CAPTION_HEIGHT` pixels under it and
:data:`CELL_PADDING` pixels of white around the square and the strip. Cells run left to right, then top to
bottom, in the order given; the sheet is ``min(columns, n)`` cells wide, so a short query is not padded with
empty cells on the right.

Example::

    >>> import tempfile
    >>> from PIL import Image
    >>> folder = tempfile.TemporaryDirectory()
    >>> images = [Image.new("L", (28, 28), 0), Image.new("RGB", (40, 20), (255, 0, 0))]
    >>> sheet = write_contact_sheet(f"{folder.name}/query.png", images, ["#0 Bag 0.91", "#1 Coat 0.35"], thumbnail=64)
    >>> Image.open(sheet).size  # 2 cells of (64 + 2 * 4) x (64 + 14 + 2 * 4)
    (144, 86)
    >>> folder.cleanup()
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from saal_lightning.reporting.atomic_file import atomic_write_bytes

#: White space, in pixels, between the cell's edge and its thumbnail square (and its caption strip).
CELL_PADDING = 4
#: Height, in pixels, of the caption strip under each thumbnail: one line of Pillow's default font.
CAPTION_HEIGHT = 14
#: White space, in pixels, kept on each side of a caption so that neighbouring captions never touch.
CAPTION_MARGIN = 1
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
ELLIPSIS = "…"

_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont


def cell_size(thumbnail: int) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of one cell of a sheet with this thumbnail size.

    >>> cell_size(96)
    (104, 118)
    """
    return thumbnail + 2 * CELL_PADDING, thumbnail + CAPTION_HEIGHT + 2 * CELL_PADDING


def sheet_size(count: int, thumbnail: int, columns: int) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of the sheet for ``count`` images.

    >>> sheet_size(20, 96, 8)  # 8 columns, 3 rows
    (832, 354)
    """
    width, height = cell_size(thumbnail)
    return min(columns, count) * width, math.ceil(count / columns) * height


def write_contact_sheet(
    path: str | os.PathLike,
    images: Sequence[Image.Image | str | os.PathLike],
    captions: Sequence[str],
    thumbnail: int = 96,
    columns: int = 8,
) -> Path:
    """Write one PNG showing ``images`` in a grid, in the given order, each with its caption under it.

    Args:
        path: the PNG to write; its folder is created if missing. It is replaced atomically, so a reader
            never sees a half-written sheet.
        images: Pillow images or paths of image files, in any mode (grey-scale, RGB, RGBA, palette, ...).
            Transparent parts show as white.
        captions: one line per image, e.g. ``"#3 T-shirt/top 0.812"`` (row, pseudo label, score). A caption
            wider than its cell is shortened with "…".
        thumbnail: the side, in pixels, of the square each image is fitted into (small images are enlarged).
        columns: the most cells in a row.

    Returns:
        The path written.

    Raises:
        ValueError: no images, a different number of captions than images, or a size that is not positive.
    """
    images, captions = list(images), list(captions)
    if not images:
        raise ValueError("write_contact_sheet: no images to show; pass at least one image")
    if len(captions) != len(images):
        raise ValueError(
            f"write_contact_sheet: {len(images)} images but {len(captions)} captions; pass one caption per image"
        )
    for name, value in (("thumbnail", thumbnail), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"write_contact_sheet: {name} must be a positive whole number, got {value!r}")

    font = ImageFont.load_default()
    cell_width, cell_height = cell_size(thumbnail)
    sheet = Image.new("RGB", sheet_size(len(images), thumbnail, columns), BACKGROUND)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        row, column = divmod(index, columns)
        left, top = column * cell_width, row * cell_height
        picture = _fit(_as_rgb(image), thumbnail)
        sheet.paste(
            picture,
            (
                left + CELL_PADDING + (thumbnail - picture.width) // 2,
                top + CELL_PADDING + (thumbnail - picture.height) // 2,
            ),
        )
        strip = _caption_strip(caption, cell_width - 2 * CAPTION_MARGIN, font)
        sheet.paste(strip, (left + CAPTION_MARGIN, top + CELL_PADDING + thumbnail))

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def _as_rgb(image: Image.Image | str | os.PathLike) -> Image.Image:
    """The image in RGB; transparency is composited onto white, since a plain convert would make it black."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            opened.load()
            image = opened.copy()
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _fit(image: Image.Image, thumbnail: int) -> Image.Image:
    """The image scaled to fit a ``thumbnail`` square with its aspect ratio kept (never below 1 pixel)."""
    scale = thumbnail / max(image.width, image.height)
    size = (max(1, min(thumbnail, round(image.width * scale))), max(1, min(thumbnail, round(image.height * scale))))
    if size == image.size:
        return image
    # Enlarging a 28x28 item with NEAREST keeps its pixels sharp, which is what a person judges it by;
    # shrinking a large photo needs a filter that averages, or it aliases.
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def _caption_strip(caption: str, width: int, font: _Font) -> Image.Image:
    """The caption drawn, centred, on its own white strip: pasting the strip can never spill into a neighbour."""
    strip = Image.new("RGB", (width, CAPTION_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    text = _shorten(" ".join(caption.split()), width, draw, font)  # one line: newlines and tabs become spaces
    if not text:
        return strip
    # Centre the line's ink vertically, measured on letters with ascenders and descenders so that every
    # caption sits on the same baseline whatever its letters.
    _, ink_top, _, ink_bottom = draw.textbbox((0, 0), "Ag", font=font)
    y = (CAPTION_HEIGHT - (ink_bottom - ink_top)) // 2 - ink_top
    x = max(0, (width - round(draw.textlength(text, font=font))) // 2)
    draw.text((x, y), text, fill=TEXT_COLOUR, font=font)
    return strip


def _shorten(text: str, width: int, draw: ImageDraw.ImageDraw, font: _Font) -> str:
    """``text``, or its longest start that fits ``width`` pixels followed by an ellipsis."""

    def fits(candidate: str) -> bool:
        return draw.textlength(candidate, font=font) <= width

    text = _drawable(text, draw, font)
    if fits(text):
        return text
    ellipsis = _drawable(ELLIPSIS, draw, font)
    # Binary search on the number of characters kept: text widths grow with length.
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[:middle].rstrip() + ellipsis):
            low = middle
        else:
            high = middle - 1
    shortened = text[:low].rstrip() + ellipsis
    return shortened if fits(shortened) else ""


def _drawable(text: str, draw: ImageDraw.ImageDraw, font: _Font) -> str:
    """``text`` as the font can draw it: Pillow's bitmap fallback font (no FreeType) only knows Latin-1."""
    try:
        draw.textlength(text, font=font)
    except UnicodeEncodeError:
        text = text.replace(ELLIPSIS, "...").encode("latin-1", "replace").decode("latin-1")
    return text
