"""LoRA on Stable Diffusion against diffusers and peft on the same tiny pipeline.

* A LoRA we export in kohya format, loaded with diffusers' ``pipe.load_lora_weights`` (its PEFT
  backend), gives our image, UNet and text outputs (alpha != rank, and with a multiplier set on
  both sides through ``set_adapters``).
* A LoRA made with peft on diffusers' own UNet and CLIP text model, saved by diffusers'
  ``StableDiffusionPipeline.save_lora_weights`` (the path diffusers' training scripts take), and
  one saved by peft's ``save_pretrained`` (``adapter_config.json``), load in the engine with the
  same outputs.

transformers 5.24 refuses peft < 0.22 whenever diffusers loads a LoRA into a transformers model,
and the package index stops at peft 0.21: the tests lift that one version gate
(``transformers.integrations.peft.MIN_PEFT_VERSION``) with monkeypatch, and put peft adapters on
the text model with peft's own ``inject_adapter_in_model`` (transformers' ``add_adapter`` is
behind the same gate). Nothing else of either library is changed.
"""

from __future__ import annotations


import pytest
import torch

from t2i_engine.adapters import create_adapter, load_lora, save_kohya, save_peft
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig
from t2i_engine.errors import CheckpointError
from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_engine.pipeline import generate
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

pytest.importorskip("peft")

UNET = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT = ["attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"]
PROMPTS, NEGATIVE = ["a red square", "a blue circle"], ["", "green"]


@pytest.fixture(autouse=True)
def _peft_gate(monkeypatch):
    import transformers.integrations.peft as tp

    monkeypatch.setattr(tp, "MIN_PEFT_VERSION", "0.21.0")


def ours_from(folder):
    return build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"])


def diffusers_from(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the engine's ddim reads the same config
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_adapter(model, *, rank=4, alpha=2.0, seed=5, embeddings=None):
    """Our adapter on UNet attention, feed-forward and projections and every text projection,
    with random up matrices (a fresh LoRA is zero), and ``embeddings`` (token embeddings) if given."""
    patterns = [f"unet.*.{p}" for p in UNET] + [f"text_encoder.*.{p}" for p in TEXT]
    adapter = create_adapter(model, patterns, rank=rank, alpha=alpha, embeddings=embeddings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 0.3)
    return adapter


def images_match(ours, pipe, prompts=PROMPTS[:1]):
    """Largest pixel difference of one guided DDIM image (3 steps, a negative prompt)."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(prompts, negative_prompt=NEGATIVE[1:], latents=noise.clone(), num_inference_steps=3,
               guidance_scale=7.5, height=16, width=16, output_type="pt").images
    return float((engine_image(ours, prompts, noise) - ref).abs().max())


def engine_image(ours, prompts, noise):
    return generate(ours, prompts, noise, sampler=SAMPLERS["ddim"](DDIMConfig(steps=3)),
                    guidance=GuidanceConfig(guidance_scale=7.5), negative_prompts=NEGATIVE[1:]) / 2 + 0.5


def components_match(ours, pipe):
    """Largest difference of UNet and text-encoder outputs, and how far the LoRA moved them."""
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 77, 32)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unet = (ours.unet(x, t, Conditioning(text=TextEmbedding(ctx))) - pipe.unet(x, t, encoder_hidden_states=ctx).sample)
        text = ours.text_encoder(ids) - pipe.text_encoder(ids)[0]
    return float(unet.abs().max()), float(text.abs().max())


def test_kohya_export_loads_in_diffusers(sd1_folder, tmp_path):
    _, folder = sd1_folder
    ours, pipe = ours_from(folder), diffusers_from(folder)
    assert max(components_match(ours, pipe)) < 1e-4
    adapter = random_adapter(ours)
    assert min(components_match(ours, pipe)) > 1e-2  # the LoRA changes both networks
    path = str(tmp_path / "style.safetensors")
    save_kohya(adapter, path, ours.lora_key_map())
    pipe.load_lora_weights(path, adapter_name="style")
    assert max(components_match(ours, pipe)) <= 1e-4
    assert images_match(ours, pipe) <= 1e-3
    adapter.multiplier = 0.6
    pipe.set_adapters(["style"], adapter_weights=[0.6])
    assert max(components_match(ours, pipe)) <= 1e-4


def test_kohya_locon_on_resnets_loads_in_diffusers(sd1_folder, tmp_path):
    """3x3 and 1x1 convolutions of the resnets, their time projections and the down/up samplers
    (kohya's LoCon / conv_dim targets) as diffusers reads them."""
    _, folder = sd1_folder
    ours, pipe = ours_from(folder), diffusers_from(folder)
    adapter = create_adapter(ours, ["unet.*.resnets.*.conv1", "unet.*.resnets.*.conv2", "unet.*.conv_shortcut",
                                    "unet.*.time_emb_proj", "unet.*.downsamplers.0.conv", "unet.*.upsamplers.0.conv"],
                             rank=2, alpha=1.0)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.normal_(0, 0.3)
    assert components_match(ours, pipe)[0] > 1e-2
    save_kohya(adapter, str(tmp_path / "locon.safetensors"), ours.lora_key_map())
    pipe.load_lora_weights(str(tmp_path / "locon.safetensors"))
    assert components_match(ours, pipe)[0] <= 1e-4


def test_bundled_token_embedding_matches_diffusers_textual_inversion(sd1_folder, tmp_path):
    """A LoRA with a token embedding for "sks" (pivotal tuning), saved in kohya format with the
    embedding bundled (``bundle_emb.sks.string_to_param.*``) and loaded back by the engine, gives
    the image diffusers gives with the LoRA (``load_lora_weights``, the bundle keys left out: its
    kohya converter refuses keys it does not know) and the embedding's own file loaded by
    ``load_textual_inversion`` (a new token "sks" whose input row is the vector)."""
    from safetensors.torch import load_file

    from t2i_engine.adapters import TokenEmbeddings, save_textual_inversion

    _, folder = sd1_folder
    ours, pipe = ours_from(folder), diffusers_from(folder)
    sks = TokenEmbeddings({"sks": torch.randn(1, 32, generator=torch.Generator().manual_seed(9))})
    adapter = random_adapter(ours, embeddings=sks)
    save_kohya(adapter, str(tmp_path / "subject.safetensors"), ours.lora_key_map())
    save_textual_inversion(adapter.embeddings, str(tmp_path / "sks.safetensors"))
    tensors = load_file(str(tmp_path / "subject.safetensors"))
    assert torch.equal(tensors["bundle_emb.sks.string_to_param.*"], adapter.embeddings.vectors[0].detach())

    engine = ours_from(folder)
    loaded, report = load_lora(engine, str(tmp_path / "subject.safetensors"), engine.lora_key_map())
    assert report.embeddings == ("sks",) and not report.unmatched
    pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    pipe.load_textual_inversion(str(tmp_path / "sks.safetensors"))
    prompt = ["a red sks on a blue background"]
    assert images_match(engine, pipe, prompt) <= 1e-3
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with_embedding = engine_image(engine, prompt, noise)
    loaded.embeddings.enabled = False
    assert float((engine_image(engine, prompt, noise) - with_embedding).abs().max()) > 1e-2  # it matters
    loaded.embeddings.enabled = True
    assert images_match(engine, pipe, PROMPTS[:1]) <= 1e-3  # prompts without the word are untouched


def test_kohya_metadata(sd1_folder, tmp_path):
    from safetensors import safe_open

    ours = ours_from(sd1_folder[1])
    save_kohya(random_adapter(ours, rank=4, alpha=2.0), str(tmp_path / "k.safetensors"), ours.lora_key_map())
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_base_model_version"] == "sd_v1"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in keys


def _peft_pipeline(folder):
    """diffusers' pipeline with peft LoRAs on its UNet (rank and alpha patterns) and CLIP text
    model, random (``init_lora_weights=False``), and their configs."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = diffusers_from(folder)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"attn2.to_k": 2},
                          alpha_pattern={"ff.net.2": 3.0}, target_modules=UNET)
    text_cfg = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    torch.manual_seed(11)
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(text_cfg, pipe.text_encoder)
    return pipe, unet_cfg, text_cfg


def test_peft_lora_saved_by_diffusers_loads_in_engine(sd1_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    _, folder = sd1_folder
    pipe, unet_cfg, text_cfg = _peft_pipeline(folder)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    ours = ours_from(folder)
    assert min(components_match(ours, pipe)) > 1e-2
    adapter, report = load_lora(ours, str(tmp_path / "lora"), ours.lora_key_map())
    assert report.unmatched == () and report.targets == len(get_peft_model_state_dict(pipe.unet)) // 2 + 12
    assert max(components_match(ours, pipe)) <= 1e-4
    assert images_match(ours, pipe) <= 1e-3


def test_peft_save_pretrained_folder_with_adapter_config(sd1_folder, tmp_path):
    """peft's own ``save_pretrained``: ``base_model.model.*`` keys, alpha and patterns only in
    ``adapter_config.json`` (the UNet alone)."""
    from peft import LoraConfig, get_peft_model

    _, folder = sd1_folder
    pipe = diffusers_from(folder)
    cfg = LoraConfig(r=3, lora_alpha=12, init_lora_weights=False, alpha_pattern={"attn1.to_v": 1.5},
                     target_modules=["to_q", "to_v", "proj_out"])
    torch.manual_seed(12)
    wrapped = get_peft_model(pipe.unet, cfg)
    wrapped.save_pretrained(str(tmp_path / "peft"))
    ours = ours_from(folder)
    load_lora(ours, str(tmp_path / "peft"), ours.lora_key_map())
    assert components_match(ours, pipe)[0] <= 1e-4


def _outputs(model):
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = model.text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        return model.unet(x, torch.tensor([3.0, 700.0]), Conditioning(text=TextEmbedding(ctx))), model.text_encoder(ids)


def test_merge_equals_unmerged_and_unmerge_restores(sd1_folder):
    ours = ours_from(sd1_folder[1])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    plain = _outputs(ours)
    adapter = random_adapter(ours)
    unmerged = _outputs(ours)
    assert all(float((u - p).abs().max()) > 1e-2 for u, p in zip(unmerged, plain))
    adapter.merge()
    for m, u in zip(_outputs(ours), unmerged):
        torch.testing.assert_close(m, u, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    assert max(float((v - before[k]).abs().max()) for k, v in ours.state_dict().items()) <= 1e-6
    adapter.detach()
    for p, b in zip(_outputs(ours), plain):  # weights within 1e-6 (above): outputs within 1e-5
        torch.testing.assert_close(p, b, rtol=1e-5, atol=1e-5)


def test_unmatched_key_is_refused_and_partial_reports_it(sd1_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    ours = ours_from(sd1_folder[1])
    path = str(tmp_path / "k.safetensors")
    save_kohya(random_adapter(ours), path, ours.lora_key_map())
    sd = load_file(path)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, path)
    fresh = ours_from(sd1_folder[1])
    with pytest.raises(CheckpointError, match=r"2 of \d+ keys match no module.*down_blocks_9_attentions_0_proj_in"):
        load_lora(fresh, path, fresh.lora_key_map())
    with pytest.warns(UserWarning, match="down_blocks_9"):
        _, report = load_lora(fresh, path, fresh.lora_key_map(), partial=True)
    assert len(report.unmatched) == 2 and report.keys == len(sd) - 2


def _legacy(peft_sd, *, unet_prefix):
    """diffusers' pre-PEFT spellings: attention processors (``attn1.processor.to_q_lora.down``)
    for the UNet, ``lora_linear_layer`` for the text encoder."""
    out = {}
    for key, value in peft_sd.items():
        if key.startswith("unet."):
            module, _, role = key.removeprefix("unet.").rpartition(".lora_")
            parent, _, proj = module.rpartition(".")
            if proj == "0":  # to_out.0
                parent, proj = parent.rpartition(".")[0], "to_out"
            key = f"{unet_prefix}{parent}.processor.{proj}_lora.{'down' if role == 'A.weight' else 'up'}.weight"
        else:
            key = key.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(
                ".lora_B.weight", ".lora_linear_layer.up.weight")
        out[key] = value
    return out


def test_legacy_diffusers_keys_load_as_diffusers_reads_them(sd1_folder, tmp_path):
    """Legacy keys (what ``unet.save_attn_procs`` and diffusers 0.1x wrote) read by diffusers'
    ``load_lora_weights`` and by the engine give the same networks; the engine also reads the
    unprefixed processor keys of ``save_attn_procs`` files, which diffusers 0.42 skips."""
    from safetensors.torch import load_file

    _, folder = sd1_folder
    maker = ours_from(folder)
    adapter = create_adapter(maker, [f"unet.*.{p}" for p in UNET[:4]] + [f"text_encoder.*.{p}" for p in TEXT[:4]],
                             rank=3)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.normal_(0, 0.3)
    peft_sd = load_file(save_peft(adapter, str(tmp_path / "peft"), maker.lora_key_map()))
    pipe = diffusers_from(folder)
    pipe.load_lora_weights(_legacy(peft_sd, unet_prefix="unet."))
    for prefix in ("unet.", ""):
        torch.save(_legacy(peft_sd, unet_prefix=prefix), tmp_path / f"legacy{prefix}.bin")
        ours = ours_from(folder)
        load_lora(ours, str(tmp_path / f"legacy{prefix}.bin"), ours.lora_key_map())
        assert max(components_match(ours, pipe)) <= 1e-4


def test_nemo_lora_archive(sd1_folder, tmp_path):
    """NeMo's SD LoRA (``.nemo`` tar: ``model_weights.ckpt`` with
    ``model.model.diffusion_model.<LDM path>.adapter_layer.parallel_linear_adapter.linear_in/out``
    and ``peft.lora_tuning.network_alpha`` in ``model_config.yaml``) acts as the same LoRA
    written in kohya format."""
    import io
    import tarfile

    import yaml
    from safetensors.torch import load_file

    _, folder = sd1_folder
    maker = ours_from(folder)
    adapter = create_adapter(maker, ["unet.*.attn1.to_k", "unet.*.attn2.to_v", "unet.*.to_out.0"], rank=4, alpha=2.0)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.normal_(0, 0.3)
    keymap = maker.lora_key_map()
    save_kohya(adapter, str(tmp_path / "k.safetensors"), keymap)
    nemo = {}
    for name, layer in adapter.items():
        ldm = next(a for a in keymap.targets[name].aliases if a.startswith("model.model.diffusion_model.input")
                   or a.startswith("model.model.diffusion_model.output") or a.startswith("model.model.diffusion_model.middle"))
        nemo[f"{ldm}.adapter_layer.parallel_linear_adapter.linear_in.weight"] = layer.down.weight.detach().clone()
        nemo[f"{ldm}.adapter_layer.parallel_linear_adapter.linear_out.weight"] = layer.up.weight.detach().clone()
    with tarfile.open(tmp_path / "lora.nemo", "w") as tar:
        for member, data in (("model_weights.ckpt", _torch_bytes(nemo)), ("model_config.yaml", yaml.safe_dump(
                {"peft": {"peft_scheme": "sdlora", "lora_tuning": {"adapter_dim": 4, "network_alpha": 2.0}}}).encode())):
            info = tarfile.TarInfo(f"./{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    a, b = ours_from(folder), ours_from(folder)
    load_lora(a, str(tmp_path / "k.safetensors"), keymap)
    load_lora(b, str(tmp_path / "lora.nemo"), keymap)
    assert set(load_file(str(tmp_path / "k.safetensors"))) and len(nemo) == 2 * len(list(adapter.items()))
    for x, y in zip(_outputs(a), _outputs(b)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert float((_outputs(a)[0] - _outputs(ours_from(folder))[0]).abs().max()) > 1e-2


def _torch_bytes(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
