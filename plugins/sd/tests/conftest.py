"""Tiny reference components (diffusers, transformers, open_clip) with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def tiny_pipeline(*, sd2: bool = False, v: bool = False, tokenizer_dir: Path,
                  unet_channels: tuple[int, int] = (32, 64), vae_channels: tuple[int, int] = (32, 32)):
    """A diffusers StableDiffusionPipeline of tiny random components (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from t2i_plugin_sd.tokenizer_files import write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=0 if sd2 else 49407))
    write_clip_tokenizer(tokenizer_dir, pad="zero" if sd2 else "eos")
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if v else "epsilon")
    for m in (unet, vae, text):
        m.eval()
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """(pipeline, saved folder) for a tiny SD 1 layout."""
    root = tmp_path_factory.mktemp("sd1")
    pipe = tiny_pipeline(tokenizer_dir=root / "tok")
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"


@pytest.fixture(scope="session")
def sd2v_folder(tmp_path_factory):
    """(pipeline, saved folder) for a tiny SD 2 layout with v-prediction."""
    root = tmp_path_factory.mktemp("sd2v")
    pipe = tiny_pipeline(sd2=True, v=True, tokenizer_dir=root / "tok")
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"
