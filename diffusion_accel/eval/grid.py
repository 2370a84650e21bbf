"""Comparison grid: one row per variant, one column per prompt, same seeds.

Layout (pixels): a left margin of ``label_width`` holds each row's label (variant name and, if
given, its latency); a top band of ``header_height`` holds the column labels (prompts). Every cell
is ``cell_size`` x ``cell_size``; images are scaled to fit (nearest-neighbour when enlarging, so
tiny 32x32 samples stay crisp) and centred. The PNG is therefore exactly
``(label_width + columns * cell_size, header_height + rows * cell_size)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..paths import expand_home
from .images import to_pil

CELL_SIZE = 128
LABEL_WIDTH = 160
HEADER_HEIGHT = 32
PADDING = 4
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def grid_size(rows: int, columns: int, *, cell_size: int = CELL_SIZE, label_width: int = LABEL_WIDTH,
              header_height: int = HEADER_HEIGHT) -> tuple[int, int]:
    """(width, height) in pixels of a grid with ``rows`` x ``columns`` cells."""
    return label_width + columns * cell_size, header_height + rows * cell_size


def _fit(image: Image.Image, cell_size: int) -> Image.Image:
    """Scale ``image`` to fit a square cell, keeping its aspect ratio."""
    scale = min(cell_size / image.width, cell_size / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def _truncate(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels, keeping its last characters where they fit
    (names that differ only at the end, "...-v1" / "...-v2", were cut to the same label)."""
    if draw.textlength(text, font=font) <= width:
        return text
    tail = text[-TAIL_CHARS:] if len(text) > 2 * TAIL_CHARS else ""
    body = text[:len(text) - len(tail)]
    while body and draw.textlength(body + "..." + tail, font=font) > width:
        body = body[:-1]
    if body or not tail:
        return body + "..." + tail
    return _truncate(draw, text[:len(text) - len(tail)], width, font)  # too narrow for the tail: plain cut


TAIL_CHARS = 6  # characters of a long label kept after the ellipsis


def _check_layout(cell_size: int, label_width: int, header_height: int) -> None:
    if cell_size < 1 or label_width < 0 or header_height < 0:
        raise ValueError(f"need cell_size >= 1, label_width >= 0, header_height >= 0; got "
                         f"{cell_size}, {label_width}, {header_height}")


def make_grid(rows: Mapping[str, Any], *, column_labels: Sequence[str] | None = None,
              row_labels: Mapping[str, str] | None = None, cell_size: int = CELL_SIZE,
              label_width: int = LABEL_WIDTH, header_height: int = HEADER_HEIGHT) -> Image.Image:
    """Grid image of ``rows`` ({variant: images of one row, any image form}) with labels."""
    _check_layout(cell_size, label_width, header_height)
    images = {name: to_pil(row) for name, row in rows.items()}
    counts = {len(row) for row in images.values()}
    if len(counts) != 1:
        lengths = {name: len(row) for name, row in images.items()}
        raise ValueError(f"every row needs the same number of images; got {lengths}")
    columns = counts.pop()
    grid = Image.new("RGB", grid_size(len(images), columns, cell_size=cell_size, label_width=label_width,
                                      header_height=header_height), BACKGROUND)
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for column, label in enumerate(list(column_labels or [])[:columns]):
        text = _truncate(draw, " ".join(str(label).split()), cell_size - 2 * PADDING, font)  # one line
        draw.text((label_width + column * cell_size + PADDING, PADDING), text, fill=TEXT_COLOR, font=font)
    for row, (name, row_images) in enumerate(images.items()):
        top = header_height + row * cell_size
        label = (row_labels or {}).get(name, name)
        lines = [_truncate(draw, line, label_width - 2 * PADDING, font) for line in label.splitlines()]
        draw.multiline_text((PADDING, top + PADDING), "\n".join(lines), fill=TEXT_COLOR, font=font)
        for column, image in enumerate(row_images):
            cell = _fit(image, cell_size)
            grid.paste(cell, (label_width + column * cell_size + (cell_size - cell.width) // 2,
                              top + (cell_size - cell.height) // 2))
    return grid


GRID_FORMATS = {"": "PNG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}  # pixels a side the format can hold (PNG: no practical limit)


def grid_format(path: str | Path) -> str:
    """The PIL format ``path``'s suffix names (PNG without one); ValueError for a folder (or a path ending in a
    separator: ``newdir/`` became a PNG file named ``newdir``) or another suffix. The CLI asks before generating,
    so a bad ``--out`` costs no images."""
    target = expand_home(path)
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        raise ValueError(f"grid path {str(path)!r} is a folder; give an image file, e.g. {str(target / 'grid.png')!r}")
    suffix = target.suffix.lower()
    if suffix not in GRID_FORMATS:
        raise ValueError(f"grid path {str(target)!r}: unknown image suffix {target.suffix!r}; "
                         f"accepted: {', '.join(s for s in GRID_FORMATS if s)} (or none, for PNG)")
    return GRID_FORMATS[suffix]


def check_grid_fits(path: str | Path, size: tuple[int, int]) -> None:
    """ValueError when a grid of ``size`` (width, height) pixels exceeds what ``path``'s format holds (WebP 16383,
    JPEG 65500 a side): it failed in the encoder after every image was generated (until session 50)."""
    image_format = grid_format(path)
    limit = MAX_SIDE.get(image_format)
    if limit is not None and max(size) > limit:
        raise ValueError(f"a {size[0]}x{size[1]} grid exceeds {image_format}'s limit of {limit} pixels a side "
                         f"({str(path)!r}); write a .png, or use a smaller cell or fewer prompts or variants")


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    """Write the grid in the format its suffix names (PNG, JPEG or WebP; PNG without one: until session
    26 a ``.jpg`` path got PNG bytes); returns the path (``~`` expanded)."""
    image_format = grid_format(path)
    check_grid_fits(path, grid.size)
    target = expand_home(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    grid.save(target, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return target
