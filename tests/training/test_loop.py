"""The Fabric loop: exact resume after SIGKILL, DDP parity, NaN handling, logging, EMA, LR."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.training.tiny_denoiser import DictDataset, TinyDenoiser

from t2i_engine.checkpoint.io import load_safetensors, safe_torch_load
from t2i_engine.errors import TrainingError
from t2i_engine.training.checkpoints import CheckpointPaths, latest_checkpoint, list_checkpoints
from t2i_engine.training.config import TrainConfig
from t2i_engine.training.ema import EMA
from t2i_engine.training.loop import fit, interrupted
from t2i_engine.training.lr import lr_factor

SCRIPT = Path(__file__).parent / "train_script.py"
PY = sys.executable


def _run(out: Path, train: dict, model: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([PY, str(SCRIPT), str(out), json.dumps(train), json.dumps(model or {})],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def _finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def _final(out: Path, step: int) -> dict[str, torch.Tensor]:
    paths = CheckpointPaths(str(out / "checkpoints"), step)
    return {**load_safetensors(paths.model), **{f"ema.{k}": v for k, v in load_safetensors(paths.ema).items()}}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"accelerator": "cpu", "progress_bar": False, "batch_size": 4, **kw})


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    train = {"max_steps": 12, "checkpoint_every": 3, "deterministic": True, "lr": 1e-2,
             "ema_decay": 0.9, "warmup_steps": 2, "lr_schedule": "cosine", "grad_accum": 2}
    ref = tmp_path / "ref"
    _finish(_run(ref, train))

    killed = tmp_path / "killed"
    p = _run(killed, train, {"sleep": 0.1})
    deadline = time.time() + 120
    while (latest_checkpoint(str(killed / "checkpoints")) or 0) < 6:
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert latest_checkpoint(str(killed / "checkpoints")) < 12
    _finish(_run(killed, {**train, "resume": True}))

    a, b = _final(ref, 12), _final(killed, 12)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the JSONL of the resumed run holds each logged step once
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_same_global_batch(tmp_path):
    common = {"max_steps": 4, "log_every": 1, "checkpoint_every": 0, "lr": 1e-2, "clip_grad_norm": None}
    model = {"noise_from_index": True}
    single = tmp_path / "single"
    _finish(_run(single, {**common, "batch_size": 4}, model))
    ddp = tmp_path / "ddp"
    _finish(_run(ddp, {**common, "batch_size": 2, "devices": 2, "strategy": "ddp"}, model))

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    a, b = _final(single, 4), _final(ddp, 4)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # only rank 0 wrote: one event file, one checkpoint folder
    assert len(list((ddp / "tensorboard").iterdir())) == 1
    assert list_checkpoints(str(ddp / "checkpoints")) == [4]


@pytest.mark.slow
def test_ddp_bf16_mixed_computes_in_bf16_in_both_processes(tmp_path):
    """bf16-mixed under DDP (the loop's autocast inside the one Fabric's wrapper enters there):
    every rank's network runs in bf16, the weights saved stay float32, the loss stays finite."""
    log = tmp_path / "dtypes"
    out = tmp_path / "ddp"
    _finish(_run(out, {"max_steps": 2, "log_every": 1, "checkpoint_every": 0, "batch_size": 2, "devices": 2,
                       "strategy": "ddp", "precision": "bf16-mixed"}, {"dtype_log": str(log)}))
    logs = sorted(tmp_path.glob("dtypes.*"))
    assert len(logs) == 2  # one per rank
    for f in logs:
        assert f.read_text().split() == ["torch.bfloat16"] * 2, f
    assert all(v.dtype == torch.float32 for v in _final(out, 2).values())
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    model = TinyDenoiser(nan_calls=(2,))
    summary = fit(model, DictDataset(), _cfg(max_steps=5, checkpoint_every=0), output_dir=tmp_path, seed=0)
    assert summary["step"] == 5 and summary["nonfinite_skipped"] == 1
    state = safe_torch_load(CheckpointPaths(str(tmp_path / "checkpoints"), 5).state)
    assert state["batches"] == 6  # the skipped step consumed its batch
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nonfinite_in_a_row_stops_with_last_checkpoint_intact(tmp_path):
    model = TinyDenoiser(nan_calls=tuple(range(4, 100)))
    cfg = _cfg(max_steps=20, checkpoint_every=2, max_nonfinite_in_a_row=3)
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        fit(model, DictDataset(), cfg, output_dir=tmp_path, seed=0)
    ckpt = str(tmp_path / "checkpoints")
    assert latest_checkpoint(ckpt) == 4 and list_checkpoints(ckpt) == [2, 4]
    weights = load_safetensors(CheckpointPaths(ckpt, 4).model)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_logging_hooks_grids_and_jsonl(tmp_path):
    calls = {"step": [], "saved": []}

    class Hooks:
        def on_train_step_end(self, *, step, metrics):
            calls["step"].append((step, dict(metrics)))

        def on_checkpoint_saved(self, *, step, path):
            calls["saved"].append((step, path))

    cfg = _cfg(max_steps=4, log_every=2, checkpoint_every=2, sample_every=2, sample_prompts=["a", "b", "c"])
    fit(TinyDenoiser(), DictDataset(), cfg, output_dir=tmp_path, seed=0, hooks=Hooks())
    assert [s for s, _ in calls["step"]] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "samples_per_sec", "step_time", "peak_memory_mb"} <= calls["step"][0][1].keys()
    assert [s for s, _ in calls["saved"]] == [2, 4]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec", "train/step_time",
            "train/peak_memory_mb"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["samples-000002.png", "samples-000004.png"]


def test_ema_matches_closed_form_and_swaps_back():
    model = TinyDenoiser()
    ema = EMA(model, decay=0.5, start=1, interval=1)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update(model, 1)  # before/at start: a copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, 2)  # 0.5 * w0 + 0.5 * (w0 + 1) = w0 + 0.5
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], w0[n] + 0.5)
    with ema.swapped_into(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, w0[n] + 0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, w0[n] + 1.0)


def test_lr_warmup_then_cosine():
    f = [lr_factor(s, warmup_steps=4, max_steps=14, schedule="cosine", min_ratio=0.1) for s in range(15)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0) and f[14] == pytest.approx(0.1)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, warmup_steps=4, max_steps=14, schedule="constant") == 1.0


def test_sigterm_saves_checkpoint_and_returns(tmp_path):
    out = tmp_path / "run"
    p = _run(out, {"max_steps": 10_000, "checkpoint_every": 0}, {"sleep": 0.02})
    deadline = time.time() + 60
    while not (out / "tensorboard").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    text = _finish(p)
    summary = json.loads(text.split("SUMMARY", 1)[1])
    assert summary["interrupted"] and interrupted(summary) and 0 < summary["step"] < 10_000
    assert latest_checkpoint(str(out / "checkpoints")) == summary["step"]


def test_interrupted_reads_the_loops_flag():
    """The tasks' export rule (training.loop.interrupted): the flag fit returns; a summary
    without it is an error naming the key, not a finished run."""
    assert interrupted({"step": 3, "interrupted": True})
    assert not interrupted({"step": 10, "interrupted": False})
    with pytest.raises(TrainingError, match=r"no 'interrupted' key \(it has \['step'\]\)"):
        interrupted({"step": 10})


@pytest.mark.slow
def test_resume_with_an_iterable_webdataset_continues_exactly(tmp_path):
    from tests.data.test_sources import _write_shards

    from t2i_engine.data.webdataset import WebDatasetShards

    _write_shards("/loop-wds", 3, 8)

    def run(out, max_steps, resume):
        torch.manual_seed(0)
        ds = WebDatasetShards(WebDatasetShards.Config(urls=["memory://loop-wds/shard-{000..002}.tar"],
                                                      resolution=8))
        fit(TinyDenoiser(), ds, _cfg(max_steps=max_steps, checkpoint_every=3, resume=resume, lr=1e-2),
            output_dir=out, seed=3)
        return load_safetensors(CheckpointPaths(str(out / "checkpoints"), 9).model) if max_steps == 9 else None

    straight = run(tmp_path / "a", 9, False)
    run(tmp_path / "b", 4, False)  # stops at 4 (epochs of 6 batches: the resume crosses one)
    resumed = run(tmp_path / "b", 9, True)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_precision_reaches_the_training_loss_on_one_device(tmp_path, precision, dtype):
    """train.precision = "bf16-mixed" runs the model under autocast on a single device (Fabric
    applies its autocast to a marked method only through a DDP/FSDP wrapper), for the training
    steps and for validation; the parameters stay float32."""
    model = TinyDenoiser(dtype_log=str(tmp_path / "dtypes"))
    fit(model, DictDataset(), _cfg(max_steps=2, checkpoint_every=0, precision=precision, val_every=2, val_batches=1),
        output_dir=tmp_path / "run", seed=0, val_dataset=DictDataset(seed=1))
    (log,) = tmp_path.glob("dtypes.*")
    assert log.read_text().split() == [str(dtype)] * 3  # 2 steps + 1 validation batch
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cpu_training_keeps_freed_memory_in_the_heap(tmp_path, monkeypatch):
    """A CPU run turns on glibc's heap reuse before its first step (else every step page-faults its
    freed activations back in; the switch's effect itself: tests/test_cpu_memory.py)."""
    import t2i_engine.training.loop as loop

    steps: list[int] = []
    calls: list[int] = []  # the number of steps run when it was called
    real_step = loop.train_step
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append(len(steps)) or True)
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (steps.append(1), real_step(*a, **k))[1])
    fit(TinyDenoiser(), DictDataset(), _cfg(max_steps=2, checkpoint_every=0), output_dir=tmp_path / "run", seed=0)
    assert calls == [0] and len(steps) == 2
