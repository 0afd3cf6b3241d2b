"""Tiny instance folders and job files for the DreamBooth tests (random models, 16-pixel images)."""

from __future__ import annotations

from pathlib import Path

import torch

from t2i_engine.data.shapes import COLOURS, render_shape
from t2i_engine.utils.images import save_png, to_pil

SIZE = 16


def write_image(path: Path, *, shape: str = "plus", fg: str = "red", bg: str = "blue", size: int = SIZE,
                caption: str | None = None, ext: str = ".txt") -> Path:
    """One shape image (and its caption file when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = render_shape(shape, COLOURS[fg], COLOURS[bg], size=size, cx=size / 2, cy=size / 2, radius=size * 0.35)
    (pil,) = to_pil(image[None])
    save_png(pil, str(path))
    if caption is not None:
        path.with_suffix(ext).write_text(caption + "\n")
    return path


def instance_folder(root: Path, n: int = 3) -> Path:
    """``n`` captioned plus images in a plain folder."""
    colours = ["red", "green", "yellow", "white"]
    for i in range(n):
        write_image(root / f"{i}.png", fg=colours[i % 4], caption=f"a {colours[i % 4]} sks on a blue background")
    return root


def job(tmp_path: Path, *, task: str = "", train: str = "", extra: str = "", name: str = "job",
        instances: Path | None = None) -> Path:
    """A dreambooth job on the tiny random SD preset; ``task``/``train``/``extra`` add TOML lines;
    the instance images are ``instances`` (default: three captioned ones in ``tmp_path/inst``)."""
    inst = instances or (tmp_path / "inst" if (tmp_path / "inst").exists() else instance_folder(tmp_path / "inst"))
    text = f"""
[engine]
plugins = ["sd", "dreambooth"]
seed = 0
device = "cpu"
output_dir = "{tmp_path / ('out-' + name)}"

[task]
name = "dreambooth"
instance_data = "{inst}"
{"" if "resolution" in task else f"resolution = {SIZE}"}
{task}

[model]
type = "stable-diffusion"
preset = "tiny"

[train]
accelerator = "cpu"
max_steps = 2
batch_size = 2
ema = false
progress_bar = false
checkpoint_every = 0
{train}
{extra}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


PRIOR = """
[sampler]
name = "ddim"
steps = 2

[guidance]
guidance_scale = 2.0
"""


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with ``seed``."""
    return torch.Generator().manual_seed(seed)
