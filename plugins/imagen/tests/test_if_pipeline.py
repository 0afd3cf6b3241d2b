"""IF stage I / II sampling: diffusers' IFPipeline / IFSuperResolutionPipeline loaded with
``from_pretrained`` from the same folders, the same noise (one generator), are the truth."""

from __future__ import annotations

import pytest
import torch

from t2i_plugin_imagen.model import load_if_stage

PROMPTS = ["a red circle", "a green square on a white background"]


def _reference(kind, folder):
    import diffusers

    return getattr(diffusers, kind).from_pretrained(str(folder)).to(torch.float32)


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_stage1_matches_ifpipeline(if_folders, guidance):
    ref = _reference("IFPipeline", if_folders[1])
    want = ref(PROMPTS, num_inference_steps=5, guidance_scale=guidance, height=16, width=16, output_type="pt",
               clean_caption=False, generator=torch.Generator().manual_seed(3)).images
    stage = load_if_stage(if_folders[1])
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 16, 16, generator=g)
    got = stage.generate(PROMPTS, noise, steps=5, guidance_scale=guidance, generator=g)
    assert got.shape == want.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_stage2_matches_ifsuperresolutionpipeline(if_folders):
    ref = _reference("IFSuperResolutionPipeline", if_folders[2])
    lowres = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = ref(PROMPTS, image=lowres, num_inference_steps=4, guidance_scale=4.0, height=16, width=16,
               noise_level=250, output_type="pt", clean_caption=False,
               generator=torch.Generator().manual_seed(5)).images
    stage = load_if_stage(if_folders[2])
    assert stage.stage == 2
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 16, 16, generator=g)
    got = stage.generate(PROMPTS, noise, steps=4, guidance_scale=4.0, lowres=lowres, noise_level=250, generator=g)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_generate_rejects_bad_input(if_folders):
    stage1, stage2 = load_if_stage(if_folders[1]), load_if_stage(if_folders[2])
    noise = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="2 prompts but 1 noise"):
        stage1.generate(PROMPTS, noise[:1], steps=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        stage1.generate(PROMPTS, torch.randn(2, 4, 8, 8), steps=1)
    with pytest.raises(ValueError, match="stage II"):
        stage1.generate(PROMPTS, noise, steps=1, lowres=noise)
    with pytest.raises(ValueError, match="needs lowres"):
        stage2.generate(PROMPTS, noise, steps=1)
    with pytest.raises(ValueError, match="lowres must be"):
        stage2.generate(PROMPTS, noise, steps=1, lowres=noise[:1])
    with pytest.raises(ValueError, match="noise_level"):
        stage2.generate(PROMPTS, noise, steps=1, lowres=noise, noise_level=1000)
