"""``shapes-eval``'s ``shape_words`` (how prompts spell a shape: a DreamBooth identifier) and
``classifier_shapes`` (what the classifier chooses among): each changes what the task does.

The sampler is replaced by clean renders of a fixed shape, so the scores have an exact truth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config

JOB = """
[engine]
plugins = ["sd"]
device = "cpu"
output_dir = "{out}"

[task]
name = "shapes-eval"
images_per_prompt = 2
{task}

[data]
type = "shapes"
size = 32
shapes = ["plus"]
colours = ["red", "blue", "green"]

[model]
type = "stable-diffusion"
preset = "tiny"

[sampler]
name = "ddim"
steps = 2
"""


@pytest.fixture
def drawn(monkeypatch):
    """Every sampled image is a centred circle in the prompt's colours; the prompts are recorded."""
    import t2i_engine.tasks.shapes_eval as task_module
    from t2i_engine.data.shapes import COLOURS, render_shape

    prompts: list[str] = []

    def fake(model, batch_prompts, seeds, **kwargs):
        prompts.extend(batch_prompts)
        out = []
        for p in batch_prompts:
            words = p.split()  # "a red X on a blue background"
            out.append(render_shape("circle", COLOURS[words[1]], COLOURS[words[5]], size=32, cx=16, cy=16, radius=9))
        return torch.stack(out)

    monkeypatch.setattr(task_module, "sample_batched", fake)
    return prompts


def _run(tmp_path: Path, task: str) -> dict:
    path = tmp_path / "eval.toml"
    path.write_text(JOB.format(out=tmp_path / "out", task=task))
    pm = EnginePluginManager().load()
    return dict(run_config(load_config(path, pm), pm))


def test_shape_words_spell_the_prompts(tmp_path, drawn):
    _run(tmp_path, "")
    assert drawn and all(" plus on " in p for p in drawn)
    drawn.clear()
    _run(tmp_path, 'shape_words = { plus = "sks" }')
    assert drawn and all(" sks on " in p and "plus" not in p for p in drawn)


def test_classifier_shapes_decide_what_counts(tmp_path, drawn):
    alone = _run(tmp_path, "")  # the only candidate is the plus: any region is one
    assert alone["shape"] == 1.0 and alone["colour"] == 1.0
    among = _run(tmp_path, 'classifier_shapes = ["circle", "square", "triangle", "plus"]')
    assert among["shape"] == 0.0 and among["colour"] == 1.0  # circles are read as circles, not pluses


@pytest.mark.parametrize("task, message", [
    ('shape_words = { star = "sks" }', "task.shape_words: star is not a shape of"),
    ('classifier_shapes = ["circle", "square"]', "must name known shapes.*include every shape"),
    ('classifier_shapes = ["circle", "hexagon", "plus"]', "classifier_shapes"),
    ('exclude_prompts = ["a red sks on a blue background"]', "task.exclude_prompts: 'a red sks on a blue.*not a prompt"),
    ('exclude_prompts = ["a red plus on a red background"]', "not a prompt of the \\[data\\] split"),
    ("exclude_prompts = [" + ", ".join(f'"a {c} plus on a {b} background"' for c in ("red", "blue", "green")
                                       for b in ("red", "blue", "green") if b != c) + "]", "leaves no prompt"),
])
def test_bad_options_are_named(tmp_path, drawn, task, message):
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path, task)


def test_exclude_prompts_leave_those_prompts_out(tmp_path, drawn):
    whole = _run(tmp_path, 'shape_words = { plus = "sks" }')
    every = sorted(set(drawn))
    assert whole["prompts"] == len(every) == 6  # three colours, a plus on each other colour
    drawn.clear()
    out = ("a red sks on a blue background", "a green sks on a red background")
    left = _run(tmp_path, 'shape_words = { plus = "sks" }\nexclude_prompts = [' + ", ".join(f'"{p}"' for p in out) + "]")
    assert sorted(set(drawn)) == [p for p in every if p not in out]
    assert left["prompts"] == 4 and left["images"] == 8 and len(drawn) == 8
