"""The class-image cache: only the missing images are sampled, a re-run reuses them, and the names
are hashes of everything that decides the pixels."""

from __future__ import annotations

import attrs
import pytest
import torch
from PIL import Image

from t2i_plugin_dreambooth.prior import ClassImageSpec, class_image_names, ensure_class_images, model_fingerprint

SPEC = ClassImageSpec(model="m0", sampler={"name": "ddim", "options": {"steps": 2}}, guidance={"scale": 2.0},
                      precision="32-true", size=8, prompts=("a circle", "a square"), seed=5)


class Recorder:
    """A stand-in sampler: records what it is asked for, returns flat images (colour from the seed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def __call__(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return torch.stack([torch.full((3, 8, 8), (s % 7) / 7 * 2 - 1) for s in seeds])

    @property
    def made(self) -> int:
        return sum(len(p) for p, _ in self.calls)


def test_only_the_missing_count_is_sampled_and_a_rerun_reuses_all(tmp_path):
    rec = Recorder()
    entries, made = ensure_class_images(tmp_path, SPEC, 5, generate=rec, batch_size=2)
    assert made == 5 == rec.made and [len(p) for p, _ in rec.calls] == [2, 2, 1]
    assert [e.caption for e in entries] == ["a circle", "a square", "a circle", "a square", "a circle"]
    assert rec.calls[0] == (["a circle", "a square"], [5, 6])  # image i: prompt i mod n, seed + i
    again = Recorder()
    entries2, made2 = ensure_class_images(tmp_path, SPEC, 5, generate=again, batch_size=2)
    assert made2 == 0 and again.calls == [] and entries2 == entries
    more = Recorder()
    _, made3 = ensure_class_images(tmp_path, SPEC, 7, generate=more, batch_size=4)  # 2 more wanted
    assert made3 == 2 and more.calls == [(["a square", "a circle"], [10, 11])]  # indices 5, 6


def test_a_deleted_image_is_sampled_again_alone(tmp_path):
    entries, _ = ensure_class_images(tmp_path, SPEC, 4, generate=Recorder(), batch_size=4)
    (tmp_path / entries[2].path.rsplit("/", 1)[-1]).unlink()
    rec = Recorder()
    _, made = ensure_class_images(tmp_path, SPEC, 4, generate=rec, batch_size=4)
    assert made == 1 and rec.calls == [(["a circle"], [7])]


def test_files_are_pngs_with_captions_named_by_hash(tmp_path):
    entries, _ = ensure_class_images(tmp_path, SPEC, 3, generate=Recorder(), batch_size=3)
    for i, e in enumerate(entries):
        name = e.path.rsplit("/", 1)[-1]
        assert name == SPEC.name(i) + ".png" and len(name) == len("class-") + 24 + 4
        with Image.open(e.path) as img:
            assert img.size == (8, 8) and img.text["prompt"] == SPEC.prompt(i)
        assert (tmp_path / name).with_suffix(".txt").read_text().strip() == SPEC.prompt(i)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("change", [
    {"model": "m1"}, {"sampler": {"name": "ddim", "options": {"steps": 3}}}, {"sampler": {"name": "euler", "options": {"steps": 2}}},
    {"guidance": {"scale": 3.0}}, {"precision": "bf16-mixed"}, {"size": 16}, {"prompts": ("a dog", "a square")},
    {"seed": 6},
])
def test_every_setting_changes_the_names(change):
    other = attrs.evolve(SPEC, **change)
    assert set(class_image_names(other, 4)).isdisjoint(class_image_names(SPEC, 4)) or "prompts" in change
    if "prompts" in change:  # the second prompt is unchanged: only images of the first move
        assert other.name(0) != SPEC.name(0) and other.name(1) == SPEC.name(1)
    assert len(set(class_image_names(SPEC, 6))) == 6  # and every index has its own


def test_model_fingerprint_follows_weights_and_tables():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    base = model_fingerprint(net, tables={"model": {"preset": "tiny"}})
    assert model_fingerprint(net, tables={"model": {"preset": "tiny"}}) == base  # deterministic
    assert model_fingerprint(net, tables={"model": {"preset": "tiny-v"}}) != base
    with torch.no_grad():
        net[1].bias[0] += 1e-6
    assert model_fingerprint(net, tables={"model": {"preset": "tiny"}}) != base
    assert model_fingerprint(net.to(torch.float16), tables={"model": {"preset": "tiny"}}) != base
