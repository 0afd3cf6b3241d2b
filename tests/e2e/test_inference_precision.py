"""engine.precision is honoured by sample-grid and shapes-eval: bf16 changes the images (so it
was applied) and keeps them close to float32 (so it was applied sensibly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_engine.config.loader import load_config
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config

MODEL = '[model]\ntype = "stable-diffusion"\npreset = "tiny"\n[sampler]\nname = "ddim"\nsteps = 2\n'
TASKS = {
    "sample-grid": '[task]\nname = "sample-grid"\nprompts = ["a red square", "a blue circle"]\n'
                   'images_per_prompt = 2\nsize = 32\nfilename = "grid.png"\n',
    "shapes-eval": '[task]\nname = "shapes-eval"\nimages_per_prompt = 1\ngrid = "grid.png"\n'
                   '[data]\ntype = "shapes"\nsize = 32\nsplit = "heldout"\nheldout_fraction = 0.15\n',
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_bf16_changes_the_images_and_stays_close(tmp_path: Path, task: str) -> None:
    pm = EnginePluginManager().load()
    grids = {}
    for precision in ("32-true", "bf16-mixed"):
        job = tmp_path / f"{precision}.toml"
        job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\nprecision = "{precision}"\n'
                       f'output_dir = "{precision}"\n' + TASKS[task] + MODEL)
        run_config(load_config(job, pm), pm)
        grids[precision] = np.asarray(Image.open(tmp_path / precision / "grid.png"), dtype=np.float64)
    diff = np.abs(grids["bf16-mixed"] - grids["32-true"])
    assert diff.max() > 0  # the precision reached the model
    assert diff.max() <= 24 and diff.mean() < 2  # of 255: bf16 rounding, not a different image


@pytest.mark.slow
def test_precache_follows_engine_precision(tmp_path: Path) -> None:
    """precache encodes under engine.precision: bf16 latents differ from float32 ones by bf16
    rounding only, and the shards stay float32 either way."""
    import torch

    from t2i_engine.data.precache import PrecachedConfig, PrecachedDataset

    pm = EnginePluginManager().load()
    latents = {}
    for precision in ("32-true", "bf16-mixed"):
        job = tmp_path / f"{precision}.toml"
        job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\nprecision = "{precision}"\n'
                       f'output_dir = "{precision}"\n[task]\nname = "precache"\nbatch_size = 4\n'
                       '[model]\ntype = "stable-diffusion"\npreset = "tiny"\n'
                       '[data]\ntype = "shapes"\nsize = 16\ncount = 4\n')
        url = run_config(load_config(job, pm), pm)["precached"]
        data = PrecachedDataset(PrecachedConfig(url=url))
        latents[precision] = torch.stack([data[i]["latents"] for i in range(4)])
    a, b = latents["32-true"], latents["bf16-mixed"]
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05 * float(a.abs().max()))
