"""Tiny reference components (transformers T5, a sentencepiece model trained in memory,
diffusers IF UNets) with random weights: nothing is downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

SENTENCES = ["a red circle on a blue background", "a green square on a white background",
             "a yellow triangle on a black background", "two small purple stars"] * 10


def write_spiece(folder: Path) -> Path:
    """Train a tiny T5-convention sentencepiece model (pad 0, eos 1, unk 2) into ``folder``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, model_type="unigram",
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder


def tiny_t5(d_model: int = 32):
    """A random 2-layer T5 v1.1-style encoder (gated-gelu)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=160, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config).eval()


@pytest.fixture(scope="session")
def t5_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(text_encoder_dir, tokenizer_dir)`` saved by transformers / trained by sentencepiece."""
    root = tmp_path_factory.mktemp("t5")
    tiny_t5().save_pretrained(root / "text_encoder")
    write_spiece(root / "tokenizer")
    return root / "text_encoder", root / "tokenizer"


def tiny_if_unet(*, stage: int, encoder_dim: int = 32, **arch):
    """diffusers' tiny IF UNets (the configs of diffusers' tests/pipelines/deepfloyd_if); ``arch``
    replaces config keys (:func:`random_if_arch`)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(stage)
    common = dict(layers_per_block=1, block_out_channels=[32, 64],
                  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                  up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                  out_channels=6, cross_attention_dim=32, encoder_hid_dim=encoder_dim, attention_head_dim=8,
                  addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
                  resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8)
    if stage == 1:
        config = dict(common, sample_size=16, in_channels=3)
    else:
        config = dict(common, sample_size=32, in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
                      time_embedding_act_fn="gelu", resnet_skip_time_act=True, resnet_out_scale_factor=1.414)
    unet = UNet2DConditionModel(**{**config, **arch})
    with torch.no_grad():  # diffusers zero-initialises some outputs; random weights test more
        for p in unet.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return unet.eval()


def random_if_arch(seed: int, *, sample_size: int) -> dict:
    """Randomized tiny IF UNet config keys for :func:`tiny_if_unet`: levels, widths, which levels
    cross-attend, blocks per level, head size, pooling heads, text projection width, norm eps."""
    import random

    rng = random.Random(seed)
    levels = rng.choice([2, 3])
    c0 = rng.choice([16, 32])
    channels = [c0 * m for m in rng.choice([(1, 2, 2), (1, 2, 4), (1, 1, 2)])[:levels]]
    attention = [rng.random() < 0.5 for _ in range(levels - 1)] + [True]
    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention)]
    return dict(block_out_channels=channels, down_block_types=down, up_block_types=up,
                layers_per_block=rng.choice([1, 2]), attention_head_dim=rng.choice([8, 16]),
                addition_embed_type_num_heads=rng.choice([1, 2]),
                cross_attention_dim=rng.choice([32, 64]),  # diffusers' norm_cross: 32 groups
                norm_num_groups=rng.choice([4, 8]), norm_eps=rng.choice([1e-5, 1e-6]), sample_size=sample_size)


@pytest.fixture(scope="session")
def make_if_unet():
    """:func:`tiny_if_unet` (tests import helpers through fixtures: pytest runs in importlib mode)."""
    return tiny_if_unet


def if_scheduler():
    """IF's DDPMScheduler (learned_range variance, thresholding 0.95 with max 1.5)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                         prediction_type="epsilon", variance_type="learned_range")


def write_if_folders(root: Path, tokenizer_dir: Path, *, t5_width: int = 32, stage1: dict | None = None,
                     stage2: dict | None = None, stage2_text: bool = True) -> dict[int, Path]:
    """Stage I and stage II folders written by diffusers' ``save_pretrained`` (tiny random
    weights; ``stage1`` / ``stage2`` replace UNet config keys). ``stage2_text=False`` saves stage
    II as its users do (``text_encoder=None, tokenizer=None``: stage I's prompt embeddings)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
    from transformers import T5Tokenizer

    text = dict(tokenizer=T5Tokenizer.from_pretrained(str(tokenizer_dir)), text_encoder=tiny_t5(t5_width))
    common = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    IFPipeline(unet=tiny_if_unet(stage=1, encoder_dim=t5_width, **(stage1 or {})), scheduler=if_scheduler(),
               **text, **common).save_pretrained(root / "stage1")
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                            beta_end=0.02)
    IFSuperResolutionPipeline(unet=tiny_if_unet(stage=2, encoder_dim=t5_width, **(stage2 or {})),
                              scheduler=if_scheduler(), image_noising_scheduler=noising,
                              **(text if stage2_text else dict(tokenizer=None, text_encoder=None)),
                              **common).save_pretrained(root / "stage2")
    return {1: root / "stage1", 2: root / "stage2"}


@pytest.fixture(scope="session")
def make_if_folders(t5_folders):
    """:func:`write_if_folders` with the session's tokenizer: ``make_if_folders(root, **keys)``."""
    return lambda root, **kw: write_if_folders(root, t5_folders[1], **kw)


@pytest.fixture(scope="session")
def if_folders(tmp_path_factory: pytest.TempPathFactory, make_if_folders) -> dict[int, Path]:
    """Stage I and stage II folders written by diffusers' ``save_pretrained`` (tiny random weights)."""
    return make_if_folders(tmp_path_factory.mktemp("if"))


@pytest.fixture(scope="session")
def make_random_if_arch():
    """:func:`random_if_arch`."""
    return random_if_arch


WORDS = ["a", "on", "background", "circle", "square", "triangle", "red", "green", "blue", "white"]


def tiny_stage(kind: str, *, seed: int = 0, d_model: int = 16, **unet):
    """A tiny Imagen stage with random weights: ``base`` 8 px or ``sr`` 8 -> 16 px (EDM)."""
    from t2i_plugin_imagen.precond import Preconditioning
    from t2i_plugin_imagen.stage import NoiseAugConfig, build_stage
    from t2i_plugin_imagen.word_t5 import WordT5Config

    text = WordT5Config(words=WORDS, d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=2, token_length=8)
    if kind == "base":
        opts = dict(embed_dim=8, image_size=8, text_embed_dim=d_model, channel_mult=[1, 2], num_res_blocks=[1, 1], cond_dim=8,
                    attention_resolutions=[4], per_head_channels=4, norm_groups=4)
        stage = build_stage(unet_type="base", unet={**opts, **unet}, text=text, precond=Preconditioning(), image_size=8,
                            lowres_size=None, seed=seed)
    else:
        opts = dict(embed_dim=8, image_size=16, text_embed_dim=d_model, channel_mult=[1, 2], num_resblocks=[1, 1],
                    atnn_enabled_at=[0, 1], per_head_channels=4, norm_groups=4, noise_cond_aug=True,
                    skip_connection_scaling=True)
        stage = build_stage(unet_type="sr", unet={**opts, **unet}, text=text, precond=Preconditioning(), image_size=16,
                            lowres_size=8, noise_aug=NoiseAugConfig(train="loguniform", sample_sigma=0.1), seed=seed)
    torch.manual_seed(seed + 7)
    with torch.no_grad():  # zero-initialised layers would hide the network: randomize everything
        for p in stage.unet.parameters():
            p.normal_(0, 0.1)
    return stage.eval()


@pytest.fixture(scope="session")
def make_stage():
    """:func:`tiny_stage`."""
    return tiny_stage


@pytest.fixture(scope="session")
def stage_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny base and SR stage files (float32), written by ``ImagenStage.save``."""
    root = tmp_path_factory.mktemp("stages")
    files = {"base": root / "base.safetensors", "sr": root / "sr.safetensors"}
    tiny_stage("base").save(str(files["base"]))
    tiny_stage("sr", seed=1).save(str(files["sr"]))
    return files


def write_and_run_job(tmp_path: Path, name: str, stages: str, task: str = "", data: str = "",
                      engine: str = "") -> dict:
    """Write a job (``[engine]`` with the imagen plugin, seed 3, and ``engine``'s lines; ``[task]``;
    the stages; ``[data]``) and run it as ``t2i-engine run`` does (config loader, then the runner)."""
    import t2i_plugin_imagen.plugin as plugin
    from t2i_engine.config.loader import load_config
    from t2i_engine.plugins.manager import EnginePluginManager
    from t2i_engine.runner import run_config

    toml = tmp_path / f"{name}.toml"
    toml.write_text(f"""
[engine]
plugins = ["imagen"]
output_dir = "{name}"
seed = 3
{engine}
[task]
{task}
{stages}
{data}
""")
    pm = EnginePluginManager().load(autoload=False)
    pm.register(plugin, name="imagen", distribution="t2i-plugin-imagen")
    return run_config(load_config(toml, pm), pm)


@pytest.fixture(scope="session")
def run_job():
    """:func:`write_and_run_job`."""
    return write_and_run_job
