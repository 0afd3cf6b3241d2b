"""``edit-shapes-eval`` runs on a tiny random editor: one score row per s_I, targets, the grid;
a [data] that is not shapes-edit and [guidance] image_guidance_scale are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_engine.errors import ConfigError

from .test_train_job import _run


def _job(tmp_path: Path, folder: Path, extra: str = "") -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "instructpix2pix"]
device = "cpu"
output_dir = "{tmp_path / 'out'}"
[task]
name = "edit-shapes-eval"
count = 3
image_guidance_scales = [1.0, 2.0]
batch_size = 2
success_target = 0.0
preservation_target = 0.0
[data]
type = "shapes-edit"
size = 16
count = 10
split = "heldout"
heldout_fraction = 0.1
[model]
type = "stable-diffusion"
checkpoint = "{folder}"
preset = "sd-1"
[sampler]
name = "ddim"
steps = 2
[guidance]
guidance_scale = 3.0
{extra}""")
    return job


def test_scores_per_image_guidance(ip2p_folder, tmp_path):
    summary = _run(_job(tmp_path, ip2p_folder))
    assert summary["edits"] == 3
    assert set(summary["targets_met"]) == {"s_I=1", "s_I=2"} and all(summary["targets_met"].values())
    for name in ("s_I=1", "s_I=2"):
        assert set(summary[name]) == {"success", "preservation", "both"}
    assert Path(summary["grid"]).exists()
    strict = _run(_job(tmp_path, ip2p_folder), "task.success_target=1.01", "task.count=2")
    assert strict["edits"] == 2 and not any(strict["targets_met"].values())


def test_refusals(ip2p_folder, tmp_path):
    with pytest.raises(ConfigError, match="image_guidance_scales"):
        _run(_job(tmp_path, ip2p_folder, "image_guidance_scale = 1.5"))
    job = _job(tmp_path, ip2p_folder)
    job.write_text(job.read_text().replace('type = "shapes-edit"', 'type = "shapes"').replace("heldout_fraction = 0.1",
                                                                                              "heldout_fraction = 0.2"))
    with pytest.raises(ConfigError, match="not 'shapes-edit'"):
        _run(job)
