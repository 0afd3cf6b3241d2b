"""Training a ControlNet: the initialisation against diffusers' ``ControlNetModel.from_unet``, what
``sd_locked`` freezes, ``only_mid_control``, the empty-prompt ratio, and ``controlnet-train`` jobs
on a tiny random model (2-step smoke runs, exact resume, exports read back by diffusers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_engine.conditioning.chain import ConditionerChain, Entry
from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_plugin_controlnet import plugin
from t2i_plugin_controlnet.conditioner import ControlNetConditioner, ControlNetConditionerConfig
from t2i_plugin_controlnet.formats import LoadedControlNet, load_controlnet
from t2i_plugin_controlnet.network import controlnet_from_unet
from t2i_plugin_controlnet.training import DECODER_PREFIXES, ControlNetTrainable

WIDTHS = (16, 32)  # one stride-2 level: the tiny autoencoder's factor 2


@pytest.fixture(scope="module")
def sd(sd_controlnets) -> Path:
    """The tiny SD pipeline folder saved by diffusers."""
    return sd_controlnets[0]


def _model(folder: Path):
    """Our SD model of ``folder``, through the plugin's registered factory (as a job builds it)."""
    factory = _pm().get("model", "stable-diffusion").factory
    return factory(factory.Config(checkpoint=str(folder), preset="sd-1"))


def _pm() -> EnginePluginManager:
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(plugin, name="controlnet")
    return pm


def _trainable(folder: Path, *, sd_locked: bool = True, only_mid: bool = False, ratio: float = 0.5):
    model = _model(folder)
    torch.manual_seed(0)
    loaded = LoadedControlNet(controlnet_from_unet(model.unet, hint_widths=WIDTHS))
    cond = ControlNetConditioner(ControlNetConditionerConfig(checkpoint="-", only_mid_control=only_mid),
                                 loaded=loaded, trainable=True)
    cond.setup(model)
    return ControlNetTrainable(model, ConditionerChain([Entry(cond)]), empty_prompt_ratio=ratio,
                               sd_locked=sd_locked), cond


def _batch(n: int = 2, *, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "hint": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
            "caption": ["a red square", "a blue circle"][:n]}


def test_a_fresh_controlnet_is_diffusers_from_unet(sd):
    """The encoder is the UNet's (as diffusers' ControlNetModel.from_unet copies it), every zero conv
    and the hint encoder's last conv are zero, and so the first residuals are exactly 0."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    model = _model(sd)
    ours = controlnet_from_unet(model.unet, hint_widths=WIDTHS).state_dict()
    ref = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(str(sd / "unet")),
                                    conditioning_embedding_out_channels=WIDTHS).state_dict()
    assert set(ours) == set(ref)
    copied = [k for k in ref if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))]
    assert copied and all(torch.equal(ours[k], ref[k]) for k in copied)
    zero = [k for k in ref if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.",
                                            "controlnet_cond_embedding.conv_out."))]
    assert zero and all(not ours[k].any() and not ref[k].any() for k in zero)
    net = controlnet_from_unet(model.unet, hint_widths=WIDTHS)
    down, mid = net(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32), torch.rand(2, 3, 16, 16))
    assert all(not r.any() for r in down) and not mid.any() and len(down) == 4


def test_sd_locked_freezes_exactly_the_unet(sd):
    trainable, cond = _trainable(sd)
    ids = {id(p) for p in trainable.trainable_parameters()}
    assert ids == {id(p) for p in cond.net.parameters()}
    assert all(p.requires_grad for p in cond.net.parameters())
    model = trainable.model
    assert not any(p.requires_grad for p in [*model.unet.parameters(), *model.vae.parameters(),
                                             *model.text_encoder.parameters()])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(trainable.trainable_parameters(), lr=1.0)
    # a fresh ControlNet's zero convs get gradients (the paper's point: zero weights, non-zero grads)
    trainable.training_loss(_batch(), generator=torch.Generator().manual_seed(0)).backward()
    assert cond.net.controlnet_mid_block.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # SD untouched
    assert cond.net.controlnet_mid_block.weight.abs().sum() > 0


def test_sd_unlocked_trains_the_unet_decoder_too(sd):
    trainable, cond = _trainable(sd, sd_locked=False)
    unet = trainable.model.unet
    decoder = {n for n, _ in unet.named_parameters() if n.startswith(DECODER_PREFIXES)}
    assert any(n.startswith("up_blocks.") for n in decoder) and "conv_out.weight" in decoder
    ids = {id(p) for p in trainable.trainable_parameters()}
    named = dict(unet.named_parameters())
    assert ids == {id(p) for p in cond.net.parameters()} | {id(named[n]) for n in decoder}
    assert {n for n, p in named.items() if p.requires_grad} == decoder
    assert not any(p.requires_grad for p in trainable.model.text_encoder.parameters())


def test_only_mid_control_adds_the_middle_residual_alone(sd):
    model = _model(sd)
    torch.manual_seed(1)
    net = controlnet_from_unet(model.unet, hint_widths=WIDTHS)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # zero convs non-zero, so every residual acts
    text = TextEmbedding(torch.randn(2, 77, 32), None, None)
    hint = torch.rand(2, 3, 16, 16)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    cond = ControlNetConditioner(ControlNetConditionerConfig(checkpoint="-", only_mid_control=True),
                                 loaded=LoadedControlNet(net))
    cond.setup(model)
    c = Conditioning(text=text).with_extras(**{cond.key: hint})
    res = cond.residuals(x, t, c)
    assert res.down is None
    with torch.no_grad():
        _, mid = net(x, t, text.tokens, hint)
        got = ConditionerChain([Entry(cond)]).compose(model.unet)(x, t, c)
        ref = model.unet(x, t, Conditioning(text=text), mid_residual=mid)
        everything = model.unet(x, t, Conditioning(text=text), down_residuals=net(x, t, text.tokens, hint)[0],
                                mid_residual=mid)
    assert torch.equal(res.mid, mid) and torch.allclose(got, ref, atol=1e-6)
    assert (got - everything).abs().max() > 1e-3


def test_the_empty_prompt_ratio_replaces_that_share_of_prompts(sd):
    for ratio in (0.0, 0.5, 1.0):
        trainable, _ = _trainable(sd, ratio=ratio)
        kept = trainable.drop_captions(["x"] * 4000, generator=torch.Generator().manual_seed(0))
        share = kept.count("") / len(kept)
        assert abs(share - ratio) < 0.03
    # with every prompt dropped, the loss is the loss on empty prompts (same noise draws)
    all_dropped, _ = _trainable(sd, ratio=1.0)
    none_dropped, _ = _trainable(sd, ratio=0.0)
    b = _batch()
    got = all_dropped.training_loss(b, generator=torch.Generator().manual_seed(3))
    ref = none_dropped.training_loss({**b, "caption": ["", ""]}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)


# --- jobs ----------------------------------------------------------------------------------------

def _pairs(root: Path, n: int = 4, size: int = 24) -> Path:
    """A fill50k-layout folder: prompt.json, source/ (hints) and target/ (images)."""
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        for sub in ("source", "target"):
            px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / sub / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                 "prompt": ["a red square", "a blue circle"][i % 2]}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def _job(tmp_path: Path, sd: Path, data: Path, *, task: str = "", train: str = "max_steps = 2\n") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "train.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "controlnet"]
device = "cpu"
seed = 3
output_dir = "{tmp_path / 'out'}"
[task]
name = "controlnet-train"
hint_widths = [16, 32]
export = "cn"
{task}
[model]
type = "stable-diffusion"
checkpoint = "{sd}"
preset = "sd-1"
[data]
type = "controlnet-pairs"
root = "{data}"
resolution = 16
crop = "random"
hflip = true
[train]
accelerator = "cpu"
batch_size = 2
progress_bar = false
checkpoint_every = 2
lr = 1e-3
{train}""")
    return job


def _run(job: Path, *sets: str) -> dict:
    pm = _pm()
    return dict(run_config(load_config(job, pm, overrides=sets), pm))


def test_a_two_step_job_trains_and_exports_a_diffusers_folder(sd, tmp_path):
    from diffusers import ControlNetModel

    data = _pairs(tmp_path / "fill")
    out = _run(_job(tmp_path, sd, data))
    assert out["step"] == 2 and np.isfinite(out["loss"])
    ref = ControlNetModel.from_pretrained(out["exported"]).state_dict()  # diffusers reads it
    ours = load_controlnet(out["exported"]).net.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert ref["controlnet_mid_block.weight"].abs().sum() > 0  # it trained: the zero conv moved


def test_resume_continues_exactly(sd, tmp_path):
    data = _pairs(tmp_path / "fill")
    straight = _run(_job(tmp_path / "a", sd, data, train="max_steps = 4\nema = false\n"))
    _run(_job(tmp_path / "b", sd, data, train="max_steps = 2\nema = false\nresume = true\n"))
    resumed = _run(_job(tmp_path / "b", sd, data, train="max_steps = 4\nema = false\nresume = true\n"))
    a, b = load_controlnet(straight["exported"]).net.state_dict(), load_controlnet(resumed["exported"]).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_v1_1_export_is_the_diffusers_export_in_the_original_layout(sd, tmp_path):
    """``export_format = "v1.1"`` writes what ``save_controlnet(format="v1.1")`` writes, whose reading by
    diffusers' ``from_single_file`` is tested in test_single_file.py (its converter needs SD's
    4-level hint encoder, which the tiny autoencoder's factor 2 does not fit)."""
    from safetensors.torch import load_file

    from t2i_plugin_controlnet.ldm import to_ldm

    data = _pairs(tmp_path / "fill")
    folder = _run(_job(tmp_path / "a", sd, data))["exported"]  # the same run, exported as a diffusers folder
    out = _run(_job(tmp_path / "b", sd, data, task='export_format = "v1.1"\nexport_dtype = "float16"\n'),
               'task.export="cn.safetensors"')
    raw = load_file(out["exported"])
    trained = load_controlnet(folder).net
    ref = to_ldm(trained.state_dict(), trained.config.unet, widths=len(WIDTHS))
    assert set(raw) == set(ref) and all(k.startswith("control_model.") for k in raw)
    assert all(raw[k].dtype == torch.float16 and torch.equal(raw[k], ref[k].half()) for k in ref)
    ours = load_controlnet(out["exported"], base=_model(sd).unet).net.state_dict()
    assert all(torch.equal(ours[k], v.half().float()) for k, v in trained.state_dict().items())


def test_lr_defaults_to_1e_5_unless_the_job_sets_it(sd, tmp_path):
    data = _pairs(tmp_path / "fill")
    job = _job(tmp_path, sd, data)
    assert load_config(job, _pm()).train.lr == 1e-3
    job.write_text(job.read_text().replace("lr = 1e-3\n", ""))
    assert load_config(job, _pm()).train.lr == 1e-5
    from t2i_plugin_controlnet.train_task import ControlNetTrainConfig, ControlNetTrainTask

    class Ctx:  # no [train] table at all
        class config:
            data, train = object(), None

    assert ControlNetTrainTask(ControlNetTrainConfig())._check(Ctx).lr == 1e-5


def test_unlocked_needs_export_model_and_writes_it(sd, tmp_path):
    data = _pairs(tmp_path / "fill")
    with pytest.raises(ConfigError, match="export_model"):
        _run(_job(tmp_path, sd, data, task="sd_locked = false\n"))
    out = _run(_job(tmp_path, sd, data, task='sd_locked = false\nexport_model = "sd"\n'))
    from diffusers import UNet2DConditionModel

    before = UNet2DConditionModel.from_pretrained(str(sd / "unet")).state_dict()
    after = UNet2DConditionModel.from_pretrained(str(Path(out["exported_model"]) / "unet")).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(DECODER_PREFIXES) for k in changed)


def test_sample_every_draws_grids_with_the_sample_hints(sd, tmp_path):
    """``[train] sample_every`` with ``sample_prompts`` and ``[task] sample_hints``: a grid every N
    steps, as PNG in the output folder and in TensorBoard; none without it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _pairs(tmp_path / "fill")
    hints = f'sample_hints = ["{data / "source/0.png"}", "../fill/source/1.png"]\n'  # relative: to the job's folder
    train = 'max_steps = 4\nsample_every = 2\nsample_prompts = ["a red square", "a blue circle"]\n'
    out = Path(_run(_job(tmp_path / "a", sd, data, task=hints, train=train))["exported"]).parent
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["samples-000002.png", "samples-000004.png"]
    grid = np.asarray(Image.open(out / "samples" / "samples-000004.png"))
    hint = np.asarray(Image.open(data / "source/0.png").convert("RGB").resize((16, 16), Image.Resampling.BICUBIC))
    assert np.abs(grid[2:18, 2:18].astype(int) - hint).max() <= 1  # each tile: the hint, then its image
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Images("samples")] == [2, 4]
    plain = Path(_run(_job(tmp_path / "b", sd, data, train="max_steps = 4\n"))["exported"]).parent
    assert not (plain / "samples").exists()


def test_sample_images_draw_each_prompt_with_its_hint(sd_controlnets, sd, tmp_path):
    model = _model(sd)
    cond = ControlNetConditioner(ControlNetConditionerConfig(checkpoint="-"), loaded=load_controlnet(
        str(sd_controlnets[1][0])), trainable=True)
    cond.setup(model)
    data = _pairs(tmp_path / "fill")
    a, b = str(data / "source/0.png"), str(data / "source/1.png")
    grids = []
    for hints in ([a, b], [a, a]):
        trainable = ControlNetTrainable(model, ConditionerChain([Entry(cond)]), sample_hints=hints)
        trainable.sample_steps = 3
        grids.append(trainable.sample_images(["a red square"] * 2, generator=torch.Generator().manual_seed(0)))
        assert not trainable.conditioners._given  # the hints are gone again: training batches bring theirs
    assert grids[0].shape == (2, 3, 16, 32)  # no batch seen: 8x8 latents, factor 2; hint and image side by side
    assert torch.equal(grids[0][0], grids[1][0]) and (grids[0][1] - grids[1][1]).abs().max() > 1e-2


def test_sample_grids_need_one_hint_per_prompt(sd, tmp_path):
    data = _pairs(tmp_path / "fill")
    train = 'sample_every = 1\nsample_prompts = ["a", "b"]\n'
    with pytest.raises(ConfigError, match="one hint image per prompt .got 1 hints for 2 prompts"):
        _run(_job(tmp_path, sd, data, task=f'sample_hints = ["{data / "source/0.png"}"]', train=train))
    with pytest.raises(ConfigError, match="no sample grids are drawn without train.sample_every"):
        _run(_job(tmp_path, sd, data, task=f'sample_hints = ["{data / "source/0.png"}"]'))
    with pytest.raises(ConfigError, match=r"task.sample_hints\[1\]: path does not exist"):
        _run(_job(tmp_path, sd, data, task=f'sample_hints = ["{data / "source/0.png"}", "nope.png"]', train=train))


def _captured(monkeypatch) -> dict:
    """Replace the core loop by a stub that keeps the trainable it is given (no training)."""
    import t2i_engine.training.loop as loop

    seen: dict = {}

    def fake_fit(model, dataset, cfg, **kw):
        seen.update(model=model, dataset=dataset, cfg=cfg)
        # what the real fit returns for a run stopped before its first step
        return {"step": 0, "checkpoint": str(Path(kw["output_dir"]) / "checkpoints"), "interrupted": True,
                "nonfinite_skipped": 0, "skipped_samples": 0, "first_skipped": [], "loss": math.nan}

    monkeypatch.setattr(loop, "fit", fake_fit)
    return seen


def test_task_keys_reach_the_trainable(sd, tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    data = _pairs(tmp_path / "fill")
    out = _run(_job(tmp_path, sd, data, task='empty_prompt_ratio = 0.25\nonly_mid_control = true\nhint_key = "src"\n'
                                              'sd_locked = false\nexport_model = "sd"\n'))
    assert "exported" not in out and "exported_model" not in out  # the stub's run was interrupted: no export
    t = seen["model"]
    cond = t.conditioners.entries[0].conditioner
    assert t.caption_dropout == 0.25 and not t.sd_locked and cond.config.only_mid_control and cond.batch_key == "src"
    _run(_job(tmp_path / "b", sd, data))
    t = seen["model"]
    cond = t.conditioners.entries[0].conditioner
    assert t.caption_dropout == 0.5 and t.sd_locked and not cond.config.only_mid_control and cond.batch_key == "hint"
    assert cond.net.config.hint_channels == 3 and cond.net.config.hint_widths == WIDTHS


def test_hint_channels_and_widths_shape_a_fresh_controlnet(sd, tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    data = _pairs(tmp_path / "fill")
    _run(_job(tmp_path, sd, data, task="hint_channels = 1\n"))
    net = seen["model"].conditioners.entries[0].conditioner.net
    assert net.controlnet_cond_embedding.conv_in.weight.shape[1] == 1
    job = _job(tmp_path / "w", sd, data)
    job.write_text(job.read_text().replace("hint_widths = [16, 32]", "hint_widths = [8, 24]"))
    _run(job)
    assert seen["model"].conditioners.entries[0].conditioner.net.config.hint_widths == (8, 24)
    job.write_text(job.read_text().replace("hint_widths = [8, 24]", ""))  # SD's 4 levels: factor 8, not 2
    with pytest.raises(ConfigError, match="hint encoder shrinks images 8x but the model's autoencoder 2x"):
        _run(job)


def test_training_continues_from_a_given_controlnet(sd, tmp_path, monkeypatch):
    data = _pairs(tmp_path / "fill")
    first = _run(_job(tmp_path / "a", sd, data))["exported"]
    seen = _captured(monkeypatch)
    _run(_job(tmp_path / "b", sd, data, task=f'controlnet = "{first}"\n'))
    net = seen["model"].conditioners.entries[0].conditioner.net
    ref = load_controlnet(first).net.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    assert net.controlnet_mid_block.weight.requires_grad


def test_a_webdataset_hint_key_is_read(sd, tmp_path):
    import io
    import tarfile

    g = torch.Generator().manual_seed(2)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            for name in (f"{i}.jpg", f"{i}.hint.png"):
                buf = io.BytesIO()
                Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
                info = tarfile.TarInfo(name)
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
            info = tarfile.TarInfo(f"{i}.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"a cat"))
    job = _job(tmp_path, sd, tmp_path)
    text = job.read_text()
    data_table = text[text.index("[data]"):text.index("[train]")]
    job.write_text(text.replace(data_table, f'[data]\ntype = "webdataset"\nurls = ["{shard}"]\n'
                                            'paired_keys = ["hint.png"]\nresolution = 16\n'))
    with pytest.raises(ConfigError, match=r"no hint 'hint' \(its fields: caption, hint.png, image, key\).*hint_key"):
        _run(job)
    out = _run(job, 'task.hint_key="hint.png"')
    assert out["step"] == 2 and np.isfinite(out["loss"])


def test_precache_latents_encodes_the_samples_once(sd, tmp_path, monkeypatch):
    from t2i_plugin_controlnet.train_task import LatentPairs

    seen = _captured(monkeypatch)
    data = _pairs(tmp_path / "fill")
    _run(_job(tmp_path, sd, data, task="precache_latents = 3\n"))
    cached, model = seen["dataset"], seen["model"].model
    assert isinstance(cached, LatentPairs) and len(cached) == 3
    from t2i_plugin_controlnet.data import PromptJsonConfig, PromptJsonPairs

    raw = PromptJsonPairs(PromptJsonConfig(root=str(data), resolution=16, crop="random", hflip=True))
    for i in range(3):
        s = raw[i]
        with torch.no_grad():
            mean = model.vae.moments(s["image"][None])[0][0] * model.vae.scaling_factor
        assert torch.allclose(cached[i]["latents"], mean, atol=1e-6)
        assert torch.equal(cached[i]["hint"], s["hint"]) and cached[i]["caption"] == s["caption"]
    _run(_job(tmp_path / "b", sd, data))
    assert not isinstance(seen["dataset"], LatentPairs)
