"""The core ``train`` task exports only a finished run: a run stopped by SIGTERM (the loop
checkpoints and reports ``interrupted``) leaves an earlier export alone; resuming writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_engine.config.loader import load_config
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config


def test_an_interrupted_train_run_exports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import t2i_engine.training.loop as loop

    pm = EnginePluginManager().load()
    job = tmp_path / "train.toml"
    job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\noutput_dir = "{tmp_path / "out"}"\n'
                   '[task]\nname = "train"\nexport = "model"\n[model]\ntype = "stable-diffusion"\npreset = "tiny"\n'
                   '[data]\ntype = "shapes"\nsize = 32\ncount = 8\n'
                   '[train]\nmax_steps = 2\nbatch_size = 2\nema = false\nresume = true\n')
    real = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **k: {**real(*a, **k), "interrupted": True})
    summary = dict(run_config(load_config(job, pm), pm))
    assert summary["interrupted"] and "exported" not in summary
    assert not (tmp_path / "out" / "model").exists()
    monkeypatch.setattr(loop, "fit", real)
    done = dict(run_config(load_config(job, pm), pm))
    assert not done["interrupted"] and Path(done["exported"]).exists()
