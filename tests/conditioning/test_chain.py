"""The conditioner chain against closed-form toys: scale, branch selection, step window (the rule
read from diffusers' own ControlNet pipeline), declared order, and scale 0 exactly."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from t2i_engine.conditioning import in_window
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import Conditioning

from .toys import ExtraOffset, ResidualOffset, SumNet, chain, conditioned

X = torch.zeros(4, 2, 3, 3)  # guidance's batch: 2 unconditional rows, then 2 conditional ones
T = torch.zeros(4)


def _run(ch, net=None):  # noqa: ANN001, ANN202
    net = net or SumNet()
    cond, uncond = conditioned(ch)
    return ch.compose(net)(X, T, Conditioning.cat([uncond, cond])), net


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_residuals_are_multiplied_by_the_scale(scale: float) -> None:
    out, _ = _run(chain((ResidualOffset(3.0), {"scale": scale})))
    assert torch.equal(out, torch.full_like(X, 3.0 * scale))


def test_scale_zero_is_exactly_the_unconditioned_net_and_calls_nothing() -> None:
    res, extra = ResidualOffset(3.0), ExtraOffset(5.0)
    out, net = _run(chain((res, {"scale": 0.0}), (extra, {"scale": 0.0})))
    assert torch.equal(out, torch.zeros_like(X))
    assert res.calls == 0 and extra.seen == []
    assert net.calls == [{"rows": 4, "keys": [], "mid": False}]


def test_condition_only_extras_are_scaled() -> None:
    out, _ = _run(chain((ExtraOffset(5.0), {"scale": 0.5})))
    assert torch.equal(out, torch.full_like(X, 2.5))


@pytest.mark.parametrize(("branch", "uncond_value", "cond_value"), [("both", 3.0, 3.0), ("cond", 0.0, 3.0),
                                                                    ("uncond", 3.0, 0.0)])
def test_residuals_apply_to_the_chosen_guidance_branch(branch: str, uncond_value: float, cond_value: float) -> None:
    out, net = _run(chain((ResidualOffset(3.0), {"branch": branch})))
    assert torch.equal(out[:2], torch.full_like(X[:2], uncond_value))
    assert torch.equal(out[2:], torch.full_like(X[2:], cond_value))
    assert len(net.calls) == 1  # residuals are masked per row: one forward serves both branches


@pytest.mark.parametrize("branch,rows", [("cond", 2), ("uncond", 2), ("both", 4)])
def test_residuals_are_computed_only_on_the_rows_of_their_branch(branch: str, rows: int) -> None:
    """Guess mode runs the ControlNet on the conditional half only, as diffusers does: the other
    half costs nothing and gets exact zeros."""
    toy = ResidualOffset(3.0)
    _run(chain((toy, {"branch": branch})))
    assert toy.rows == [rows]


def test_condition_only_entry_on_one_branch_leaves_the_other_branch_exactly_unconditioned() -> None:
    out, net = _run(chain((ExtraOffset(5.0), {"branch": "cond"})))
    assert torch.equal(out[2:], torch.full_like(X[2:], 5.0))
    assert torch.equal(out[:2], torch.zeros_like(X[:2]))
    assert sorted((c["rows"], tuple(c["keys"])) for c in net.calls) == [(2, ()), (2, ("offset",))]


def test_several_conditioners_apply_in_declared_order_and_residuals_sum() -> None:
    # the second reads what the first added: only the declared order makes "doubled" exist
    first, second = ExtraOffset(1.0, key="base"), ExtraOffset(2.0, key="offset", source="base")
    out, _ = _run(chain((first, {}), (second, {}), (ResidualOffset(3.0), {}), (ResidualOffset(4.0), {"scale": 0.5})))
    assert torch.equal(out, torch.full_like(X, 2.0 + 3.0 + 2.0))
    with pytest.raises(KeyError):
        _run(chain((second, {}), (first, {})))


def test_condition_receives_typed_inputs_per_branch() -> None:
    extra = ExtraOffset()
    conditioned(chain((extra, {})), b=3)
    assert [i.branch for i in extra.seen] == ["cond", "uncond"]
    assert [i.prompts for i in extra.seen] == [["p"] * 3, [""] * 3]
    assert (extra.seen[0].height, extra.seen[0].width, extra.seen[0].batch_size) == (8, 8, 3)
    assert extra.seen[0].dtype == torch.float32 and extra.seen[0].batch is None


def test_a_conditioner_may_not_change_what_is_already_there() -> None:
    class Overwrite:
        def condition(self, cond: Conditioning, inputs: object) -> Conditioning:
            return cond.with_extras(offset=torch.zeros(1))

    with pytest.raises(ConfigError, match=r"toy\[1\]: condition\(\) changed the extras key 'offset'"):
        conditioned(chain((ExtraOffset(), {}), (Overwrite(), {})))


def _diffusers_keep(i: int, n: int, s: float, e: float) -> bool:
    """The keep rule as diffusers' StableDiffusionControlNetPipeline writes it, read from its source."""
    from diffusers import StableDiffusionControlNetPipeline

    src = inspect.getsource(StableDiffusionControlNetPipeline.__call__)
    expr = re.search(r"1\.0 - float\((.*)\)\n", src).group(1)  # type: ignore[union-attr]
    return not eval(expr, {"i": i, "timesteps": range(n), "s": s, "e": e})  # noqa: S307 - diffusers' own text


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.2, 0.7), (0.0, 0.5), (0.5, 1.0), (0.33, 0.34)])
@pytest.mark.parametrize("n", [1, 4, 7, 10])
def test_window_rule_is_diffusers_control_guidance_start_end(n: int, start: float, end: float) -> None:
    assert [in_window(i, n, start=start, end=end) for i in range(n)] == \
        [_diffusers_keep(i, n, start, end) for i in range(n)]


def test_the_composed_net_follows_the_window_step_by_step() -> None:
    ch = chain((ResidualOffset(1.0), {"start": 0.2, "end": 0.7}))
    cond, uncond = conditioned(ch)
    net = ch.compose(SumNet())
    both = Conditioning.cat([uncond, cond])
    tick = ch.clocked(None, total=10)
    seen = []
    for _ in range(10):
        seen.append(bool(net(X, T, both).abs().sum() > 0))
        tick({})
    assert seen == [in_window(i, 10, start=0.2, end=0.7) for i in range(10)]
    ch.clock.stop()
    assert bool(net(X, T, both).abs().sum() > 0)  # no run in progress (training): always open


def test_inputs_named_in_the_job_reach_condition_as_images_and_tensors(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image
    from safetensors.torch import save_file

    Image.new("RGB", (4, 2), (255, 0, 0)).save(tmp_path / "hint.png")
    save_file({"only": torch.arange(6.0).view(1, 6)}, str(tmp_path / "vec.safetensors"))
    extra = ExtraOffset()
    conditioned(chain((extra, {"inputs": {"hint": str(tmp_path / "hint.png"),
                                          "vec": str(tmp_path / "vec.safetensors")}})), b=3)
    images = extra.seen[0].images
    assert images["hint"].shape == (3, 3, 8, 8)  # resized to the generation's size, one per image
    assert torch.equal(images["hint"][:, 0], torch.ones(3, 8, 8)) and torch.equal(images["hint"][:, 1], -torch.ones(3, 8, 8))
    assert torch.equal(images["vec"], torch.arange(6.0).view(1, 6).expand(3, 6))
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match=r"conditioners\[0\]\.inputs\.two: .* holds 2 tensors"):
        conditioned(chain((ExtraOffset(), {"inputs": {"two": str(tmp_path / "two.safetensors")}})))


def test_set_images_gives_every_sample_its_own_input_and_replaces_the_file(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "hint.png")
    extra = ExtraOffset()
    ch = chain((ExtraOffset(key="first"), {}), (extra, {"inputs": {"hint": str(tmp_path / "hint.png")}}))
    ch.entries[1].label = "net"
    per_sample = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 8, 8)
    ch.set_images("net", "hint", per_sample)  # by label; replaces the file
    ch.set_images(1, "extra", per_sample[:1])  # by index; a new input, one for every sample
    conditioned(ch, b=3)
    for seen in extra.seen:  # both guidance branches
        assert torch.equal(seen.images["hint"], per_sample)
        assert torch.equal(seen.images["extra"], per_sample[:1].expand(3, -1, -1, -1))
    ch.set_images(1, "hint", None)  # removed: the file again
    extra.seen.clear()
    conditioned(ch, b=3)
    assert torch.equal(extra.seen[0].images["hint"], torch.ones(3, 3, 8, 8)) and "extra" in extra.seen[0].images
    ch.clear_inputs()
    extra.seen.clear()
    conditioned(ch, b=3)
    assert set(extra.seen[0].images) == {"hint"}


def test_set_images_is_checked_for_count_size_and_entry() -> None:
    ch = chain((ExtraOffset(), {}))
    ch.set_images(0, "hint", torch.zeros(3, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"toy\[0\]: inputs.hint was given 3 images of \(8, 8\) .* batch of 2"):
        conditioned(ch, b=2)
    ch.set_images(0, "hint", torch.zeros(2, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"\(16, 16\) pixels .* at \(8, 8\)"):
        conditioned(ch, b=2)
    with pytest.raises(ValueError, match="no entry 1"):
        ch.set_images(1, "hint", torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="0 entries are labelled 'other'"):
        ch.set_images("other", "hint", torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) tensor, got a 3-d"):
        ch.set_images(0, "hint", torch.zeros(3, 8, 8))
