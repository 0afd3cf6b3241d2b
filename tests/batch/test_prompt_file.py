"""``sample`` over a prompt file: the three formats read as written, sharding that does not
depend on the number of ranks (a property over many sizes), resume, the manifest, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_engine.tasks.batch import Item, batches, image_name, items, read_prompts

PROMPTS = ["a red square", 'a "quoted", comma prompt', "ümlaut circle", "a blue triangle", "a green star"]


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    """``path`` in the format its suffix names, written by the standard library's own writers."""
    import csv

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "other": 1}) + "\n" for p in prompts), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "prompt"])
            writer.writerows([i, p] for i, p in enumerate(prompts))
    else:
        path.write_text("\n\n".join(prompts) + "\n", encoding="utf-8")  # blank lines between: skipped
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_each_format_reads_back_the_prompts(tmp_path, suffix):
    assert list(read_prompts(str(write_prompts(tmp_path / f"p{suffix}")))) == PROMPTS


def test_prompt_column_and_fsspec_urls(tmp_path):
    import fsspec

    with fsspec.open("memory://batch/p.jsonl", "w") as f:
        f.write('{"caption": "one"}\n"two"\n')
    assert list(read_prompts("memory://batch/p.jsonl", column="caption")) == ["one", "two"]
    with pytest.raises(ConfigError, match="line 1: expected an object with a string 'prompt'"):
        list(read_prompts("memory://batch/p.jsonl"))
    write_prompts(tmp_path / "p.csv")
    with pytest.raises(ConfigError, match="task.prompt_column: the CSV has no column 'caption'; its columns: id, prompt"):
        list(read_prompts(str(tmp_path / "p.csv"), column="caption"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{nope\n')
    with pytest.raises(ConfigError, match="task.prompt_file: line 2: not valid JSON"):
        list(read_prompts(str(tmp_path / "bad.jsonl")))


def test_items_seeds_and_names():
    got = list(items_from(["a", "b"], images_per_prompt=2, seed=10))
    assert got == [Item(0, 0, 10, "a"), Item(0, 1, 11, "a"), Item(1, 0, 12, "b"), Item(1, 1, 13, "b")]
    assert got[3].file == image_name(1, 13) == "000001-13.png"


def items_from(prompts: list[str], **kw):
    import fsspec

    with fsspec.open("memory://batch/items.txt", "w") as f:
        f.write("\n".join(prompts))
    return items("memory://batch/items.txt", column="prompt", **kw)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_shards_are_the_same_batches_for_any_world_size(n, batch_size):
    """The union of every rank's batches is the one-rank list of batches, each exactly once."""
    stream = [Item(i, 0, i, str(i)) for i in range(n)]
    one = list(batches(iter(stream), batch_size=batch_size, rank=0, world=1))
    assert [x for b in one for x in b] == stream
    for world in (2, 3, 4):
        shards = [list(batches(iter(stream), batch_size=batch_size, rank=r, world=world)) for r in range(world)]
        assert sorted((b for s in shards for b in s), key=lambda b: b[0].index) == one


def _job(tmp_path: Path, prompt_file: Path, extra: str = "") -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd"]
device = "cpu"
seed = 5
output_dir = "out"
[task]
name = "sample"
prompt_file = "{prompt_file.name}"
width = 16
height = 16
batch_size = 2
{extra}
[model]
type = "stable-diffusion"
preset = "tiny"
[sampler]
name = "ddim"
steps = 2
""")
    return job


def test_resume_skips_what_exists_and_the_manifest_lists_every_image(tmp_path):
    pm = EnginePluginManager().load()
    job = _job(tmp_path, write_prompts(tmp_path / "p.jsonl", PROMPTS[:3]), "images_per_prompt = 2")
    first = run_config(load_config(job, pm), pm)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000000-5.png", "000000-6.png", "000001-7.png", "000001-8.png", "000002-10.png", "000002-9.png"]
    assert (first["written"], first["skipped"], first["images"]) == (6, 0, 6)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(m["index"], m["image"], m["seed"], m["prompt"], m["file"]) for m in lines] == [
        (k // 2, k % 2, 5 + k, PROMPTS[k // 2], image_name(k // 2, 5 + k)) for k in range(6)]
    text = Image.open(out / "000001-8.png").text  # type: ignore[attr-defined]
    assert (text["prompt"], text["seed"]) == (PROMPTS[1], "8")
    kept = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "000001-7.png").unlink()  # as if the job had stopped before writing it
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = run_config(load_config(job, pm), pm)
    assert (again["written"], again["skipped"], again["images"]) == (1, 5, 6)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in stamps} == stamps  # untouched
    assert (out / "000001-7.png").read_bytes() == kept["000001-7.png"]  # its batch re-made: the same pixels


def test_a_batch_png_reruns_as_a_one_process_sample_job(tmp_path):
    import numpy as np

    from t2i_engine.utils.recipe import load_png_job

    pm = EnginePluginManager().load()
    run_config(load_config(_job(tmp_path, write_prompts(tmp_path / "p.txt", PROMPTS[:2])), pm), pm)
    png = tmp_path / "out" / "000001-6.png"
    config = load_png_job(png, pm)
    opts = config.task.options
    assert (opts.prompt_file, opts.prompts, opts.seeds, opts.devices) == (None, PROMPTS[:2], [5, 6], 1)
    rerun = run_config(config, pm)["images"]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(rerun[1])))


@pytest.mark.parametrize(("extra", "message"), [
    ('prompts = ["x"]', "task.prompts: give prompts or prompt_file, not both"),
    ("seeds = [1, 2]", "task.seeds: not with task.prompt_file"),
])
def test_conflicting_keys(tmp_path, extra, message):
    pm = EnginePluginManager().load()
    job = _job(tmp_path, write_prompts(tmp_path / "p.txt"), extra)
    with pytest.raises(ConfigError, match=message):
        run_config(load_config(job, pm), pm)


def test_devices_without_a_prompt_file_is_an_error(tmp_path):
    pm = EnginePluginManager().load()
    job = tmp_path / "job.toml"
    job.write_text(_job(tmp_path, tmp_path / "unused.txt").read_text().replace('prompt_file = "unused.txt"',
                                                                                 'prompts = ["x"]\ndevices = 2'))
    with pytest.raises(ConfigError, match="task.devices: more than one process shards a prompt file"):
        run_config(load_config(job, pm), pm)


def test_a_missing_prompt_file_names_the_key(tmp_path):
    pm = EnginePluginManager().load()
    with pytest.raises(ConfigError, match=r"task.prompt_file: path does not exist: 'nope.txt' \(.*job.toml:8\)"):
        load_config(_job(tmp_path, tmp_path / "nope.txt"), pm)
