"""Image folders with corrupt files, WebDataset shards from memory://, precache round trip."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from t2i_engine.data.imagefolder import ImageFolderDataset
from t2i_engine.data.precache import PrecachedDataset, precache
from t2i_engine.data.registry import DATASETS
from t2i_engine.data.shapes import ShapesDataset
from t2i_engine.data.webdataset import WebDatasetShards
from t2i_engine.errors import DataError
from t2i_engine.interfaces import TextEmbedding
from t2i_engine.training.batches import batch_stream


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n: int, corrupt: set[int], *, metadata: bool) -> None:
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        data = _png(10 * i) if i not in corrupt else _png(10 * i)[:30]  # truncated PNG
        (root / f"{i:03d}.png").write_bytes(data)
        if metadata:
            rows.append({"file_name": f"{i:03d}.png", "text": f"caption {i}"})
        else:
            (root / f"{i:03d}.txt").write_text(f"caption {i}\n")
    if metadata:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("metadata", [True, False])
def test_imagefolder_skips_and_counts_corrupt_images(tmp_path, metadata):
    _folder(tmp_path / "imgs", 10, {3, 7}, metadata=metadata)
    ds = ImageFolderDataset(ImageFolderDataset.Config(root=str(tmp_path / "imgs"), resolution=8))
    ds.bad_samples.max_fraction = 0.5
    samples = [ds[i] for i in range(10)]
    assert ds.bad_samples.bad == 2
    assert samples[2]["caption"] == "caption 2" and samples[3]["caption"] == "caption 4"  # 3 skipped
    expect = torch.full((3, 8, 8), 20 / 127.5 - 1)
    torch.testing.assert_close(samples[2]["image"], expect)
    assert "003.png" in ds.bad_samples.first_bad[0]


def test_imagefolder_too_many_corrupt_is_a_data_error_naming_them(tmp_path):
    _folder(tmp_path / "imgs", 10, {1, 2, 5}, metadata=False)
    ds = ImageFolderDataset(ImageFolderDataset.Config(root=str(tmp_path / "imgs"), resolution=8))
    ds.bad_samples.max_fraction = 0.1
    with pytest.raises(DataError, match=r"001\.png.*002\.png.*005\.png"):
        for i in range(10):
            ds[i]


def test_imagefolder_paired_columns_on_memory_fs():
    fs = fsspec.filesystem("memory")
    fs.pipe("/folder-pair/a.png", _png(200, 12))
    fs.pipe("/folder-pair/a_hint.png", _png(50, 12))
    fs.pipe("/folder-pair/metadata.jsonl", json.dumps(
        {"file_name": "a.png", "text": "a cat", "hint": "a_hint.png"}).encode() + b"\n")
    ds = ImageFolderDataset(ImageFolderDataset.Config(root="memory://folder-pair", resolution=8,
                                                      crop="random", hflip=True, paired_columns=["hint"]))
    s = ds[0]
    assert s["caption"] == "a cat" and s["image"].shape == s["hint"].shape == (3, 8, 8)
    torch.testing.assert_close(s["hint"], torch.full((3, 8, 8), 50 / 127.5 - 1))


def _write_shards(prefix: str, shards: int, per_shard: int, corrupt: frozenset = frozenset()) -> None:
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for k in range(per_shard):
                idx = s * per_shard + k
                png = _png(idx) if idx not in corrupt else b"not a png"
                for ext, data in (("png", png), ("txt", f"sample {idx}".encode())):
                    info = tarfile.TarInfo(f"{idx:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fsspec.filesystem("memory").pipe(f"{prefix}/shard-{s:03d}.tar", buf.getvalue())


def _cfg(**kw):
    return WebDatasetShards.Config(**{"urls": ["memory://wds/shard-{000..003}.tar"], "resolution": 8, **kw})


def test_webdataset_from_memory_reads_every_sample_once_per_epoch():
    _write_shards("/wds", 4, 5)
    ds = WebDatasetShards(_cfg())
    caps = [s["caption"] for s in ds]
    assert sorted(caps) == sorted(f"sample {i}" for i in range(20))
    ds.set_epoch(1)
    caps1 = [s["caption"] for s in ds]
    assert sorted(caps1) == sorted(caps) and caps1 != caps  # shards reshuffled per epoch
    s = next(iter(ds))
    idx = int(s["caption"].split()[1])
    torch.testing.assert_close(s["image"], torch.full((3, 8, 8), idx / 127.5 - 1))


def test_webdataset_splits_by_rank_and_worker_without_overlap():
    ds = WebDatasetShards(_cfg())
    parts = [list(ds.shards_for(r, 2, w, 2)) for r in range(2) for w in range(2)]
    assert sorted(u for p in parts for u in p) == sorted(ds.shards)
    assert all(len(p) == 1 for p in parts)


def test_webdataset_with_dataloader_workers_and_batches():
    _write_shards("/wds", 4, 5)
    stream = batch_stream(WebDatasetShards(_cfg()), batch_size=5, rank=0, world_size=1, seed=0,
                          start_batch=0, num_workers=2)
    batches = [next(stream) for _ in range(4)]
    caps = [c for b in batches for c in b["caption"]]
    assert sorted(caps) == sorted(f"sample {i}" for i in range(20))
    assert batches[0]["image"].shape == (5, 3, 8, 8)


def test_webdataset_resample_is_endless_and_corrupt_samples_are_skipped():
    _write_shards("/wds-bad", 2, 5, corrupt=frozenset({3}))
    ds = WebDatasetShards(_cfg(urls=["memory://wds-bad/shard-{000..001}.tar"], resample=True))
    ds.bad_samples.max_fraction = 0.5
    it = iter(ds)
    caps = [next(it)["caption"] for _ in range(30)]
    assert len(caps) == 30 and "sample 3" not in caps and ds.bad_samples.bad >= 1


class _Encoders:
    """Independent toy encoders: latents = 2x2 average pool * 0.5, tokens from caption length."""

    def images(self, x):
        return torch.nn.functional.avg_pool2d(x, 2) * 0.5  # (B, 3, H/2, W/2)

    def text(self, prompts):
        tok = torch.stack([torch.full((4, 6), float(len(p))) for p in prompts])  # (B, 4, 6)
        return TextEmbedding(tok, torch.ones(len(prompts), 4, dtype=torch.bool), tok[:, 0])


@pytest.mark.parametrize("url", ["memory://precache-test", "local"])
def test_precache_round_trip(tmp_path, url):
    url = str(tmp_path / "cache") if url == "local" else url
    shapes = ShapesDataset(ShapesDataset.Config(size=8, count=11, seed=0))
    enc = _Encoders()
    index = precache(shapes, encode_images=enc.images, encode_text=enc.text, out_url=url,
                     shard_size=4, batch_size=3)
    assert [s["count"] for s in index["shards"]] == [4, 4, 3]
    ds = DATASETS["precached"](PrecachedDataset.Config(url=url))
    assert len(ds) == 11
    for i in (0, 5, 10):
        s, ref = ds[i], shapes[i]
        torch.testing.assert_close(s["latents"], enc.images(ref["image"][None])[0])
        assert s["caption"] == ref["caption"]
        assert torch.equal(s["text_tokens"], torch.full((4, 6), float(len(ref["caption"]))))
        assert s["text_mask"].dtype == torch.bool and s["text_pooled"].shape == (6,)


def test_registry_factories_take_their_config():
    for name, factory in DATASETS.items():
        assert hasattr(factory, "Config"), name
    ds = DATASETS["shapes"](DATASETS["shapes"].Config(count=3, size=8))
    assert len(ds) == 3
