"""Corrupt samples are counted once each, the same with any number of DataLoader workers, and
the training summary and TensorBoard name them."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_engine.data.imagefolder import ImageFolderDataset
from t2i_engine.errors import DataError
from t2i_engine.training.batches import batch_stream


def _folder(root: Path, n: int, corrupt: set[int]) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 3 * i, dtype=np.uint8)).save(buf, format="PNG")
        (root / f"{i:03d}.png").write_bytes(buf.getvalue() if i not in corrupt else b"not a png")
        (root / f"{i:03d}.txt").write_text(f"caption {i}")
    return root


def _dataset(root: Path, max_fraction: float) -> ImageFolderDataset:
    ds = ImageFolderDataset(ImageFolderDataset.Config(root=str(root), resolution=8))
    ds.bad_samples.max_fraction = max_fraction
    return ds


def test_adjacent_bad_files_are_counted_once_each(tmp_path: Path) -> None:
    """3 adjacent bad files in 40 (7.5 %): each bad index is served by its next good neighbour,
    yet the tally is 3 of 40, under a 10 % limit (counting every retry made it 6 of 46, 13 %)."""
    ds = _dataset(_folder(tmp_path / "imgs", 40, {10, 11, 12}), max_fraction=0.1)
    for _ in range(2):  # a second epoch reads every file again: still counted once
        captions = [ds[i]["caption"] for i in range(40)]
    assert captions[10:13] == ["caption 13"] * 3
    assert (ds.bad_samples.bad, ds.bad_samples.seen) == (3, 40)
    assert ds.bad_samples.first_bad_keys == [f"{tmp_path}/imgs/{i:03d}.png" for i in (10, 11, 12)]


def _consume(ds: ImageFolderDataset, workers: int, batches: int) -> None:
    stream = batch_stream(ds, batch_size=4, rank=0, world_size=1, seed=0, start_batch=0, num_workers=workers)
    for _ in itertools.islice(stream, batches):
        pass


@pytest.mark.parametrize("workers", [0, 2])
def test_counts_do_not_depend_on_workers(tmp_path: Path, workers: int) -> None:
    ds = _dataset(_folder(tmp_path / "imgs", 40, {3, 17, 18, 30}), max_fraction=0.2)
    _consume(ds, workers, batches=10)  # one epoch
    assert (ds.bad_samples.bad, ds.bad_samples.seen) == (4, 40)


def test_limit_trips_identically_with_0_and_2_workers(tmp_path: Path) -> None:
    """10 % corrupt against a 5 % limit: the same DataError (same counts, same first paths)
    whatever the worker count; before, each worker counted alone and 2 workers let it pass."""
    root = _folder(tmp_path / "imgs", 40, {2, 9, 21, 33})
    messages = []
    for workers in (0, 2):
        with pytest.raises(DataError) as info:
            _consume(_dataset(root, max_fraction=0.05), workers, batches=30)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "max_bad_sample_fraction 5.0%" in messages[0] and "002.png" in messages[0]


@pytest.mark.slow
def test_fit_summary_and_tensorboard_name_skipped_samples(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.loop import fit
    from tests.training.tiny_denoiser import TinyDenoiser

    ds = _dataset(_folder(tmp_path / "imgs", 32, {5, 6}), max_fraction=0.5)
    cfg = TrainConfig(accelerator="cpu", progress_bar=False, batch_size=4, max_steps=8, checkpoint_every=0,
                      ema=False, log_every=1, max_bad_sample_fraction=0.1)
    summary = fit(TinyDenoiser(), ds, cfg, output_dir=tmp_path / "out", seed=0)
    assert summary["skipped_samples"] == 2
    assert sorted(summary["first_skipped"]) == [f"{tmp_path}/imgs/005.png", f"{tmp_path}/imgs/006.png"]
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/skipped_samples")][-1] == 2.0
    text = events.Tensors("data/skipped_samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "2 corrupt samples skipped" in text and "005.png" in text
