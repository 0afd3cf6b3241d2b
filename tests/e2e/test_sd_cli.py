"""End to end through the installed console script: the example configs as written (only
shrunk with --set), train -> export -> sample from the export, img2img, PNG metadata, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
SAMPLE, TRAIN = ROOT / "examples" / "sd-sample.toml", ROOT / "examples" / "sd-train.toml"
SMALL_SAMPLE = ("task.width=16", "task.height=16", "task.images_per_prompt=1", "sampler.steps=2")


def _set(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _ok(*args: str):
    done = run_cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """sd-train.toml, shrunk to 2 steps on 16 px shapes: the exported diffusers folder."""
    out = tmp_path_factory.mktemp("train")
    done = _ok("run", str(TRAIN), *_set(f"engine.output_dir={str(out)!r}", "train.max_steps=2",
                                        "train.batch_size=2", "data.size=16"))
    assert f"exported: {out / 'model'}" in done.stdout
    assert (out / "model" / "model_index.json").is_file()
    return out / "model"


@pytest.mark.slow
def test_train_then_sample_from_export_with_png_metadata(trained, tmp_path):
    from PIL import Image

    _ok("run", str(SAMPLE), *_set(f"engine.output_dir={str(tmp_path)!r}", f"model.checkpoint={str(trained)!r}",
                                  *SMALL_SAMPLE, "engine.seed=5"))
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-5.png", "00001-6.png"]  # one per prompt, seeds from engine.seed
    with Image.open(pngs[1]) as img:
        assert img.size == (16, 16)
        meta = dict(img.text)
    assert meta["prompt"] == "a blue circle" and meta["seed"] == "6"
    assert meta["sampler"] == "ddim" and meta["steps"] == "2" and meta["guidance_scale"] == "7.5"
    assert meta["model"].startswith("stable-diffusion")


@pytest.mark.slow
def test_img2img_with_strength(trained, tmp_path):
    from PIL import Image

    source = tmp_path / "source.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(source)
    out = tmp_path / "out"
    _ok("run", str(SAMPLE), *_set(f"engine.output_dir={str(out)!r}", f"model.checkpoint={str(trained)!r}",
                                  *SMALL_SAMPLE, f"task.init_image={str(source)!r}", "task.strength=0.5"))
    with Image.open(sorted(out.glob("*.png"))[0]) as img:
        meta = dict(img.text)
    assert meta["init_image"] == str(source) and meta["strength"] == "0.5"


@pytest.mark.parametrize(("override", "key"), [
    ("task.prompts='a red square'", "task.prompts"),  # a string where a list of str belongs
    ("task.prompts=[1, 2]", "task.prompts"),
    ("sampler.steps=0", "sampler.steps"),
    ("guidance.guidance_scale='high'", "guidance.guidance_scale"),
])
def test_bad_input_exits_2_naming_the_key(override, key, tmp_path):
    done = run_cli("run", str(SAMPLE), *_set(f"engine.output_dir={str(tmp_path)!r}", override))
    assert done.returncode == 2, done.stdout + done.stderr
    assert key in done.stderr and "Traceback" not in done.stderr
