"""Sample grids: tiles upscaled by an integer factor to at least 128 px with nearest-neighbour
(the model's pixels repeated, none interpolated) under a strip that names each column."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harness.grids import MIN_TILE, STRIP, labelled_grid


def _tile(value: int, size: int = 32) -> Image.Image:
    pixels = np.full((size, size), value, dtype=np.uint8)
    pixels[0, 0] = 255 - value  # one odd pixel: nearest-neighbour makes it a 4x4 block
    return Image.fromarray(pixels)


def test_tiles_are_upscaled_nearest_and_columns_labelled():
    rows = [[_tile(40), _tile(80)], [_tile(120), _tile(160)]]
    grid = labelled_grid(rows, ["Pleural Effusion", "No Finding"])
    assert grid.size == (2 * MIN_TILE, STRIP + 2 * MIN_TILE) and grid.mode == "RGB"
    pixels = np.asarray(grid.convert("L"))
    tiles = pixels[STRIP:]
    assert (tiles[:4, :4] == 215).all() and tiles[4, 4] == 40  # the odd pixel, repeated 4x4
    assert set(np.unique(tiles[MIN_TILE + 8:, MIN_TILE + 8:])) == {160}  # no interpolated values
    strip = pixels[:STRIP]
    for column in range(2):  # dark text on white in each column's part of the strip
        part = strip[:, column * MIN_TILE:(column + 1) * MIN_TILE]
        assert part.max() == 255 and part.min() < 100


def test_large_tiles_are_kept_and_bad_rows_refused():
    grid = labelled_grid([[_tile(0, 200)]], ["Edema"])
    assert grid.size == (200, STRIP + 200)
    with pytest.raises(ValueError, match="one per column"):
        labelled_grid([[_tile(0)]], ["Edema", "No Finding"])
