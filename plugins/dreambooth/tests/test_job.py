"""The ``dreambooth`` job on a tiny random Stable Diffusion: 2-step LoRA and full fine-tunes give
files that load; every ``[task]`` key changes what the job does; bad input is refused by name.

Most key tests replace the core loop's ``fit`` by a recorder (what the task hands the loop is what
they check) so that the job runs in a second; the exports still run after it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError, DataError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config

from plugins.dreambooth.tests.conftest import PRIOR, SIZE, job, write_image


def _run(path: Path, *overrides: str) -> dict[str, Any]:
    pm = EnginePluginManager().load()
    return dict(run_config(load_config(path, pm, overrides=list(overrides)), pm))


@pytest.fixture
def captured(monkeypatch):
    """Run a job with ``fit`` recorded instead of run: returns ``(summary, what fit got)``."""
    import t2i_engine.training.loop as loop

    got: dict[str, Any] = {}

    def fake_fit(model, dataset, cfg, **kwargs):
        got.update(model=model, dataset=dataset, cfg=cfg, **kwargs)
        # what the real fit returns for a run that reached max_steps
        return {"step": cfg.max_steps, "checkpoint": str(Path(kwargs["output_dir"]) / "checkpoints"),
                "interrupted": False, "nonfinite_skipped": 0, "skipped_samples": 0, "first_skipped": [],
                "loss": math.nan}

    monkeypatch.setattr(loop, "fit", fake_fit)

    def run(tmp_path: Path, *, task: str = "", extra: str = "", name: str = "job",
            instances: Path | None = None) -> tuple[dict, dict]:
        got.clear()
        summary = _run(job(tmp_path, task=task, extra=extra, name=name, instances=instances))
        return summary, dict(got)

    return run


def _adapter(got: dict) -> Any:
    return got["model"].adapter


# --- the two methods, trained for real (2 steps) ------------------------------------------------


def test_lora_two_steps_writes_a_kohya_file_that_loads(tmp_path):
    from t2i_engine.adapters import load_lora
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    path = job(tmp_path, task='class_prompt = "a circle"\nnum_class_images = 3\nsample_batch_size = 2\nlora_rank = 2',
               train="lr = 0.01", extra=PRIOR)
    summary = _run(path)
    assert summary["step"] == 2 and summary["class_images_sampled"] == 3 and summary["class_images_reused"] == 0
    lora = Path(summary["lora"])
    with safe_open(str(lora), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_num_train_images"] == "3"
    assert meta["ss_num_reg_images"] == "3" and meta["ss_max_train_steps"] == "2" and meta["ss_prior_loss_weight"] == "1.0"
    assert keys and all(k.startswith("lora_unet_") for k in keys) and any(k.endswith("attn2_to_k.alpha") for k in keys)
    model = build_model(None, PRESETS["tiny"])
    adapter, report = load_lora(model, str(lora), model.lora_key_map())
    assert not report.unmatched and len(adapter.names()) == len(keys) // 3
    assert any(layer.up.weight.abs().max() > 0 for _, layer in adapter.items())  # it trained
    again = _run(path)  # a re-run reuses the class images
    assert again["class_images_sampled"] == 0 and again["class_images_reused"] == 3


def test_token_embedding_trains_and_is_bundled_and_written_on_its_own(tmp_path):
    """``token_embedding``: the identifier's input vector trains with the LoRA (pivotal tuning),
    is bundled into the kohya file (``bundle_emb.sks.string_to_param.*``) and written on its own
    (diffusers' layout: one key, the word); loading the file puts it back into the text encoder."""
    from t2i_engine.adapters import load_lora
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    path = job(tmp_path, task='prior_preservation = false\ntoken_embedding = "sks"\n'
                              'export_embedding = "ti/sks.safetensors"\nexport = "merged"', train="lr = 0.05")
    summary = _run(path)
    with safe_open(summary["lora"], "pt") as f:
        bundled = f.get_tensor("bundle_emb.sks.string_to_param.*")
    with safe_open(str(tmp_path / "out-job" / "ti" / "sks.safetensors"), "pt") as f:
        assert list(f.keys()) == ["sks"]
        assert torch.equal(f.get_tensor("sks"), bundled)
    model = build_model(None, PRESETS["tiny"])  # the job's model: the same seed builds the same weights
    start = model.text_encoder.token_embedding_layer().weight[model.text_encoder.word_token_ids("sks")]
    assert bundled.shape == start.shape == (1, 32)
    assert float((bundled - start.detach()).abs().max()) > 1e-2  # it trained (lr 0.05, 2 steps)
    before = model.text_encoder.encode(["a red sks"]).tokens.detach()
    adapter, report = load_lora(model, summary["lora"], model.lora_key_map())
    assert report.embeddings == ("sks",) and not report.unmatched
    after = model.text_encoder.encode(["a red sks"]).tokens.detach()
    assert float((after - before).abs().max()) > 1e-3
    adapter.detach()
    assert torch.equal(model.text_encoder.encode(["a red sks"]).tokens.detach(), before)
    # export (the LoRA merged in) holds the embedding in the word's row
    from t2i_plugin_sd.plugin import StableDiffusionConfig, build_stable_diffusion

    merged = build_stable_diffusion(StableDiffusionConfig(checkpoint=summary["exported"]))
    row = merged.text_encoder.token_embedding_layer().weight[merged.text_encoder.word_token_ids("sks")]
    torch.testing.assert_close(row.detach(), bundled, rtol=0, atol=0)


def test_token_embedding_lr(tmp_path):
    """AdamW moves each coordinate by at most lr per step (exactly lr at the first): two steps at
    lr 1e-3 move the vector at most 2e-3, with token_embedding_lr = 1e-2 further than 5e-3."""
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    model = build_model(None, PRESETS["tiny"])
    start = model.text_encoder.token_embedding_layer().weight[model.text_encoder.word_token_ids("sks")].detach()
    moved = {}
    for name, extra in (("same", ""), ("fast", "\ntoken_embedding_lr = 1e-2")):
        summary = _run(job(tmp_path, task='prior_preservation = false\ntoken_embedding = "sks"' + extra,
                           train="lr = 1e-3\nweight_decay = 0.0", name=name))
        with safe_open(summary["lora"], "pt") as f:
            moved[name] = float((f.get_tensor("bundle_emb.sks.string_to_param.*") - start).abs().max())
    assert 9e-4 < moved["same"] <= 2e-3 + 1e-6 and moved["fast"] > 5e-3


def test_without_token_embedding_nothing_is_bundled(tmp_path):
    summary = _run(job(tmp_path, task="prior_preservation = false"))
    with safe_open(summary["lora"], "pt") as f:
        assert not [k for k in f.keys() if k.startswith("bundle_emb.")]
    assert not (tmp_path / "out-job" / "embedding.safetensors").exists()


def test_full_two_steps_exports_weights_that_load_and_differ(tmp_path):
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS
    from t2i_plugin_sd.plugin import StableDiffusionConfig, build_stable_diffusion

    torch.manual_seed(3)
    base = build_model(None, PRESETS["tiny"])
    base.save(str(tmp_path / "base"))
    model_table = f'\n[model]\ntype = "stable-diffusion"\ncheckpoint = "{tmp_path / "base"}"\n'
    path = job(tmp_path, task='prior_preservation = false\nmethod = "full"\nexport = "model"', train="lr = 0.01")
    path.write_text(path.read_text().replace('[model]\ntype = "stable-diffusion"\npreset = "tiny"\n', model_table))
    summary = _run(path)
    tuned = build_stable_diffusion(StableDiffusionConfig(checkpoint=summary["exported"]))
    reloaded = build_stable_diffusion(StableDiffusionConfig(checkpoint=str(tmp_path / "base")))
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, reloaded.unet.state_dict()[k])]
    assert changed  # the UNet trained ...
    assert all(torch.equal(v, reloaded.vae.state_dict()[k]) for k, v in tuned.vae.state_dict().items())  # ... not the VAE


# --- every key has an effect ------------------------------------------------------------------


def test_instance_data(tmp_path, captured):
    _, got = captured(tmp_path, task="prior_preservation = false")
    assert [got["dataset"][i]["caption"] for i in range(3)] == [f"a {c} sks on a blue background" for c in
                                                               ("red", "green", "yellow")]
    write_image(tmp_path / "other" / "0.png", caption="a white sks")
    _, other = captured(tmp_path, task="prior_preservation = false", instances=tmp_path / "other")
    assert len(other["dataset"]) == 1 and other["dataset"][0]["caption"] == "a white sks"


def test_instance_prompt_fills_missing_captions(tmp_path, captured):
    write_image(tmp_path / "inst" / "0.png")  # no caption file
    _, got = captured(tmp_path, task='prior_preservation = false\ninstance_prompt = "a sks"')
    assert got["dataset"][0]["caption"] == "a sks"


def test_prior_keys(tmp_path, captured):
    _, off = captured(tmp_path, task="prior_preservation = false", name="off")
    assert "class_image" not in off["dataset"][0]
    summary, on = captured(tmp_path, task='class_prompt = ["a circle", "a square"]\nnum_class_images = 3\n'
                                         'prior_loss_weight = 0.5\nclass_images_dir = "cls"', extra=PRIOR, name="on")
    ds = on["dataset"]
    assert len(ds.classes) == 3 and [e.caption for e in ds.classes] == ["a circle", "a square", "a circle"]
    assert on["model"].prior_loss_weight == 0.5
    assert len(list((tmp_path / "out-on" / "cls").glob("class-*.png"))) == 3
    assert ds[0]["class_image"].shape == (3, SIZE, SIZE)


def test_class_data_counts_towards_num_class_images(tmp_path, captured):
    write_image(tmp_path / "reg" / "1_circle" / "0.png", shape="circle")
    write_image(tmp_path / "reg" / "1_circle" / "1.png", shape="circle")
    summary, got = captured(tmp_path, task=f'class_data = "{tmp_path / "reg"}"\nclass_prompt = "a circle"\n'
                                           'num_class_images = 3', extra=PRIOR)
    assert summary["class_images_given"] == 2 and summary["class_images_sampled"] == 1
    assert [e.caption for e in got["dataset"].classes] == ["circle", "circle", "a circle"]
    summary, _ = captured(tmp_path, task=f'class_data = "{tmp_path / "reg"}"\nnum_class_images = 2', extra=PRIOR,
                          name="enough")
    assert summary["class_images_sampled"] == 0  # enough of your own: no prompt needed, nothing sampled


def test_sample_batch_size(tmp_path, captured, monkeypatch):
    import t2i_engine.tasks.grid as grid

    sizes = []
    real = grid.sample_batched
    monkeypatch.setattr(grid, "sample_batched", lambda model, prompts, *a, **k: sizes.append(len(prompts)) or
                        real(model, prompts, *a, **k))
    captured(tmp_path, task='class_prompt = "a circle"\nnum_class_images = 5\nsample_batch_size = 2', extra=PRIOR)
    assert sizes == [2, 2, 1]


def test_method_and_lora_keys(tmp_path, captured):
    _, full = captured(tmp_path, task='prior_preservation = false\nmethod = "full"\nexport = "m"', name="full")
    assert full["model"].adapter is None
    assert {id(p) for p in full["model"].trainable_parameters()} == {id(p) for p in full["model"].inner.model.unet.parameters()}
    _, lora = captured(tmp_path, task='prior_preservation = false', name="lora")
    names = _adapter(lora).names()
    assert names and all(n.startswith("unet.") and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in names)
    assert {layer.rank for _, layer in _adapter(lora).items()} == {4}
    _, tuned = captured(tmp_path, task='prior_preservation = false\nlora_rank = 3\nlora_alpha = 1.5\nlora_dropout = 0.25\n'
                                       'lora_targets = ["ff.net.2"]', name="tuned")
    layers = dict(_adapter(tuned).items())
    assert all(n.endswith("ff.net.2") for n in layers) and layers
    assert {(x.rank, x.alpha, x.dropout) for x in layers.values()} == {(3, 1.5, 0.25)}


def test_train_text_encoder_and_text_targets(tmp_path, captured):
    _, te = captured(tmp_path, task="prior_preservation = false\ntrain_text_encoder = true", name="te")
    text = [n for n in _adapter(te).names() if n.startswith("text_encoder.")]
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in text} >= {"in_proj.q", "mlp.c_fc"}
    assert te["model"].inner.train_text_encoder
    _, some = captured(tmp_path, task='prior_preservation = false\ntrain_text_encoder = true\n'
                                      'lora_text_targets = ["attn.out_proj"]', name="some")
    assert {n for n in _adapter(some).names() if n.startswith("text_encoder.")} == \
        {n for n in text if n.endswith("attn.out_proj")}
    _, full = captured(tmp_path, task='prior_preservation = false\ntrain_text_encoder = true\nmethod = "full"\n'
                                      'export = "m"', name="fullte")
    te_params = {id(p) for p in full["model"].inner.model.text_encoder.parameters()}
    assert te_params <= {id(p) for p in full["model"].trainable_parameters()}


def test_export_keys(tmp_path, captured):
    summary, _ = captured(tmp_path, task='prior_preservation = false\nexport_lora = "sub/my.safetensors"\n'
                                         'lora_dtype = "float16"', name="kohya")
    assert summary["lora"] == str(tmp_path / "out-kohya" / "sub" / "my.safetensors")
    with safe_open(summary["lora"], "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}
        assert f.metadata()["ss_network_module"] == "networks.lora"
    summary, _ = captured(tmp_path, task='prior_preservation = false\nlora_format = "peft"\nexport_lora = "peft"',
                          name="peft")
    with safe_open(summary["lora"], "pt") as f:
        assert summary["lora"].endswith("pytorch_lora_weights.safetensors")
        assert all(k.startswith("unet.") and ".lora_A." in k or ".lora_B." in k for k in f.keys())
    summary, _ = captured(tmp_path, task='prior_preservation = false\nexport = "merged"\n'
                                         'export_format = "single-file"', name="merged")
    assert Path(summary["exported"]).is_file()  # single-file: one .safetensors, not a folder


def test_an_interrupted_run_writes_no_lora_and_no_export(tmp_path, monkeypatch):
    """A run stopped early (SIGTERM: the loop checkpoints and returns interrupted) leaves the LoRA
    and the export unwritten; the resumed run writes them."""
    import t2i_engine.training.loop as loop

    real = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **k: {**real(*a, **k), "interrupted": True})
    path = job(tmp_path, task='prior_preservation = false\nexport = "merged"', name="stop")
    summary = _run(path)
    assert summary["interrupted"] and "lora" not in summary and "exported" not in summary
    assert not (tmp_path / "out-stop" / "merged").exists()
    monkeypatch.setattr(loop, "fit", real)
    summary = _run(path)
    assert Path(summary["lora"]).exists() and Path(summary["exported"]).exists()


def test_transform_keys(tmp_path, captured):
    from PIL import Image

    (tmp_path / "wide").mkdir()
    ramp = (torch.arange(48) * 5).view(1, 48, 1).expand(24, 48, 3).to(torch.uint8).numpy()  # left to right
    Image.fromarray(ramp).save(tmp_path / "wide" / "0.png")
    (tmp_path / "wide" / "0.txt").write_text("a sks")

    def first(name: str, keys: str) -> torch.Tensor:
        _, got = captured(tmp_path, task="prior_preservation = false\n" + keys, name=name, instances=tmp_path / "wide")
        return got["dataset"][0]["image"]

    center = first("c", "")
    assert center.shape == (3, SIZE, SIZE)
    assert first("r", "resolution = 8").shape == (3, 8, 8)
    rand = [first(f"r{s}", f'crop = "random"\nseed = {s}') for s in range(8)]
    assert any(not torch.equal(r, center) for r in rand)  # crop: random places
    assert any(not torch.equal(rand[0], r) for r in rand[1:])  # seed: decides where
    # the crop's generator hangs on the image's path (a new tmp folder each session): 24 seeds make a
    # run without any flip a 2**-24 event
    flips = [first(f"f{s}", f"hflip = true\nseed = {s}") for s in range(24)]
    assert all(torch.equal(first(f"n{s}", f"seed = {s}"), center) for s in range(3))  # no flip without hflip
    assert any(torch.equal(f, center.flip(-1)) for f in flips) and not torch.equal(center, center.flip(-1))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task, extra, error, message", [
    ('prior_preservation = false', '\n[data]\ntype = "shapes"\n', ConfigError, "data: task 'dreambooth'"),
    ('prior_preservation = false\nmethod = "full"\nexport = "m"\nlora_rank = 2', "", ConfigError, "task.lora_rank"),
    ('prior_preservation = false\nmethod = "full"', "", ConfigError, "task.export"),
    ('prior_preservation = false\nlora_text_targets = ["mlp.c_fc"]', "", ConfigError, "train_text_encoder = false"),
    ('prior_preservation = false\nclass_prompt = "a dog"', "", ConfigError, "task.class_prompt: only prior"),
    ('prior_preservation = false', PRIOR, ConfigError, r"\[sampler\]: only prior"),
    ('num_class_images = 2', PRIOR, ConfigError, "task.class_prompt: prior preservation needs 2 more"),
    ('class_prompt = "a dog"', "", ConfigError, "sampler: prior preservation samples"),
    ('prior_preservation = false\nlora_targets = ["no_such_layer"]', "", ConfigError, "task.lora_targets.*no_such_layer"),
    ('prior_preservation = false\nclass_prompt = []', "", ConfigError, "class_prompt"),
    ('prior_preservation = false\nmethod = "lora_and_more"', "", ConfigError, "task.method"),
    ('prior_preservation = false\nprior_loss_weight = -1.0', "", ConfigError, "prior_loss_weight"),
    ('prior_preservation = false\ninstance_promt = "a sks"', "", ConfigError, "instance_promt: unknown key"),
    ('prior_preservation = false\nmethod = "full"\nexport = "m"\ntoken_embedding = "sks"', "", ConfigError,
     "task.token_embedding: a LoRA setting"),
    ('prior_preservation = false\nmethod = "full"\nexport = "m"\ntoken_embedding_lr = 1e-3', "", ConfigError,
     "task.token_embedding_lr: a LoRA setting"),
    ('prior_preservation = false\nmethod = "full"\nexport = "m"\nexport_embedding = "e.safetensors"', "", ConfigError,
     "task.export_embedding: a LoRA setting"),
    ('prior_preservation = false\nexport_embedding = "e.safetensors"', "", ConfigError,
     "task.export_embedding: set but there is no token_embedding"),
    ('prior_preservation = false\ntoken_embedding = "zwx"', "", ConfigError, "task.token_embedding: 'zwx' is in no"),
    ('prior_preservation = false\ntoken_embedding_lr = 1e-3', "", ConfigError,
     "task.token_embedding_lr: set but there is no token_embedding"),
])
def test_bad_input_is_named(tmp_path, captured, task, extra, error, message):
    with pytest.raises(error, match=message):
        captured(tmp_path, task=task, extra=extra)


def test_uncaptioned_instance_without_prompt_and_missing_folder(tmp_path, captured):
    write_image(tmp_path / "inst" / "9.png")
    with pytest.raises(DataError, match=r"9\.png has no caption file.*instance_prompt"):
        captured(tmp_path, task="prior_preservation = false")
    text = job(tmp_path, task="prior_preservation = false").read_text()
    (tmp_path / "gone.toml").write_text(text.replace(str(tmp_path / "inst"), str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="instance_data"):
        _run(tmp_path / "gone.toml")


def test_resume_continues_the_run_and_reuses_the_class_images(tmp_path):
    """The core loop's resume through the DreamBooth wrapper: the checkpoint (model + adapter) loads
    strictly, the step count continues, and no class image is sampled again."""
    from safetensors.torch import load_file

    task = 'class_prompt = "a circle"\nnum_class_images = 2\nlora_rank = 2'
    first = _run(job(tmp_path, task=task, train="lr = 0.01", extra=PRIOR), "train.checkpoint_every=1")
    lora_2 = load_file(first["lora"])
    again = _run(job(tmp_path, task=task, train="lr = 0.01\nresume = true", extra=PRIOR),
                 "train.checkpoint_every=1", "train.max_steps=3")
    assert again["step"] == 3 and again["class_images_sampled"] == 0 and again["class_images_reused"] == 2
    lora_3 = load_file(again["lora"])
    assert lora_3.keys() == lora_2.keys() and any(not torch.equal(lora_3[k], lora_2[k]) for k in lora_2)
    metrics = (tmp_path / "out-job" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [2, 3]  # each run logs its last step, once
