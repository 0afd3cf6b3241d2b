"""LoRA files on a toy model: every spelling family, alpha sources, refusals, export round trips,
and the ``[[adapters]]`` entry."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from t2i_engine.adapters import (AdapterEntry, KeyMap, TargetNames, apply_adapters, create_adapter, load_lora,
                                 save_kohya, save_peft)
from t2i_engine.config.structure import structure
from t2i_engine.errors import CheckpointError, ConfigError


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.to_q = nn.Linear(6, 6)
        self.block.proj = nn.Conv2d(6, 6, 1)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):  # x (B, L, 6)
        h = self.block.to_q(x)
        h = self.block.proj(h.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)
        return self.attn(h, h, h, need_weights=False)[0]

    def lora_key_map(self) -> KeyMap:
        return KEYMAP


KEYMAP = KeyMap({
    "block.to_q": TargetNames("lora_unet_block_to_q", "unet.block.to_q", ("block.processor.to_q",)),
    "block.proj": TargetNames("lora_unet_block_proj", "unet.block.proj"),
    "attn.in_proj.k": TargetNames("lora_te_attn_k_proj", "text_encoder.attn.k_proj"),
    "attn.out_proj": TargetNames("lora_te_attn_out_proj", "text_encoder.attn.out_proj"),
}, base_model_version="toy")
X = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))


def random_weights(rank=2, seed=0, conv=False):
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(rank, 6, generator=g), torch.randn(6, rank, generator=g)
    return (down[..., None, None], up[..., None, None]) if conv else (down, up)


def expected_output(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """The toy's output with each target's weight edited by hand: W += scale * up @ down."""
    ref = Toy()
    with torch.no_grad():
        for name, (down, up, scale) in layers.items():
            delta = up.flatten(1) @ down.flatten(1) * scale
            if name == "block.to_q":
                ref.block.to_q.weight += delta
            elif name == "block.proj":
                ref.block.proj.weight += delta[..., None, None]
            elif name == "attn.in_proj.k":
                ref.attn.in_proj_weight[6:12] += delta
            else:
                ref.attn.out_proj.weight += delta
        return ref(X)


def run(model):
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("down_suffix, up_suffix, spelling", [
    (".lora_down.weight", ".lora_up.weight", "lora_unet_block_to_q"),  # kohya
    (".lora_A.weight", ".lora_B.weight", "unet.block.to_q"),  # PEFT / diffusers
    (".lora.down.weight", ".lora.up.weight", "unet.block.to_q"),  # diffusers LoRACompatibleLinear
    ("_lora.down.weight", "_lora.up.weight", "block.processor.to_q"),  # attention processors
])
def test_every_spelling_family_gives_the_same_update(tmp_path, down_suffix, up_suffix, spelling):
    down, up = random_weights()
    save_file({spelling + down_suffix: down, spelling + up_suffix: up}, str(tmp_path / "l.safetensors"))
    model = Toy()
    adapter, report = load_lora(model, str(tmp_path / "l.safetensors"), KEYMAP, multiplier=0.5)
    assert (report.targets, report.keys) == (1, 2) and adapter.names() == ["block.to_q"]
    torch.testing.assert_close(run(model), expected_output({"block.to_q": (down, up, 0.5)}), rtol=1e-5, atol=1e-5)


def test_kohya_alpha_and_fused_slices(tmp_path):
    (d1, u1), (d2, u2), (d3, u3) = random_weights(2, 1), random_weights(3, 2), random_weights(2, 3, conv=True)
    save_file({"lora_te_attn_k_proj.lora_down.weight": d1, "lora_te_attn_k_proj.lora_up.weight": u1,
               "lora_te_attn_k_proj.alpha": torch.tensor(1.0),
               "lora_te_attn_out_proj.lora_down.weight": d2, "lora_te_attn_out_proj.lora_up.weight": u2,
               "lora_unet_block_proj.lora_down.weight": d3, "lora_unet_block_proj.lora_up.weight": u3,
               "lora_unet_block_proj.alpha": torch.tensor(0.0)}, str(tmp_path / "k.safetensors"))
    model = Toy()
    load_lora(model, str(tmp_path / "k.safetensors"), KEYMAP)
    want = expected_output({"attn.in_proj.k": (d1, u1, 1 / 2), "attn.out_proj": (d2, u2, 1.0),
                            "block.proj": (d3, u3, 1.0)})
    torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-5)


def test_adapter_config_patterns_and_rslora(tmp_path):
    (d1, u1), (d2, u2) = random_weights(2, 1), random_weights(3, 2)
    save_file({"unet.block.to_q.lora_A.weight": d1, "unet.block.to_q.lora_B.weight": u1,
               "text_encoder.attn.out_proj.lora_A.weight": d2, "text_encoder.attn.out_proj.lora_B.weight": u2},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"out_proj": 3}, "alpha_pattern": {"out_proj": 9},
        "use_rslora": True, "task_type": None}))
    model = Toy()
    load_lora(model, str(tmp_path), KEYMAP)  # the folder: adapter_model.safetensors + adapter_config.json
    want = expected_output({"block.to_q": (d1, u1, 4 / math.sqrt(2)), "attn.out_proj": (d2, u2, 9 / math.sqrt(3))})
    # scales up to 5.2 make outputs of ~30: float32 rounding of (W + s up down) x against
    # W x + s up (down x) reaches 1.4e-5 relative on some CPUs' kernels; a wrong scale is O(1)
    torch.testing.assert_close(run(model), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config, message", [({"r": 5}, "rank 5"), ({"use_dora": True}, "use_dora"),
                                             ({"lora_bias": True}, "lora_bias")])
def test_config_fields_that_change_computation_are_read_or_refused(tmp_path, config, message):
    down, up = random_weights()
    save_file({"unet.block.to_q.lora_A.weight": down, "unet.block.to_q.lora_B.weight": up},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 2, **config}))
    with pytest.raises(CheckpointError, match=message):
        load_lora(Toy(), str(tmp_path), KEYMAP)


@pytest.mark.parametrize("extra, message", [
    ({"lora_unet_block_to_q.hada_w1_a": torch.zeros(1)}, "LoHa"),
    ({"unet.block.to_q.lora_magnitude_vector": torch.zeros(6)}, "DoRA"),
    ({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 6)}, "1 of 3 keys match no module of this model: lora_unet_nowhere"),
    ({"some_buffer": torch.zeros(1)}, "some_buffer"),
])
def test_refused_files_name_the_keys(tmp_path, extra, message):
    down, up = random_weights()
    save_file({"lora_unet_block_to_q.lora_down.weight": down, "lora_unet_block_to_q.lora_up.weight": up, **extra},
              str(tmp_path / "l.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_lora(Toy(), str(tmp_path / "l.safetensors"), KEYMAP)


def test_shape_mismatch_and_missing_half_are_refused(tmp_path):
    down, up = random_weights()
    save_file({"lora_unet_block_to_q.lora_down.weight": down[:, :5].contiguous(), "lora_unet_block_to_q.lora_up.weight": up},
              str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"down is \(2, 5\)"):
        load_lora(Toy(), str(tmp_path / "a.safetensors"), KEYMAP)
    save_file({"lora_unet_block_to_q.lora_down.weight": down}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="no up matrix"):
        load_lora(Toy(), str(tmp_path / "b.safetensors"), KEYMAP)


def test_keymap_collision_is_an_error():
    with pytest.raises(ValueError, match="spells both"):
        KeyMap({"a": TargetNames("x", "a"), "b": TargetNames("x", "b")}).lookup()


@pytest.mark.parametrize("save", [save_kohya, save_peft])
def test_export_round_trip(tmp_path, save):
    model = Toy()
    adapter = create_adapter(model, ["to_q", "proj", "attn.in_proj.k", "attn.out_proj"], rank=3, alpha=1.5)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.normal_()
        adapter["attn.out_proj"].alpha = 6.0  # one alpha differs: kohya .alpha keys, PEFT alpha_pattern
    adapter.multiplier = 0.7
    want = run(model)
    adapter.detach()
    path = str(tmp_path / "out.safetensors")
    save(adapter, path, KEYMAP)
    fresh = Toy()
    load_lora(fresh, path, KEYMAP, multiplier=0.7)
    torch.testing.assert_close(run(fresh), want, rtol=1e-6, atol=1e-6)


def test_kohya_extra_metadata_is_written_but_cannot_replace_the_derived_keys(tmp_path):
    from safetensors import safe_open

    adapter = create_adapter(Toy(), ["to_q"], rank=2)
    path = str(tmp_path / "meta.safetensors")
    save_kohya(adapter, path, KEYMAP, metadata={"ss_num_train_images": "5", "ss_training_comment": "a trainer"})
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "5" and meta["ss_training_comment"] == "a trainer"
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "toy"
    with pytest.raises(ValueError, match="ss_network_dim"):
        save_kohya(adapter, path, KEYMAP, metadata={"ss_network_dim": "64"})


def test_adapters_entry_path_multiplier_partial(tmp_path):
    down, up = random_weights()
    save_file({"lora_unet_block_to_q.lora_down.weight": down, "lora_unet_block_to_q.lora_up.weight": up,
               "lora_unet_gone.lora_down.weight": down.clone()}, str(tmp_path / "l.safetensors"))
    entry = structure(AdapterEntry, {"path": str(tmp_path / "l.safetensors"), "multiplier": 0.25, "partial": True},
                      "adapters[0]")
    model = Toy()
    with pytest.warns(UserWarning, match="lora_unet_gone"):
        [(adapter, report)] = apply_adapters(model, [entry])
    assert report.unmatched == ("lora_unet_gone.lora_down.weight",)
    torch.testing.assert_close(run(model), expected_output({"block.to_q": (down, up, 0.25)}), rtol=1e-5, atol=1e-5)
    strict = structure(AdapterEntry, {"path": str(tmp_path / "l.safetensors")}, "adapters[0]")
    assert strict.multiplier == 1.0 and strict.partial is False
    with pytest.raises(ConfigError, match=r"adapters\[0\]\.path: .*lora_unet_gone"):
        apply_adapters(Toy(), [strict])
    with pytest.raises(ConfigError, match="does not support LoRA"):
        apply_adapters(nn.Linear(2, 2), [strict])
    with pytest.raises(ConfigError, match="adapters.0..path"):
        structure(AdapterEntry, {"path": str(tmp_path / "missing.safetensors")}, "adapters[0]")


def test_adapters_array_from_toml(tmp_path):
    import tomllib

    from t2i_engine.adapters.config import structure_adapters

    for name in ("a", "b"):
        down, up = random_weights(seed=ord(name))
        save_file({"lora_unet_block_to_q.lora_down.weight": down, "lora_unet_block_to_q.lora_up.weight": up},
                  str(tmp_path / f"{name}.safetensors"))
    data = tomllib.loads(f'[[adapters]]\npath = "{tmp_path}/a.safetensors"\nmultiplier = 0.5\n\n'
                         f'[[adapters]]\npath = "{tmp_path}/b.safetensors"\n')
    entries = structure_adapters(data["adapters"])
    assert [e.multiplier for e in entries] == [0.5, 1.0]
    model = Toy()
    apply_adapters(model, entries)
    (da, ua), (db, ub) = random_weights(seed=ord("a")), random_weights(seed=ord("b"))
    want = expected_output({"block.to_q": (torch.cat([da, db]), torch.cat([ua * 0.5, ub], dim=1), 1.0)})
    torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="array of tables"):
        structure_adapters({"path": "x"})
    with pytest.raises(ConfigError, match=r"adapters\[0\]\.multipler: unknown key"):
        structure_adapters([{"path": f"{tmp_path}/a.safetensors", "multipler": 2.0}])


def test_adapter_follows_a_model_cast_after_attaching():
    """The tasks cast a model's weights for *-true precisions after building it: an adapter
    attached before keeps its float32 layers and still applies (in the model's dtype)."""
    model = Toy()
    adapter = create_adapter(model, ["to_q", "proj", "attn.in_proj.v"], rank=2)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.normal_()
    want = run(model)
    model.to(torch.bfloat16)
    with torch.no_grad():
        got = model(X.to(torch.bfloat16)).float()
        adapter.enabled = False
        without = model(X.to(torch.bfloat16)).float()
    effect = float((want - without).abs().max())
    assert effect > 0.5 and float((got - want).abs().max()) < 0.05 * effect  # bf16 rounding only
