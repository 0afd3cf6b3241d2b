"""loss = instance + prior_loss_weight * prior, against a hand computation; what trains in LoRA and
full mode; the dataset's instance/class pairing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from t2i_engine.adapters import create_adapter
from t2i_engine.data.transforms import PairedTransform
from t2i_plugin_dreambooth.dataset import DreamBoothDataset
from t2i_plugin_dreambooth.folders import ImageEntry
from t2i_plugin_dreambooth.trainable import DreamBoothTrainable

from plugins.dreambooth.tests.conftest import seeded, write_image


class Quadratic(nn.Module):
    """A stand-in for a model's trainable wrapper: loss = mean((w * image + noise - c)^2), where c
    is the caption's length, noise drawn from the generator (so the order of draws matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.w = nn.Parameter(torch.tensor(0.7))

    def trainable_parameters(self):
        yield self.w

    def training_loss(self, batch, *, generator):
        noise = torch.randn(batch["image"].shape, generator=generator)
        target = torch.tensor([float(len(c)) for c in batch["caption"]]).view(-1, 1, 1, 1)
        return ((self.w * batch["image"] + noise - target) ** 2).mean()


def _batch():
    g = seeded(1)
    return {"image": torch.randn(2, 3, 4, 4, generator=g), "caption": ["a sks", "a red sks"],
            "class_image": torch.randn(2, 3, 4, 4, generator=g), "class_caption": ["a dog", "a dog!"]}


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0, 2.5])
def test_loss_is_instance_plus_weighted_prior_by_hand(weight):
    batch = _batch()
    model = DreamBoothTrainable(Quadratic(), prior_loss_weight=weight)
    got = model.training_loss(batch, generator=seeded(3))
    g = seeded(3)  # by hand: the instance half draws its noise first, then the class half
    n1 = torch.randn(batch["image"].shape, generator=g)
    n2 = torch.randn(batch["class_image"].shape, generator=g)
    t1 = torch.tensor([5.0, 9.0]).view(-1, 1, 1, 1)
    t2 = torch.tensor([5.0, 6.0]).view(-1, 1, 1, 1)
    inst = ((0.7 * batch["image"] + n1 - t1) ** 2).sum() / batch["image"].numel()
    prior = ((0.7 * batch["class_image"] + n2 - t2) ** 2).sum() / batch["class_image"].numel()
    torch.testing.assert_close(got, inst + weight * prior, rtol=1e-6, atol=1e-6)


def test_without_class_images_the_loss_is_the_instance_loss():
    batch = {k: v for k, v in _batch().items() if not k.startswith("class_")}
    model = DreamBoothTrainable(Quadratic(), prior_loss_weight=1.0)
    torch.testing.assert_close(model.training_loss(batch, generator=seeded(3)),
                               model.inner.training_loss(batch, generator=seeded(3)))


def test_full_trains_the_models_own_parameters_and_lora_only_the_adapter():
    full = DreamBoothTrainable(Quadratic())
    assert list(full.trainable_parameters()) == [full.inner.w]
    inner = Quadratic()
    adapter = create_adapter(inner, ["lin"], rank=1)
    lora = DreamBoothTrainable(inner, adapter=adapter)
    params = list(lora.trainable_parameters())
    assert {id(p) for p in params} == {id(p) for p in adapter.parameters()} and len(params) == 2
    assert not any(p.requires_grad for p in inner.parameters()) and all(p.requires_grad for p in params)
    assert list(lora.trainable_parameters()) == params  # asked twice (optimizer, EMA): the same list


def test_sample_grids_only_when_the_model_can_sample():
    from t2i_engine.training.protocol import sample_method

    assert sample_method(DreamBoothTrainable(Quadratic())) is None  # the loop skips its grids

    class Sampling(Quadratic):
        def sample_images(self, prompts, *, generator):
            return torch.zeros(len(prompts), 3, 4, 4)

    fn = sample_method(DreamBoothTrainable(Sampling()))
    assert fn is not None and fn(["a", "b"], generator=None).shape == (2, 3, 4, 4)


def test_dataset_pairs_instance_and_class_images_cyclically(tmp_path):
    inst = [ImageEntry(str(write_image(tmp_path / f"i{k}.png", fg=c)), f"a {c} sks", r)
            for k, (c, r) in enumerate([("red", 2), ("green", 1)])]
    cls = [ImageEntry(str(write_image(tmp_path / f"c{k}.png", shape="circle")), f"circle {k}") for k in range(5)]
    ds = DreamBoothDataset(inst, cls, transform=PairedTransform(resolution=16))
    assert len(ds) == 5  # max(3 instance entries with repeats, 5 class images)
    assert [ds[i]["caption"] for i in range(5)] == ["a red sks", "a red sks", "a green sks", "a red sks", "a red sks"]
    assert [ds[i]["class_caption"] for i in range(5)] == [f"circle {k}" for k in range(5)]
    alone = DreamBoothDataset(inst, None, transform=PairedTransform(resolution=8))
    assert len(alone) == 3 and set(alone[0]) == {"image", "caption"} and alone[0]["image"].shape == (3, 8, 8)
