"""Paired transforms keep pairs pixel-aligned; the shapes dataset draws what it says."""

from __future__ import annotations

import re

import pytest
import torch

from t2i_engine.data.shapes import COLOURS, ShapesDataset
from t2i_engine.data.transforms import PairedTransform


def _coords(h: int, w: int) -> torch.Tensor:
    """(3, H, W): channel 0 holds the row, channel 1 the column, channel 2 a constant."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([ys, xs, torch.full_like(ys, 7.0)])


@pytest.mark.parametrize("seed", range(6))
def test_random_crop_and_flip_are_identical_for_the_pair_and_pixel_exact(seed):
    image = _coords(20, 33)
    hint = image.flip(0)  # a different image whose pixels are a known function of the image's
    t = PairedTransform(resolution=20, crop="random", hflip=True)  # no resize: shortest side is 20
    out = t({"image": image, "hint": hint}, generator=torch.Generator().manual_seed(seed))
    img, hnt = out["image"], out["hint"]
    assert img.shape == hnt.shape == (3, 20, 20)
    assert torch.equal(hnt, img.flip(0))  # same crop and flip on both
    rows, cols = img[0], img[1]
    assert torch.equal(rows, torch.arange(20.0)[:, None].expand(20, 20))  # full height kept
    left = cols[0].min()
    expect = left + torch.arange(20.0)
    assert torch.equal(cols[0], expect) or torch.equal(cols[0], expect.flip(0))  # contiguous window
    assert 0 <= left <= 13


def test_flip_and_crops_vary_with_the_generator():
    t = PairedTransform(resolution=16, crop="random", hflip=True)
    lefts = {int(t.sample_params(16, 40, generator=torch.Generator().manual_seed(s)).left) for s in range(20)}
    flips = {t.sample_params(16, 40, generator=torch.Generator().manual_seed(s)).flip for s in range(20)}
    assert len(lefts) > 3 and flips == {True, False}


def test_resize_shortest_side_then_center_crop():
    image = torch.ones(3, 40, 80) * torch.linspace(-1, 1, 80)  # horizontal ramp
    out = PairedTransform(resolution=20, crop="center")({"image": image, "edit": -image})
    assert out["image"].shape == (3, 20, 20)
    assert torch.equal(out["edit"], -out["image"])
    # centre crop of the ramp: symmetric around 0
    torch.testing.assert_close(out["image"][0, 0], -out["image"][0, 0].flip(0), atol=1e-5, rtol=0)


def test_pair_of_different_sizes_is_an_error():
    with pytest.raises(ValueError, match="different sizes"):
        PairedTransform(resolution=8)({"image": torch.zeros(3, 8, 8), "hint": torch.zeros(3, 9, 8)})


def test_shapes_pixels_match_caption_and_labels():
    ds = ShapesDataset(ShapesDataset.Config(size=32, count=30, seed=3))
    for i in range(30):
        s = ds[i]
        colour, shape, bg = re.fullmatch(r"a (\w+) (\w+) on a (\w+) background", s["caption"]).groups()
        assert (ds.colours[s["colour_label"]], ds.shapes[s["shape_label"]], ds.colours[s["background_label"]]) == (colour, shape, bg)
        img = (s["image"] + 1) / 2  # (3, H, W) in [0, 1]
        pixels = img.flatten(1).T  # (H*W, 3)
        fg_n = (pixels == torch.tensor(COLOURS[colour])).all(1).sum()
        bg_n = (pixels == torch.tensor(COLOURS[bg])).all(1).sum()
        assert fg_n + bg_n == 32 * 32 and fg_n > 20 and bg_n > 20
    assert torch.equal(ds[5]["image"], ShapesDataset(ShapesDataset.Config(size=32, count=30, seed=3))[5]["image"])
    assert not torch.equal(ds[5]["image"], ShapesDataset(ShapesDataset.Config(size=32, count=30, seed=4))[5]["image"])


def test_shapes_heldout_split_never_appears_in_training():
    kw = dict(size=16, count=400, seed=1, heldout_fraction=0.25)
    train = ShapesDataset(ShapesDataset.Config(split="train", **kw))
    held = ShapesDataset(ShapesDataset.Config(split="heldout", **kw))
    train_caps = {train[i]["caption"] for i in range(len(train))}
    held_caps = {held[i]["caption"] for i in range(len(held))}
    assert train_caps and held_caps and not train_caps & held_caps
    assert held_caps <= set(train.heldout_captions)
