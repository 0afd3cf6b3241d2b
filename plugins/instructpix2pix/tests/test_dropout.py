"""The reference's conditioning dropout: one draw r per example; text dropped when r < 2p, the
source image when p <= r < 3p (5% text only, 5% both, 5% image only at p = 0.05)."""

from __future__ import annotations

import pytest
import torch

from t2i_plugin_instructpix2pix.dropout import conditioning_dropout


def test_three_fractions_on_a_large_draw():
    n, p = 400_000, 0.05
    text, image = conditioning_dropout(n, p, generator=torch.Generator().manual_seed(0))
    # binomial standard error sqrt(0.05 * 0.95 / n) = 3.4e-4: 0.002 is about 6 of them
    fractions = {"text only": (text & ~image), "both": (text & image), "image only": (~text & image),
                 "neither": (~text & ~image)}
    expected = {"text only": 0.05, "both": 0.05, "image only": 0.05, "neither": 0.85}
    for name, mask in fractions.items():
        assert abs(mask.float().mean().item() - expected[name]) < 0.002, name


def test_same_masks_as_diffusers_training_script_formula():
    """diffusers' train_instruct_pix2pix.py, from the same uniform draw: prompt_mask = r < 2p,
    image_mask = 1 - (r >= p) * (r < 3p) (1 keeps the image)."""
    p = 0.1
    r = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    prompt_mask = r < 2 * p
    image_mask = 1 - ((r >= p).float() * (r < 3 * p).float())
    text, image = conditioning_dropout(1000, p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(text, prompt_mask)
    assert torch.equal(image, image_mask == 0)


def test_probability_range_checked():
    with pytest.raises(ValueError, match=r"\[0, 1/3\]"):
        conditioning_dropout(4, 0.4)
