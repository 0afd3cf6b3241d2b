"""Sample PNGs carry their recipe: A1111's ``parameters`` text, read back by parsers that are not
ours (a reference parser written from A1111's documented format below, and the sd-parsers
package), and the job chunk that ``t2i-engine run --from-png`` re-runs to the same pixels."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_engine.cli import main
from t2i_engine.utils.infotext import a1111_sampler_name, format_infotext, model_hash

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sd-sample.toml"

# --- a reference reader of A1111's infotext, written from stable-diffusion-webui's documented
# format (modules/infotext_utils.py, parse_generation_parameters): prompt lines, an optional
# "Negative prompt:" block, and a last line of `key: value` pairs matched by this regex, JSON-quoted
# values unquoted, "WxH" values split into key-1 / key-2.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_a1111(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    out = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = RE_SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("name", "karras", "a1111"), [
    ("ddim", False, "DDIM"), ("euler", False, "Euler"), ("euler_ancestral", False, "Euler a"),
    ("heun", False, "Heun"), ("lms", False, "LMS"), ("lms", True, "LMS Karras"),
    ("dpmpp_2m", False, "DPM++ 2M"), ("dpmpp_2m", True, "DPM++ 2M Karras"),
    ("dpmpp_2m_sde", False, "DPM++ 2M SDE"), ("dpmpp_2m_sde", True, "DPM++ 2M SDE Karras"),
    ("plms", False, "PLMS"), ("pndm", False, "PLMS"), ("euler", True, "Euler"),  # Karras: "Schedule type"
    ("my-sampler", False, "my-sampler"),
])
def test_sampler_names_are_a1111s(name: str, karras: bool, a1111: str) -> None:
    assert a1111_sampler_name(name, karras=karras) == a1111


def test_infotext_with_awkward_values_reads_back_with_the_reference_parser() -> None:
    prompt = 'a "fox": red, with snow\nsecond line, ümlaut'
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7.5, "Seed": 1, "Size": "512x768",
              "Model": "name, with: comma", "Skipped": None, "Conditioner 0": "type: canny, scale: 0.5"}
    got = parse_a1111(format_infotext(prompt, params, negative_prompt="blurry, dark"))
    assert got["Prompt"] == prompt and got["Negative prompt"] == "blurry, dark"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("20", "DPM++ 2M", "7.5", "1")
    assert (got["Size-1"], got["Size-2"]) == ("512", "768")
    assert got["Model"] == "name, with: comma" and got["Conditioner 0"] == "type: canny, scale: 0.5"
    assert "Skipped" not in got
    assert "Negative prompt" not in format_infotext("p", params)  # A1111 leaves the line out when empty


def test_model_hash_of_a_file_is_a1111s_autov2(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert model_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    f.write_bytes(b"other weights, longer" * 1000)  # a changed file is hashed again, not cached
    assert model_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert model_hash(f"file://{f}") == model_hash(f)
    assert model_hash("s3://bucket/model.safetensors") is None  # never fetched again to hash


def test_model_hash_of_a_folder_follows_its_documented_definition(tmp_path: Path) -> None:
    root = tmp_path / "model"
    files = {"unet/diffusion_pytorch_model.safetensors": b"u" * 100, "model_index.json": b"{}",
             "vae/config.json": b'{"a": 1}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_bytes(b"ignored")
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    assert model_hash(root) == h.hexdigest()[:10]


def _export_tiny_single_file(path: Path) -> Path:
    from t2i_plugin_sd.plugin import StableDiffusionConfig, build_stable_diffusion

    out = path / "tiny-model.safetensors"
    build_stable_diffusion(StableDiffusionConfig(preset="tiny")).save(str(out), format="single-file")
    return out


def _run(*args: str) -> None:
    assert main(list(args)) == 0


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.slow
def test_sample_png_parameters_read_by_independent_parsers(tmp_path: Path) -> None:
    checkpoint = _export_tiny_single_file(tmp_path)
    out = tmp_path / "out"
    prompt = "a red square, on: grass"
    _run("run", str(SAMPLE), *_sets(
        f"engine.output_dir={str(out)!r}", f"model.checkpoint={str(checkpoint)!r}", "engine.seed=7",
        f"task.prompts=[{json.dumps(prompt)}]", "task.images_per_prompt=1", "task.negative_prompt='blurry, dark'",
        "task.width=16", "task.height=24", "sampler.name='dpmpp_2m'", "sampler.steps=2", "sampler.karras=true",
        "guidance.guidance_scale=5.5", "guidance.guidance_rescale=0.7"))
    png = out / "00000-7.png"
    with Image.open(png) as img:
        text = dict(img.text)
    got = parse_a1111(text["parameters"])
    assert got["Prompt"] == prompt and got["Negative prompt"] == "blurry, dark"
    assert got["Steps"] == "2" and got["Sampler"] == "DPM++ 2M Karras" and got["Schedule type"] == "Karras"
    assert got["CFG scale"] == "5.5" and got["CFG Rescale"] == "0.7" and got["Seed"] == "7"
    assert (got["Size-1"], got["Size-2"]) == ("16", "24")  # width x height
    assert got["Model hash"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert got["Model"] == "tiny-model"
    # the engine's own chunks stay
    assert text["prompt"] == prompt and text["seed"] == "7" and text["sampler"] == "dpmpp_2m"
    assert text["negative_prompt"] == "blurry, dark" and text["checkpoint"] == str(checkpoint)

    sd_parsers = pytest.importorskip("sd_parsers")
    info = sd_parsers.ParserManager().parse(png)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters["steps"] == "2" and sampler.parameters["cfg_scale"] == "5.5"
    assert sampler.parameters["seed"] == "7" and sampler.parameters["scheduler"] == "Karras"
    assert sampler.model.hash == got["Model hash"] and sampler.model.name == "tiny-model"
    assert sampler.prompts[0].value == prompt and sampler.negative_prompts[0].value == "blurry, dark"


@pytest.mark.slow
def test_run_from_png_reproduces_the_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    # ancestral sampling in a batch of 2: the second image's noise depends on its batch, which the
    # PNG must therefore record
    _run("run", str(SAMPLE), *_sets(f"engine.output_dir={str(out)!r}", "task.prompts=['a red square']",
                                     "task.images_per_prompt=2", "task.batch_size=2", "task.width=16",
                                     "task.height=16", "sampler.name='euler_ancestral'", "sampler.steps=2",
                                     "engine.seed=3"))
    png = out / "00001-4.png"
    _run("run", "--from-png", str(png))
    assert np.array_equal(_pixels(out / "00001-4-rerun" / "00001-4.png"), _pixels(png))

    _run("run", "--from-png", str(png), *_sets("task.batch_size=1", f"engine.output_dir={str(tmp_path / 'b1')!r}"))
    assert not np.array_equal(_pixels(tmp_path / "b1" / "00001-4.png"), _pixels(png))  # the batch mattered

    capsys.readouterr()
    _run("config", "--from-png", str(png))
    assert "seeds = [3, 4]" in capsys.readouterr().out


def test_from_png_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["run", "--from-png", str(plain)]) == 2
    assert "t2i_engine_job" in capsys.readouterr().err
    assert main(["run", "--from-png", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", str(SAMPLE), "--from-png", str(plain)]) == 2
    assert "not both" in capsys.readouterr().err


def _metadata_for(data: dict, **extra) -> dict[str, str]:
    """sample_png_metadata for a job given as parsed TOML (no model is built: only its schedule)."""
    from types import SimpleNamespace

    from t2i_engine.config.loader import resolve_config
    from t2i_engine.diffusion.schedules import DiscreteSchedule
    from t2i_engine.plugins.manager import EnginePluginManager
    from t2i_engine.utils.recipe import sample_png_metadata

    config = resolve_config(data, EnginePluginManager().load())
    if extra:
        import attrs

        config = attrs.evolve(config, **extra)
    ctx = SimpleNamespace(config=config)
    model = SimpleNamespace(schedule=DiscreteSchedule.from_betas("scaled_linear", spacing="trailing"))
    return sample_png_metadata(ctx, model, prompt="p", seed=1, size=(8, 8), batch_prompts=["p"], batch_seeds=[1])


def _job(sampler: dict, **tables) -> dict:
    return {"engine": {"plugins": ["sd"], "precision": tables.pop("precision", "32-true")},
            "task": {"name": "sample", "prompts": ["p"], **tables.pop("task", {})},
            "model": {"type": "stable-diffusion", "preset": "tiny"}, "sampler": sampler, **tables}


def test_parameters_carry_sampler_options_img2img_precision_and_conditioners(tmp_path: Path) -> None:
    import attrs

    from t2i_engine.config.schema import ComponentConfig

    @attrs.frozen
    class HintOptions:
        scale: float = 0.5
        image: str = "edges.png"
        window: list = attrs.Factory(lambda: [0.0, 1.0])  # not a scalar: left to the job chunk

    source = tmp_path / "source.png"
    Image.new("RGB", (8, 8)).save(source)
    hint = ComponentConfig(kind="conditioner", name="canny", options=HintOptions(), plugin="demo")
    got = parse_a1111(_metadata_for(_job({"name": "edm", "steps": 4}, precision="bf16-mixed",
                                         task={"init_image": str(source), "strength": 0.6}),
                                    conditioners=[hint])["parameters"])
    assert got["Sampler"] == "Heun" and got["Sigma churn"] == "40.0" and got["Sigma tmin"] == "0.05"
    assert got["Sigma tmax"] == "50.0" and got["Sigma noise"] == "1.003"
    assert got["Timestep spacing"] == "trailing" and "Schedule type" not in got
    assert got["Denoising strength"] == "0.6" and got["Precision"] == "bf16-mixed"
    assert got["Conditioner 0"] == "type: canny, scale: 0.5, image: edges.png"

    ddim = parse_a1111(_metadata_for(_job({"name": "ddim", "eta": 0.3, "karras": True, "rho": 5.0}))["parameters"])
    assert ddim["Eta DDIM"] == "0.3" and ddim["Schedule type"] == "Karras" and ddim["Schedule rho"] == "5.0"
    assert "Timestep spacing" not in ddim and "Denoising strength" not in ddim and "Precision" not in ddim
    guided = _metadata_for(_job({"name": "euler"}, guidance={"guidance_scale": 4.0, "guidance_interval": [0.28, 5.42]}))
    assert parse_a1111(guided["parameters"])["Guidance interval"] == "0.28-5.42"
    assert "guidance_interval = [0.28, 5.42]" in guided["t2i_engine_job"]  # what --from-png re-runs
    plain = parse_a1111(_metadata_for(_job({"name": "euler_ancestral"}))["parameters"])
    assert "Eta" not in plain and "Sigma noise" not in plain  # A1111's defaults are left out, as A1111 does
    assert parse_a1111(_metadata_for(_job({"name": "euler_ancestral", "eta": 0.5}))["parameters"])["Eta"] == "0.5"


def test_save_png_is_atomic_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    from PIL import Image

    from t2i_engine.errors import StorageError
    from t2i_engine.utils.images import save_png

    target = tmp_path / "00000.png"
    save_png(Image.new("RGB", (4, 4), (255, 0, 0)), str(target), metadata={"k": "old"})
    before = target.read_bytes()

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)  # the rename, the last step of an atomic write
    with pytest.raises(StorageError, match="00000.png"):
        save_png(Image.new("RGB", (4, 4), (0, 0, 255)), str(target), metadata={"k": "new"})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]
