"""Edit-triplet datasets: the reference's seeds.json layout and WebDataset input/edit/output
columns, with source and target cut by the same crop and flip (shown with a target that is the
pixelwise negative of its source: every linear resize, crop and flip keeps it so)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_engine.data.common import sample_generator
from t2i_engine.errors import DataError
from t2i_plugin_instructpix2pix.datasets import EditFolderConfig, EditFolderDataset, EditWebDataset, EditWebDatasetConfig


def _pair(seed: int, size: tuple[int, int] = (20, 24)) -> tuple[Image.Image, Image.Image]:
    g = np.random.default_rng(seed)
    a = g.integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(a), Image.fromarray(255 - a)


def _folder(root: Path, n_prompts: int = 10, seeds: tuple[int, ...] = (11, 12)) -> Path:
    listing = []
    for p in range(n_prompts):
        d = root / f"{p:07d}"
        d.mkdir(parents=True)
        (d / "prompt.json").write_text(json.dumps({"caption": "a photo", "edit": f"edit {p}", "output": "b"}))
        for s in seeds:
            src, dst = _pair(p * 100 + s)
            src.save(d / f"{s}_0.png")
            dst.save(d / f"{s}_1.png")
        listing.append([f"{p:07d}", list(seeds)])
    (root / "seeds.json").write_text(json.dumps(listing))
    return root


def _check_paired(sample) -> None:
    assert sample["source"].shape == (3, 16, 16) == sample["image"].shape
    assert torch.allclose(sample["image"], -sample["source"], atol=1e-5)


def test_seeds_json_layout(tmp_path):
    root = _folder(tmp_path / "data")
    data = EditFolderDataset(EditFolderConfig(root=str(root), extension="png", resolution=16, crop="random",
                                              hflip=True, split="train"))
    assert len(data) == 9 * 2  # the first floor(0.9 * 10) prompt folders, every seed
    for i in range(len(data)):
        s = data[i]
        _check_paired(s)
        assert s["caption"] == f"edit {int(s['key'].split('/')[0])}"
    test = EditFolderDataset(EditFolderConfig(root=str(root), extension="png", resolution=16, split="test"))
    assert {s.split("/")[0] for s in ("/".join(i) for i in test.items)} == {"0000009"}  # floor(.95*10) to 10
    assert len(EditFolderDataset(EditFolderConfig(root=str(root), extension="png", resolution=16, split="all"))) == 20


def test_crop_and_flip_vary_but_stay_paired(tmp_path):
    root = _folder(tmp_path / "data", n_prompts=2, seeds=tuple(range(10)))
    data = EditFolderDataset(EditFolderConfig(root=str(root), extension="png", resolution=16, crop="random",
                                              hflip=True, split="all"))
    params = set()
    for i in range(len(data)):
        s = data[i]
        _check_paired(s)
        p = data.transform.sample_params(20, 24, generator=sample_generator(0, s["key"]))
        params.add((p.top, p.left, p.flip))
    assert len({p[2] for p in params}) == 2 and len(params) > 3  # flipped and not, several crops


def test_folder_errors_name_the_file(tmp_path):
    root = _folder(tmp_path / "data", n_prompts=2)
    (root / "0000000" / "prompt.json").write_text(json.dumps({"caption": "x"}))
    data = EditFolderDataset(EditFolderConfig(root=str(root), extension="png", resolution=16, split="all"))
    with pytest.raises(DataError, match="0000000/prompt.json: no 'edit'"):
        data[0]
    (root / "seeds.json").unlink()
    with pytest.raises(DataError, match="no seeds.json"):
        EditFolderDataset(EditFolderConfig(root=str(root), split="all"))


def test_a_missing_image_is_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "data", n_prompts=2)
    (root / "0000000" / "11_1.png").unlink()
    data = EditFolderDataset(EditFolderConfig(root=str(root), extension="png", resolution=16, split="all"))
    assert data[0]["key"] == "0000000/12"
    assert data.bad_samples.bad == 1


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_columns(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            src, dst = _pair(i)
            for name, data in ((f"{i:04d}.input.png", _png(src)), (f"{i:04d}.output.png", _png(dst)),
                               (f"{i:04d}.edit.txt", f"make it {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = EditWebDataset(EditWebDatasetConfig(urls=[str(shard)], resolution=16, crop="random", hflip=True))
    samples = list(data)
    assert len(samples) == 6
    for s in samples:
        _check_paired(s)
        assert s["caption"] == f"make it {int(s['key'].rsplit('#', 1)[1])}"
    missing = EditWebDataset(EditWebDatasetConfig(urls=[str(shard)], resolution=16, output_keys=["edited.png"]))
    assert list(missing) == [] and missing.bad_samples.bad == 6
