"""Grid captions: each tile's prompt written under it (PIL's built-in font), on by default for
``sample-grid`` and off with ``task.captions = false``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from t2i_engine.cli import main
from t2i_engine.utils.images import make_grid, wrap_text

TILE = 16


def _tiles(n: int) -> torch.Tensor:
    return torch.rand(n, 3, TILE, TILE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _band(grid: Image.Image) -> np.ndarray:
    """The strip under the first row of tiles (2 px padding, then the tile)."""
    return np.asarray(grid.convert("L"))[2 + TILE:, :]


def test_captions_add_text_under_the_tiles_and_leave_the_tiles_alone() -> None:
    images = _tiles(4)
    plain = make_grid(images, nrow=2)
    captioned = make_grid(images, nrow=2, captions=["a red fox", "snow", "a cat", "sky"])
    assert plain.size == (2 * (TILE + 2) + 2, 2 * (TILE + 2) + 2)
    assert captioned.width == plain.width and captioned.height > plain.height
    top = slice(2, 2 + TILE)
    assert np.array_equal(np.asarray(captioned)[top], np.asarray(plain)[top])  # first row of tiles as before
    band = _band(captioned)[: captioned.height // 2 - TILE]
    for col in range(2):  # ink under each tile of the first row
        x = 2 + col * (TILE + 2)
        assert (band[:, x:x + TILE] < 128).any()


def test_caption_text_decides_the_ink() -> None:
    images = _tiles(2)
    a = make_grid(images, nrow=2, captions=["abc", "abc"])
    b = make_grid(images, nrow=2, captions=["abc", "xyz"])
    left, right = slice(2, 2 + TILE), slice(4 + TILE, 4 + 2 * TILE)
    assert np.array_equal(_band(a)[:, left], _band(b)[:, left])
    assert not np.array_equal(_band(a)[:, right], _band(b)[:, right])
    blank = make_grid(images, nrow=2, captions=["", ""])
    assert (_band(blank) == 255).all()


def test_wrap_text_fits_the_width_and_keeps_every_word() -> None:
    font = ImageFont.load_default()
    text = "a green triangle on a yellow background supercalifragilisticexpialidocious"
    lines = wrap_text(text, font, 40)
    assert len(lines) > 2 and all(font.getlength(line) <= 40 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_caption_count_must_match() -> None:
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        make_grid(_tiles(3), captions=["a", "b"])


def _grid_config(tmp_path: Path) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(f"""
[engine]
plugins = ["sd"]
output_dir = {str(tmp_path / "out")!r}

[task]
name = "sample-grid"
prompts = ["a red square"]
images_per_prompt = 2
size = 16

[model]
type = "stable-diffusion"
preset = "tiny"

[sampler]
name = "euler"
steps = 1
""")
    return path


@pytest.mark.slow
def test_sample_grid_captions_key(tmp_path: Path) -> None:
    config = _grid_config(tmp_path)
    assert main(["run", str(config)]) == 0
    assert main(["run", str(config), "--set", "task.captions=false", "--set", "task.filename='plain.png'"]) == 0
    with Image.open(tmp_path / "out" / "grid.png") as captioned, Image.open(tmp_path / "out" / "plain.png") as plain:
        assert plain.size == (2 * (TILE + 2) + 2, TILE + 4)  # exactly the tiles
        assert captioned.width == plain.width and captioned.height > plain.height  # on by default
