"""``[task] compile = true`` in a sample job: the denoiser goes through torch.compile with
fullgraph=True (a graph break would fail the trace) and the images stay those of the plain run.

The test swaps Inductor for the ``eager`` backend (no C++ build on a 2-core CI machine): Dynamo
still traces the whole UNet into one graph, which is what the option needs; the CUDA-graph mode
itself runs on a GPU (benchmarks/sd_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sd-sample.toml"


def _sample(out: Path, *sets: str) -> list[np.ndarray]:
    args = ["run", str(SAMPLE), "--set", f"engine.output_dir={str(out)!r}", "--set", "sampler.steps=3",
            "--set", "task.images_per_prompt=1"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sorted(out.glob("*.png"))]


def _compile_eagerly(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Route nn.Module.compile to Dynamo's full trace with the eager backend (no Inductor build),
    recording each call's module and arguments."""
    calls: list[dict] = []
    original = torch.nn.Module.compile

    def compile_eagerly(self, *args, **kwargs):
        calls.append({"module": type(self).__name__, **kwargs})
        return original(self, fullgraph=kwargs["fullgraph"], backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    return calls


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_compile_traces_the_whole_denoiser_and_keeps_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 precision: str) -> None:
    calls = _compile_eagerly(monkeypatch)
    # a traced graph runs PyTorch's ops (no packed oneDNN paths): the plain run takes them too
    monkeypatch.setenv("T2I_KERNELS", "torch")
    torch._dynamo.reset()
    plain = _sample(tmp_path / "plain", f"engine.precision={precision!r}")
    assert calls == []
    with pytest.warns(UserWarning, match="task.compile on the CPU"):  # slower there than the packed paths
        compiled = _sample(tmp_path / "compiled", f"engine.precision={precision!r}", "task.compile=true")
    assert calls == [{"module": "UNet", "fullgraph": True, "mode": "default"}]  # CPU: Inductor's default mode
    assert len(plain) == len(compiled) == 2
    for a, b in zip(plain, compiled):
        assert np.abs(a - b).max() <= 1  # the same arithmetic, rounded to 8 bits
    torch._dynamo.reset()


def test_compile_applies_to_prompt_file_jobs_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample job over a prompt file (tasks/batch.py, its own loop) compiles the denoiser too."""
    calls = _compile_eagerly(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n", encoding="utf-8")
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="task.compile on the CPU"):
        images = _sample(tmp_path / "out", "task.prompts=[]", f"task.prompt_file={str(prompts)!r}", "task.compile=true")
    assert calls == [{"module": "UNet", "fullgraph": True, "mode": "default"}] and len(images) == 1
    torch._dynamo.reset()


def test_compile_keeps_a_controlnets_residuals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a [[conditioners]] ControlNet (the shipped shapes one) the compiled UNet takes its
    residuals in the same single graph: the images equal the plain run's, and differ from those
    of a run without the ControlNet (so the residuals reach the compiled graph)."""
    calls = _compile_eagerly(monkeypatch)
    monkeypatch.setenv("T2I_KERNELS", "torch")
    examples = ROOT / "examples"
    job = tmp_path / "controlnet.toml"
    job.write_text(f"""
[engine]
plugins = ["sd", "controlnet"]
seed = 0
device = "cpu"
[task]
name = "sample"
prompts = ["a red circle on a blue background"]
images_per_prompt = 1
height = 64
width = 64
[model]
type = "stable-diffusion"
checkpoint = {str(examples / "models" / "shapes-64.safetensors")!r}
preset = "shapes-64"
[[conditioners]]
type = "controlnet"
checkpoint = {str(examples / "models" / "controlnet-shapes-64.safetensors")!r}
inputs = {{ image = {str(examples / "controlnet-hint.png")!r} }}
scale = 2.0
[sampler]
name = "dpmpp_2m"
steps = 3
[guidance]
guidance_scale = 4.0
""", encoding="utf-8")

    def run(out: str, *sets: str) -> np.ndarray:
        args = ["run", str(job), "--set", f"engine.output_dir={str(tmp_path / out)!r}"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 0
        (png,) = sorted((tmp_path / out).glob("*.png"))
        return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)

    torch._dynamo.reset()
    plain = run("plain")
    without = run("without", "conditioners=[]")
    with pytest.warns(UserWarning, match="task.compile on the CPU"):
        compiled = run("compiled", "task.compile=true")
    assert calls == [{"module": "UNet", "fullgraph": True, "mode": "default"}]
    assert np.abs(plain - compiled).max() <= 1
    assert np.abs(plain - without).max() > 16
    torch._dynamo.reset()
