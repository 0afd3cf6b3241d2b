"""DeepFloyd IF folders as ``[[task.stages]]`` of the cascade jobs. The truth is diffusers'
``IFPipeline.from_pretrained`` then ``IFSuperResolutionPipeline.from_pretrained`` on the same
folders (randomized tiny architectures, saved by diffusers), given the job's starting noise and a
generator seeded as the job seeds stage ``k`` (``generator_seed``)."""

from __future__ import annotations

import random

import pytest
import torch

from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.pipeline import seeded_noise
from t2i_plugin_imagen.cascade_task import generator_seed

PROMPTS = ["a red circle", "a green square on a white background"]
TASK = f'name = "imagen-cascade"\nprompts = {PROMPTS!r}\nbatch_size = 8'.replace("'", '"')
SEED = 3  # conftest's run_job


def _stage(folder, *, steps: int | None = 2, guidance: str = "guidance_scale = 3.0", extra: str = "") -> str:
    sampler = "" if steps is None else f'sampler = {{ name = "ddpm", steps = {steps} }}\n'
    return f'[[task.stages]]\ncheckpoint = "{folder}"\n{sampler}guidance = {{ {guidance} }}\n{extra}\n'


@pytest.fixture
def captured(monkeypatch):
    """The float images of every stage of the jobs run in a test (``run_cascade``'s output)."""
    import t2i_plugin_imagen.cascade_task as task

    runs: list[list[torch.Tensor]] = []
    real = task.run_cascade

    def spy(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(task, "run_cascade", spy)
    return runs


def _random_folders(make_if_folders, make_random_if_arch, root, seed: int, *, stage2_text: bool):
    rng = random.Random(seed)
    s1 = rng.choice([8, 16])
    stage1 = make_random_if_arch(2 * seed, sample_size=s1)
    stage2 = make_random_if_arch(2 * seed + 1, sample_size=s1 * rng.choice([2, 4]))
    return make_if_folders(root, t5_width=rng.choice([32, 48]), stage1=stage1, stage2=stage2,
                           stage2_text=stage2_text)


def _diffusers_cascade(folders, *, steps, scales, noise_level, stage2_text):
    """IF's two pipelines as their users chain them (stage I's output tensor is stage II's image;
    a stage II folder without T5 gets stage I's prompt embeddings); starting noise as the job's."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    images, low = [], None
    for k, (cls, folder) in enumerate(((IFPipeline, folders[1]), (IFSuperResolutionPipeline, folders[2]))):
        pipe = cls.from_pretrained(str(folder)).to(torch.float32)
        size = pipe.unet.config.sample_size
        noise = seeded_noise([SEED + i + 1000 * k for i in range(len(PROMPTS))], (3, size, size))
        pipe.prepare_intermediate_images = lambda *a, noise=noise, **kw: noise  # the job's starting noise
        if k == 0:
            embeds = dict(zip(("prompt_embeds", "negative_prompt_embeds"),
                              pipe.encode_prompt(PROMPTS, clean_caption=False)))
        text = dict(prompt=PROMPTS) if k == 1 and stage2_text else embeds
        extra = {} if k == 0 else dict(image=low, noise_level=noise_level)
        low = pipe(**text, **extra, num_inference_steps=steps[k], guidance_scale=scales[k], height=size, width=size,
                   output_type="pt", clean_caption=False,
                   generator=torch.Generator().manual_seed(generator_seed(SEED, k))).images
        images.append(low)
    return images


@pytest.mark.parametrize(("seed", "stage2_text"), [(0, False), (1, True), (2, False)])
def test_if_cascade_matches_diffusers(seed, stage2_text, tmp_path, run_job, captured, make_if_folders,
                                      make_random_if_arch):
    folders = _random_folders(make_if_folders, make_random_if_arch, tmp_path / "if", seed, stage2_text=stage2_text)
    stages = (_stage(folders[1], steps=4, guidance="guidance_scale = 5.0") +
              _stage(folders[2], steps=3, guidance="guidance_scale = 3.0", extra="noise_level = 100"))
    run_job(tmp_path, "if", stages, TASK)
    want = _diffusers_cascade(folders, steps=(4, 3), scales=(5.0, 3.0), noise_level=100, stage2_text=stage2_text)
    got = captured[-1]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=0)


def _final(run_job, tmp_path, captured, name: str, stages: str) -> list[torch.Tensor]:
    run_job(tmp_path, name, stages, TASK)
    return captured[-1]


def test_if_stage_keys_have_an_effect(tmp_path, run_job, captured, if_folders):
    def two(s1: dict | None = None, s2: dict | None = None) -> str:
        return _stage(if_folders[1], **(s1 or {})) + _stage(if_folders[2], **(s2 or {}))

    ref = _final(run_job, tmp_path, captured, "ref", two())
    same = _final(run_job, tmp_path, captured, "same", two(
        dict(guidance="guidance_scale = 3.0, dynamic_threshold = 0.95, dynamic_threshold_max = 1.5"),
        dict(extra="noise_level = 250")))  # the folder's thresholding and IF's noise level, spelled out
    assert all(torch.equal(a, b) for a, b in zip(ref, same))
    changes = {
        "stage1_steps": (dict(steps=3), None), "stage1_guidance": (dict(guidance="guidance_scale = 1.0"), None),
        "stage1_threshold": (dict(guidance="guidance_scale = 3.0, dynamic_threshold = 0.6"), None),
        "stage1_threshold_max": (
            dict(guidance="guidance_scale = 3.0, dynamic_threshold = 0.95, dynamic_threshold_max = 1.1"), None),
        "stage2_steps": (None, dict(steps=3)), "stage2_guidance": (None, dict(guidance="guidance_scale = 6.0")),
        "stage2_threshold": (None, dict(guidance="guidance_scale = 3.0, dynamic_threshold = 0.6")),
        "stage2_noise_level": (None, dict(extra="noise_level = 50")),
    }
    for name, (s1, s2) in changes.items():
        got = _final(run_job, tmp_path, captured, name, two(s1, s2))
        assert (got[1] - ref[1]).abs().max() > 1e-3, name
        assert torch.equal(got[0], ref[0]) == (s1 is None), name  # a stage II key leaves stage I alone


def test_if_stage_defaults_are_ifs(if_folders):
    from t2i_plugin_imagen.cascade_task import StageConfig
    from t2i_plugin_imagen.if_cascade import build_if_step

    one = build_if_step("s", StageConfig(checkpoint=str(if_folders[1])), text_from=None, device=torch.device("cpu"))
    two = build_if_step("s", StageConfig(checkpoint=str(if_folders[2])), text_from=None, device=torch.device("cpu"))
    # IFPipeline / IFSuperResolutionPipeline __call__ defaults
    assert (one.steps, one.guidance.guidance_scale, two.steps, two.guidance.guidance_scale) == (100, 7.0, 50, 4.0)
    assert one.guidance.dynamic_threshold is None  # thresholding as the folder's scheduler config says
    assert (one.image_size, two.image_size) == (16, 32)  # unet/config.json sample_size


@pytest.mark.parametrize(("stage", "extra", "match"), [
    (1, 'sampler = { name = "edm", steps = 2 }', r"task.stages\[0\].sampler.name: 'edm' cannot sample an IF stage"),
    (1, 'sampler = { steps = 2 }', r"task.stages\[0\].sampler.name: None cannot"),
    (1, 'sampler = { name = "ddpm", steps = 2, karras = true }', r"task.stages\[0\].sampler.karras: not a key"),
    (1, 'sampler = { name = "ddpm", steps = 0 }', r"task.stages\[0\].sampler.steps"),
    (1, "guidance = { guidance_rescale = 0.5 }", r"task.stages\[0\].guidance.guidance_rescale: not available"),
    (1, "guidance = { clip_denoised = true }", r"task.stages\[0\].guidance.clip_denoised: not available"),
    (1, "guidance = { guidance_interval = [0.5, 5.0] }", r"task.stages\[0\].guidance.guidance_interval: not available"),
    (1, "guidance = { dynamic_threshold_max = 1.2 }", r"task.stages\[0\].guidance.*needs 'dynamic_threshold'"),
    (1, "aug_level = 0.1", r"task.stages\[0\].aug_level: not an IF stage's key"),
    (1, "sigma_min = 0.5", r"task.stages\[0\].sigma_min: not an IF stage's key"),
    (1, "sigma_max = 20.0", r"task.stages\[0\].sigma_max: not an IF stage's key"),
    (1, "noise_level = 100", r"task.stages\[0\].noise_level: an IF stage I has no low-resolution input"),
    (2, "noise_level = 1000", r"task.stages\[1\].noise_level: must be in \[0, 1000\), got 1000"),
    (2, "noise_level = -1", r"task.stages\[1\].noise_level: must be in \[0, 1000\)"),
    (2, "aug_level = 0.1", r"task.stages\[1\].aug_level: not an IF stage's key"),
])
def test_if_stage_refuses_keys_it_cannot_honour(stage, extra, match, tmp_path, run_job, if_folders):
    first = f'[[task.stages]]\ncheckpoint = "{if_folders[1]}"\n' + (extra if stage == 1 else "")
    second = f'[[task.stages]]\ncheckpoint = "{if_folders[2]}"\n{extra}\n' if stage == 2 else ""
    with pytest.raises(ConfigError, match=match):
        run_job(tmp_path, "bad", first + "\n" + second, TASK)


def test_if_sizes_chain(tmp_path, run_job, if_folders, stage_files):
    ours_sr = '[[task.stages]]\ncheckpoint = "{}"\nsampler = {{ name = "edm", steps = 2 }}\n'.format(stage_files["sr"])
    cases = [
        (_stage(if_folders[2]), r"task.stages\[0\].checkpoint: .*stage2 is deepfloyd-if stage II \(super-resolution, "
         r"32 px\); here the cascade needs a base stage"),
        (_stage(if_folders[1]) + _stage(if_folders[1]),
         r"task.stages\[1\].checkpoint: .*stage1 is deepfloyd-if stage I \(a base stage, 16 px\); "
         r"here the cascade needs a super-resolution stage from 16 px"),
        (_stage(if_folders[1]) + ours_sr, r"task.stages\[1\].checkpoint: .*sr.safetensors is .*here the cascade needs "
         r"a super-resolution stage from 16 px"),  # our SR stage takes 8 px
        (_stage(if_folders[1]) + _stage(if_folders[2]) + _stage(if_folders[2]),  # stage II from its own size
         r"task.stages\[2\].checkpoint: .*here the cascade needs a super-resolution stage from 32 px"),
    ]
    for stages, match in cases:
        with pytest.raises(ConfigError, match=match):
            run_job(tmp_path, "chain", stages, TASK)


def test_mixed_cascades(tmp_path, run_job, captured, make_if_folders, stage_files):
    """IF stage I (8 px) -> this plugin's SR stage (8 -> 16 px); this plugin's base (8 px) -> IF stage II
    (with its T5; to 32 px). A stage II folder without T5 after a stage file has nobody to borrow from."""
    folders = make_if_folders(tmp_path / "if8", stage1=dict(sample_size=8))
    ours = {k: '[[task.stages]]\ncheckpoint = "{}"\nsampler = {{ name = "edm", steps = 2 }}\n'.format(v)
            for k, v in stage_files.items()}
    run_job(tmp_path, "if_then_sr", _stage(folders[1]) + ours["sr"], TASK)
    assert [tuple(x.shape) for x in captured[-1]] == [(2, 3, 8, 8), (2, 3, 16, 16)]
    run_job(tmp_path, "base_then_if", ours["base"] + _stage(folders[2]), TASK)
    assert [tuple(x.shape) for x in captured[-1]] == [(2, 3, 8, 8), (2, 3, 32, 32)]
    bare = make_if_folders(tmp_path / "bare", stage2_text=False)
    with pytest.raises(ConfigError, match=r"task.stages\[1\].checkpoint: .*bare/stage2 has no text_encoder/ and no "
                                          "earlier IF stage"):
        run_job(tmp_path, "nobody", ours["base"] + _stage(bare[2]), TASK)
    with pytest.raises(ConfigError, match=r"task.stages\[1\].noise_level: only for an IF stage II folder"):
        run_job(tmp_path, "ournoise", ours["base"] + ours["sr"] + "noise_level = 100\n", TASK)


def test_borrowed_t5_must_fit_the_unet(tmp_path, run_job, make_if_folders, if_folders):
    wide = make_if_folders(tmp_path / "wide", t5_width=48, stage2_text=False)
    with pytest.raises(CheckpointError, match=r"wide/stage2: the lent T5 \(no text_encoder/ here\) width 32 is not "
                                              "the UNet's encoder_hid_dim 48"):
        run_job(tmp_path, "wide", _stage(if_folders[1]) + _stage(wide[2]), TASK)


def test_load_if_stage_without_t5(make_if_folders, tmp_path):
    from t2i_plugin_imagen.model import load_if_stage

    folders = make_if_folders(tmp_path, stage2_text=False)
    with pytest.raises(CheckpointError, match=r"stage2: no text_encoder/"):
        load_if_stage(folders[2])
    one = load_if_stage(folders[1])
    assert load_if_stage(folders[2], text_encoder=one.text_encoder).text_encoder is one.text_encoder


def test_shapes_eval_runs_an_if_cascade(tmp_path, run_job, if_folders):
    data = ('[data]\ntype = "shapes"\nsize = 32\nsplit = "heldout"\nheldout_fraction = 0.1\n'
            'colours = ["red", "blue", "white"]')
    task = 'name = "imagen-shapes-eval"\nimages_per_prompt = 1\nbatch_size = 8\ngrid = "g.png"'
    summary = run_job(tmp_path, "eval", _stage(if_folders[1]) + _stage(if_folders[2]), task, data)
    assert {"stage0_16px", "stage1_32px"} <= set(summary)
