"""The cascade jobs through the config loader: ``imagen-cascade`` (each stage's own sampler,
guidance and augmentation level have an effect) and ``imagen-shapes-eval``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_engine.errors import ConfigError

BASE = 'sampler = {{ name = "edm", steps = {steps}, s_churn = 0.0 }}\nguidance = {{ guidance_scale = {cfg}{guide} }}'


def _stages(files, *, base_steps=2, base_cfg=3.0, sr_steps=2, sr_cfg=1.0, aug: str = "", sr_threshold: str = "",
            base_extra: str = "", base_guide: str = "") -> str:
    sr_guidance = f"{{ guidance_scale = {sr_cfg}{sr_threshold} }}"
    return (f'[[task.stages]]\ncheckpoint = "{files["base"]}"\n' + BASE.format(steps=base_steps, cfg=base_cfg, guide=base_guide) +
            f"\n{base_extra}" +
            f'\n[[task.stages]]\ncheckpoint = "{files["sr"]}"\n'
            f'sampler = {{ name = "edm", steps = {sr_steps}, s_churn = 0.0 }}\nguidance = {sr_guidance}\n{aug}\n')


def _grid(run_job, tmp_path, name, files, *, side=True, **kw) -> np.ndarray:
    from PIL import Image

    task = f'name = "imagen-cascade"\nprompts = ["a red circle", "a blue square"]\nside_by_side = {str(side).lower()}'
    summary = run_job(tmp_path, name, _stages(files, **kw), task)
    return np.array(Image.open(summary["image"])).astype(np.float32)


def test_cascade_keys_have_an_effect(run_job, tmp_path, stage_files):
    ref = _grid(run_job, tmp_path, "ref", stage_files)
    assert np.array_equal(ref, _grid(run_job, tmp_path, "again", stage_files))  # seeded
    final_only = _grid(run_job, tmp_path, "final", stage_files, side=False)
    assert final_only.shape[1] < ref.shape[1]  # one tile per row instead of base | SR
    for name, kw in {"base_steps": dict(base_steps=3), "base_cfg": dict(base_cfg=1.0), "sr_steps": dict(sr_steps=3),
                     "sr_cfg": dict(sr_cfg=3.0), "aug": dict(aug="aug_level = 0.5"),
                     "sr_sigma_min": dict(aug="sigma_min = 0.5"), "base_sigma_max": dict(base_extra="sigma_max = 10.0"),
                     "base_sigma_min": dict(base_extra="sigma_min = 0.3")}.items():
        assert np.abs(_grid(run_job, tmp_path, name, stage_files, **kw) - ref).max() > 0, name
    # the base's guidance interval: around one of its sigmas it changes the images; around none of
    # them (EDM sigmas 80 ... 0.002 here) it is guidance off, i.e. CFG 1
    inside = _grid(run_job, tmp_path, "interval", stage_files, base_steps=3, base_guide=", guidance_interval = [1.0, 90.0]")
    assert np.abs(inside - _grid(run_job, tmp_path, "steps3", stage_files, base_steps=3)).max() > 0
    outside = _grid(run_job, tmp_path, "outside", stage_files, base_steps=3,
                    base_guide=", guidance_interval = [100.0, 200.0]")
    assert np.array_equal(outside, _grid(run_job, tmp_path, "cfg1", stage_files, base_steps=3, base_cfg=1.0))
    guided = _grid(run_job, tmp_path, "guided", stage_files, sr_cfg=3.0)
    capped = _grid(run_job, tmp_path, "capped", stage_files, sr_cfg=3.0,
                   sr_threshold=", dynamic_threshold = 0.6, dynamic_threshold_max = 1.2")
    assert np.abs(guided - capped).max() > 0  # the stage's dynamic thresholding (p, max)

def test_cascade_checks_the_stage_order(run_job, tmp_path, stage_files):
    swapped = {"base": stage_files["sr"], "sr": stage_files["base"]}
    with pytest.raises(ConfigError, match=r"task.stages\[0\].checkpoint.*needs a base stage"):
        _grid(run_job, tmp_path, "swapped", swapped)
    task = 'name = "imagen-cascade"\nprompts = ["a red circle"]'
    bad = f'[[task.stages]]\ncheckpoint = "{stage_files["base"]}"\naug_level = 0.1\n'
    with pytest.raises(ConfigError, match="aug_level: a base stage"):
        run_job(tmp_path, "badaug", bad, task)
    for bad_range, match in (("sigma_min = 90.0", "0 < sigma_min < sigma_max"), ("sigma_min = 0.0", "0 < sigma_min")):
        with pytest.raises(ConfigError, match=rf"task.stages\[0\]: the sampling range needs {match}"):
            run_job(tmp_path, "badrange", f'[[task.stages]]\ncheckpoint = "{stage_files["base"]}"\n{bad_range}\n', task)
    nosampler = f'[[task.stages]]\ncheckpoint = "{stage_files["base"]}"\nsampler = {{ steps = 2 }}\n'
    with pytest.raises(ConfigError, match="sampler: needs name"):
        run_job(tmp_path, "nosampler", nosampler, task)


def test_sampling_range_is_the_karras_grid_between_the_new_ends(make_stage):
    """``set_sampling_range``: Karras et al. 2022 eq. 5 written out, from the new ``sigma_max``
    to the new ``sigma_min`` (rho 7), then 0; the other end is the stage file's."""
    stage = make_stage("base")
    stage.set_sampling_range(sigma_min=1.0)
    n, rho, lo, hi = 5, 7.0, 1.0, 80.0
    want = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    assert stage.schedule.sampling_sigmas(n).tolist() == pytest.approx(want, rel=1e-12)
    stage.set_sampling_range(sigma_max=20.0)  # sigma_min stays 1.0
    assert stage.schedule.sampling_sigmas(n)[[0, n - 1]].tolist() == pytest.approx([20.0, 1.0])
    assert (stage.precond.sigma_min, stage.precond.sigma_max) == (1.0, 20.0)


def test_sampling_range_refuses_continuous_ddpm(make_stage):
    from t2i_plugin_imagen.precond import Preconditioning
    from t2i_plugin_imagen.stage import ImagenStage

    edm = make_stage("base")
    ddpm = ImagenStage(edm.unet, edm.text_encoder, Preconditioning(kind="continuous-ddpm"), image_size=8, text=edm.text)
    ddpm.set_sampling_range()  # nothing asked: nothing to refuse
    with pytest.raises(ConfigError, match="continuous-DDPM"):
        ddpm.set_sampling_range(sigma_min=0.5)


def test_shapes_eval_scores_every_stage(run_job, tmp_path, stage_files):
    data = '[data]\ntype = "shapes"\nsize = 16\nsplit = "heldout"\nheldout_fraction = 0.1\ncolours = ["red", "blue", "white"]'
    task = 'name = "imagen-shapes-eval"\nimages_per_prompt = 1\nbatch_size = 8\ngrid = "g.png"'
    summary = run_job(tmp_path, "eval", _stages(stage_files), task, data)
    assert set(summary["stage0_8px"]) >= {"colour", "shape", "background"}
    assert "stage1_16px" in summary and summary["targets_met"] in (True, False)
    with pytest.raises(ConfigError, match="data.size"):
        run_job(tmp_path, "eval32", _stages(stage_files), task, data.replace("size = 16", "size = 32"))


def test_core_sample_task_drives_a_base_stage(run_job, tmp_path, stage_files):
    from PIL import Image

    task = 'name = "sample"\nprompts = ["a red circle"]\nwidth = 8\nheight = 8'
    model = f'[model]\ntype = "imagen-stage"\ncheckpoint = "{stage_files["base"]}"\n[sampler]\nname = "edm"\nsteps = 2\n'
    summary = run_job(tmp_path, "sample", model, task)
    assert np.array(Image.open(summary["images"][0])).shape == (8, 8, 3)


def test_the_generator_never_redraws_a_starting_noise() -> None:
    """Seeded like the batch's first starting noise, a stage's generator drew that noise again as
    image 0's augmentation / churn / step noise. Its first draws must differ from every image's
    starting noise."""
    from t2i_engine.pipeline import seeded_noise
    from t2i_plugin_imagen.cascade_task import run_cascade

    class Echo:  # a stage that returns its generator's first draw
        image_size = 4

        def sample(self, prompts, noise, *, lowres, generator):
            return torch.randn(noise.shape, generator=generator)

    seeds = [7, 8, 9]
    drawn = run_cascade([Echo(), Echo()], ["a"] * 3, seeds, batch_size=3, device=torch.device("cpu"))
    for k, images in enumerate(drawn):
        starts = seeded_noise([s + 1000 * j for j in range(2) for s in seeds], (3, 4, 4))
        for image in images:
            assert not any(torch.allclose(image, start) for start in starts), f"stage {k} redrew a starting noise"


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_engine_precision_reaches_the_cascade(run_job, tmp_path, stage_files, precision):
    """``[engine] precision`` was silently ignored by the cascade jobs: each stage now samples in
    it (autocast, or cast weights and noise), close to float32 but not equal."""
    from PIL import Image

    def grid(name: str, engine: str) -> np.ndarray:
        task = 'name = "imagen-cascade"\nprompts = ["a red circle", "a blue square"]'
        summary = run_job(tmp_path, name, _stages(stage_files), task, engine=engine)
        return np.array(Image.open(summary["image"])).astype(np.float32)

    full = grid("fp32", "")
    assert np.array_equal(full, grid("fp32-said", 'precision = "32-true"'))
    import contextlib

    with pytest.warns(UserWarning, match="32-true") if _slow_cpu_bf16() else contextlib.nullcontext():
        half = grid(precision, f'precision = "{precision}"')
    diff = np.abs(half - full)
    assert diff.max() > 0 and diff.mean() < 12  # 0-255 pixels: bf16 rounding, not another image


def _slow_cpu_bf16() -> bool:
    from t2i_engine.kernels import cpu_paths

    return cpu_paths.unsupported_reason("conv_pack_bf16") is not None
