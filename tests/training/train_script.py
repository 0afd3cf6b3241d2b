"""Run fit() on the tiny denoiser in its own process (resume, kill and DDP tests).

Usage: python train_script.py OUTPUT_DIR JSON_TRAIN_OVERRIDES JSON_MODEL_OPTIONS
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from tiny_denoiser import DictDataset, TinyDenoiser  # noqa: E402

from t2i_engine.training.config import TrainConfig  # noqa: E402
from t2i_engine.training.loop import fit  # noqa: E402

if __name__ == "__main__":
    out, train_kw, model_kw = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    torch.manual_seed(1234)  # same initial weights in every process
    model = TinyDenoiser(**model_kw)
    cfg = TrainConfig(**{"accelerator": "cpu", "progress_bar": False, **train_kw})
    summary = fit(model, DictDataset(n=32), cfg, output_dir=out, seed=7)
    print("SUMMARY", json.dumps(summary), flush=True)
