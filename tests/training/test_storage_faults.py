"""Filesystem faults: a full disk, a read-only folder, a folder where a file belongs. Each is one
error (StorageError / ConfigError, or one line from the CLI), temporaries are removed, and a
failed checkpoint leaves no step folder: the last good one stays ``latest`` and loadable.

The full-disk tests fill a real small filesystem (a 1 MiB tmpfs mounted for the test; they are
skipped where mounting is not allowed, i.e. not root); the first test simulates ENOSPC by
patching the write so that it runs everywhere."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import torch

from t2i_engine.checkpoint.io import atomic_write_bytes, read_bytes
from t2i_engine.errors import StorageError
from t2i_engine.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from t2i_engine.training.config import TrainConfig
from t2i_engine.training.loop import fit
from tests.helpers import run_cli
from tests.training.tiny_denoiser import DictDataset, TinyDenoiser


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, or a skip where this process may not mount one."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> None:
    """Write a filler file until the filesystem is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _debris(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or ".partial-" in p.name]


def test_failed_atomic_write_removes_its_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC simulated in the middle of the write (patched os.fsync): one StorageError, no debris."""
    target = tmp_path / "w.bin"
    atomic_write_bytes(str(target), b"old")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=r"cannot write '.*w.bin': No space left on device"):
        atomic_write_bytes(str(target), b"new")
    assert os.listdir(tmp_path) == ["w.bin"] and target.read_bytes() == b"old"


def test_write_and_read_where_a_folder_is_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(StorageError, match=r"cannot write '.*x': Is a directory"):
        atomic_write_bytes(str(tmp_path / "x"), b"data")
    assert _debris(tmp_path) == []
    with pytest.raises(StorageError, match=r"cannot read '.*x': Is a directory"):
        read_bytes(str(tmp_path / "x"))
    (tmp_path / "f").write_text("a file")
    with pytest.raises(StorageError, match=r"cannot write '.*f/y'"):  # a file where a folder belongs
        atomic_write_bytes(str(tmp_path / "f" / "y"), b"data")


def _state(step: int, numel: int) -> dict:
    return dict(model_state={"w": torch.full((numel,), float(step))}, ema_state=None,
                train_state={"step": step, "batches": step}, keep_last=3)


def test_checkpoint_on_a_full_disk(small_fs: Path) -> None:
    ckpt = str(small_fs / "ckpt")
    save_checkpoint(ckpt, 1, **_state(1, 1024))
    with pytest.raises(StorageError) as info:
        save_checkpoint(ckpt, 2, **_state(2, 1024 * 1024))  # 4 MiB on a 1 MiB disk
    msg = str(info.value)
    assert "checkpoint of step 2 not saved" in msg and "No space left on device" in msg
    assert "is still the one marked latest" in msg and "\n" not in msg
    assert latest_checkpoint(ckpt) == 1 and list_checkpoints(ckpt) == [1]
    assert _debris(small_fs) == []
    model, _, state = load_checkpoint(ckpt, 1, with_ema=False)
    assert torch.equal(model["w"], torch.full((1024,), 1.0)) and state["step"] == 1


def test_training_on_a_disk_that_fills_up(small_fs: Path, tmp_path: Path) -> None:
    """The disk fills after the step-2 checkpoint: the step-4 save fails with one StorageError,
    step 2 stays latest and loadable, and a resumed run (after space is freed) continues from it."""
    class FillAfterFirstSave:
        def on_checkpoint_saved(self, step: int, path: str) -> None:
            if step == 2:
                _fill(small_fs)

        def on_train_step_end(self, step: int, metrics: dict) -> None:
            pass

    ckpt = str(small_fs / "ckpt")
    cfg = TrainConfig(accelerator="cpu", progress_bar=False, batch_size=4, max_steps=4, checkpoint_every=2,
                      ema=False)
    with pytest.raises(StorageError, match="checkpoint of step 4 not saved .*No space left on device"):
        fit(TinyDenoiser(), DictDataset(), cfg, output_dir=tmp_path / "out", seed=0,
            checkpoint_dir=ckpt, hooks=FillAfterFirstSave())
    assert latest_checkpoint(ckpt) == 2 and list_checkpoints(ckpt) == [2]
    assert _debris(small_fs) == []
    (small_fs / "filler").unlink()
    resumed = fit(TinyDenoiser(), DictDataset(), attrs.evolve(cfg, resume=True), output_dir=tmp_path / "out",
                  seed=0, checkpoint_dir=ckpt)
    assert resumed["step"] == 4 and latest_checkpoint(ckpt) == 4


def test_cli_output_on_a_full_disk_is_one_line(small_fs: Path, tmp_path: Path) -> None:
    out = small_fs / "out"
    out.mkdir()
    _fill(small_fs)
    job = tmp_path / "job.toml"
    job.write_text(f'[engine]\noutput_dir = "{out}"\n[task]\nname = "preview-data"\ncount = 4\n'
                   '[data]\ntype = "shapes"\nsize = 256\n')
    done = run_cli("run", str(job), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 1 and "No space left on device" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    debug = run_cli("run", "--debug", str(job), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_cli_read_only_output_dir_exits_2(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "size=64k,ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        job = tmp_path / "job.toml"
        job.write_text(f'[engine]\noutput_dir = "{ro}/missing/out"\n[task]\nname = "preview-data"\n'
                       '[data]\ntype = "shapes"\n')
        done = run_cli("run", str(job), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "engine.output_dir: cannot write to" in done.stderr and "Read-only file system" in done.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.slow
def test_ddp_checkpoint_failure_ends_the_run(tmp_path: Path) -> None:
    """Rank 0 cannot write its checkpoint (a read-only mount): the two-process DDP run ends
    (rank 0's StorageError is broadcast so every rank raises it) and names the cause."""
    import json
    import sys

    out = tmp_path / "out"
    if not _mount_tmpfs(out / "checkpoints", "size=64k,ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        script = Path(__file__).parent / "train_script.py"
        train = {"max_steps": 2, "checkpoint_every": 1, "batch_size": 2, "devices": 2, "strategy": "ddp",
                 "ema": False}
        done = subprocess.run([sys.executable, str(script), str(out), json.dumps(train), "{}"],
                              capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        output = done.stdout + done.stderr
        assert done.returncode != 0 and "Read-only file system" in output
        assert output.count("StorageError: checkpoint of step 1 not saved") >= 2  # raised on both ranks
    finally:
        subprocess.run(["umount", "-l", str(out / "checkpoints")], check=False)
