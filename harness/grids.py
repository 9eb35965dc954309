"""Sample grids a person can read: one column per prompt under a strip naming it, every tile at
least ``MIN_TILE`` px (nearest-neighbour upscaling: the model's own pixels, none made up)."""

from __future__ import annotations

from PIL import Image, ImageDraw

MIN_TILE = 128
STRIP = 16  # px of the label strip: one line of PIL's default font


def labelled_grid(rows: list[list[Image.Image]], columns: list[str], min_tile: int = MIN_TILE) -> Image.Image:
    """``rows`` of images (one per column) tiled by diffusers' ``make_image_grid`` under a white
    strip with each column's label, lower case ('Pleural Effusion' -> 'pleural effusion',
    'No Finding' -> 'no finding'). RGB."""
    from diffusers.utils import make_image_grid

    if not rows or any(len(row) != len(columns) for row in rows):
        raise ValueError(f"labelled_grid: need rows of {len(columns)} images, one per column {columns}")
    width, height = rows[0][0].size
    scale = max(1, -(-min_tile // min(width, height)))  # the smallest integer factor that reaches min_tile
    tiles = [im.convert("RGB").resize((width * scale, height * scale), Image.NEAREST) for row in rows for im in row]
    grid = make_image_grid(tiles, rows=len(rows), cols=len(columns))
    out = Image.new("RGB", (grid.width, grid.height + STRIP), "white")
    out.paste(grid, (0, STRIP))
    draw = ImageDraw.Draw(out)
    tile = width * scale
    for j, label in enumerate(columns):
        text = label.lower()
        draw.text((j * tile + max(2, (tile - draw.textlength(text)) / 2), 2), text, fill="black")
    return out
