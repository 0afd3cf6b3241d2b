"""DeepFloyd IF folders as ``[[task.stages]]`` of the cascade jobs. The truth is diffusers'
``IFPipeline.from_pretrained`` then ``IFSuperResolutionPipeline.from_pretrained`` on the same
folders (randomized tiny architectures, saved by diffusers), given the job's starting noise and a
generator seeded as the job seeds stage ``k`` (``engine.seed + 1000 k``)."""

from __future__ import annotations

import random

import pytest
import torch

from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.pipeline import seeded_noise

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
                   generator=torch.Generator().manual_seed(SEED + 1000 * k)).images
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
