"""Paired datasets: the hint gets the image's own crop and flip (fill50k's prompt.json folders and
WebDataset shards with a hint key), and the shapes hints are the shape where it was drawn."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i_engine.data.shapes import ShapesDataset, shape_mask
from t2i_engine.data.webdataset import WebDatasetConfig, WebDatasetShards
from t2i_engine.errors import DataError
from t2i_plugin_controlnet.data import PromptJsonConfig, PromptJsonPairs, ShapeHints, hint_mask, outline


def _png(g: torch.Generator, h: int, w: int) -> bytes:
    px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def _same_picture_pairs(root: Path, n: int) -> Path:
    """A prompt.json folder whose hint is the target image itself: after a shared crop and flip
    they stay equal, after different ones they differ."""
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        data = _png(g, 40, 56)  # not square: the crop has room in both directions after resizing
        (root / "source" / f"{i}.png").write_bytes(data)
        (root / "target" / f"{i}.png").write_bytes(data)
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"p{i}"}))
    (root / "prompt.json").write_text("\n".join(lines))
    return root


def test_prompt_json_pairs_share_their_crop_and_flip(tmp_path):
    root = _same_picture_pairs(tmp_path / "fill", 12)
    ds = PromptJsonPairs(PromptJsonConfig(root=str(root), resolution=24, crop="random", hflip=True))
    center = PromptJsonPairs(PromptJsonConfig(root=str(root), resolution=24))
    unflipped = PromptJsonPairs(PromptJsonConfig(root=str(root), resolution=24, crop="random"))  # same crops
    flipped = cropped = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 24, 24) and s["caption"] == f"p{i}"
        assert torch.equal(s["image"], s["hint"])
        u = unflipped[i]["image"]
        assert torch.equal(s["image"], u) or torch.equal(s["image"], u.flip(-1))
        flipped += not torch.equal(s["image"], u)
        cropped += not torch.equal(u, center[i]["image"])
    assert flipped and cropped  # the random crop and flip did act


def test_prompt_json_source_is_the_hint_and_target_the_image(tmp_path):
    root = tmp_path / "fill"
    root.mkdir()
    g = torch.Generator().manual_seed(1)
    (root / "s.png").write_bytes(_png(g, 16, 16))
    (root / "t.png").write_bytes(_png(g, 16, 16))
    (root / "prompt.json").write_text(json.dumps({"source": "s.png", "target": "t.png", "prompt": "x"}) + "\n")
    s = PromptJsonPairs(PromptJsonConfig(root=str(root), resolution=16))[0]
    as_tensor = lambda p: torch.from_numpy(__import__("numpy").array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(s["hint"], as_tensor(root / "s.png"), atol=1e-6)
    assert torch.allclose(s["image"], as_tensor(root / "t.png"), atol=1e-6)


def test_prompt_json_errors_name_the_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "prompt.json").write_text('{"source": "a.png", "target": "b.png", "prompt": "x"}\n{"source": "a.png"}\n')
    with pytest.raises(DataError, match=r"prompt.json:2: missing 'target', 'prompt'"):
        PromptJsonPairs(PromptJsonConfig(root=str(root)))
    with pytest.raises(DataError, match="no prompt.json"):
        PromptJsonPairs(PromptJsonConfig(root=str(tmp_path)))


def test_webdataset_hints_share_their_crop_and_flip(tmp_path):
    g = torch.Generator().manual_seed(2)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            data = _png(g, 40, 56)
            for name, payload in ((f"{i:03d}.jpg", data), (f"{i:03d}.hint.png", data), (f"{i:03d}.txt", b"a cat")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = WebDatasetShards(WebDatasetConfig(urls=[str(shard)], image_keys=["jpg"], paired_keys=["hint.png"],
                                           resolution=24, crop="random", hflip=True))
    samples = list(ds)
    assert len(samples) == 8
    assert all(torch.equal(s["image"], s["hint.png"]) for s in samples)


def test_shape_hints_are_the_shape_where_it_was_drawn():
    ds = ShapeHints(size=64, count=30, seed=4)
    plain = ShapesDataset(size=64, count=30, seed=4)
    for i in range(len(ds)):
        s = ds[i]
        assert torch.equal(s["image"], plain[i]["image"]) and s["caption"] == plain[i]["caption"]
        mask = shape_mask(ds.shapes[s["shape_label"]], size=64, cx=s["cx"], cy=s["cy"], radius=s["radius"])
        assert s["hint"].shape == (3, 64, 64) and torch.equal(hint_mask(s["hint"]), mask)
        assert set(s["hint"].unique().tolist()) <= {-1.0, 1.0}


def test_start_index_takes_the_splits_later_samples():
    kw = dict(size=32, seed=0, split="train", heldout_fraction=0.15)
    late = ShapeHints(count=5, start_index=40, **kw)
    whole = ShapeHints(count=45, **kw)
    assert len(late) == 5
    for i in range(5):
        a, b = late[i], whole[40 + i]
        assert a["index"] == b["index"] == 40 + i and a["caption"] == b["caption"]
        assert torch.equal(a["hint"], b["hint"]) and torch.equal(a["image"], b["image"])
    assert not torch.equal(late[0]["hint"], whole[0]["hint"])  # not the first samples again
    with pytest.raises(IndexError):
        late[5]


def test_outline_hints_are_the_border_of_the_mask():
    ds = ShapeHints(size=64, count=10, seed=4, hint="outline", outline_width=2)
    for i in range(len(ds)):
        s = ds[i]
        mask = shape_mask(ds.shapes[s["shape_label"]], size=64, cx=s["cx"], cy=s["cy"], radius=s["radius"])
        ring = hint_mask(s["hint"])
        assert ring.any() and not (ring & ~mask).any() and (mask & ~ring).any()
    square = torch.zeros(10, 10, dtype=torch.bool)
    square[2:8, 2:8] = True
    ring = outline(square, width=1)
    inner = torch.zeros_like(square)
    inner[3:7, 3:7] = True
    assert torch.equal(ring, square & ~inner)


def test_prompt_json_column_names_are_keys(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    g = torch.Generator().manual_seed(3)
    (root / "a.png").write_bytes(_png(g, 16, 16))
    (root / "b.png").write_bytes(_png(g, 16, 16))
    (root / "pairs.jsonl").write_text(json.dumps({"cond": "a.png", "img": "b.png", "text": "t"}) + "\n")
    cfg = PromptJsonConfig(root=str(root), resolution=16, prompt_file="pairs.jsonl", source_key="cond",
                           target_key="img", prompt_key="text")
    s = PromptJsonPairs(cfg)[0]
    swapped = PromptJsonPairs(PromptJsonConfig(root=str(root), resolution=16, prompt_file="pairs.jsonl",
                                               source_key="img", target_key="cond", prompt_key="text"))[0]
    assert s["caption"] == "t" and torch.equal(s["hint"], swapped["image"]) and torch.equal(s["image"], swapped["hint"])
