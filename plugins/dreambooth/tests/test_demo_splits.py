"""The DreamBooth demo's validation and test prompt sets (examples/dreambooth-eval-*.toml) are
disjoint from each other and from what the training sees: the instance captions and the class
prompts of examples/dreambooth-train.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

from t2i_engine.data.shapes import ShapesDataset

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _job(name: str) -> dict:
    return tomllib.loads((EXAMPLES / name).read_text())


def _prompts(job: dict) -> set[str]:
    """The prompts a shapes-eval job samples: its [data] split less task.exclude_prompts."""
    data = {k: v for k, v in job["data"].items() if k != "type"}
    ds = ShapesDataset(**data)
    words = job["task"].get("shape_words", {})
    every = [ds.caption_of(*combo, words=words) for combo in ds.combinations]
    excluded = set(job["task"].get("exclude_prompts", []))
    assert excluded <= set(every)
    return set(every) - excluded


def test_plus_validation_is_disjoint_from_the_instances_and_the_test():
    train = _job("dreambooth-train.toml")
    instances = {p.read_text().strip() for p in (EXAMPLES / train["task"]["instance_data"]).glob("*.txt")}
    val, test = _prompts(_job("dreambooth-eval-val.toml")), _prompts(_job("dreambooth-eval-new.toml"))
    assert len(instances) == 5 and len(val) == 10 and len(test) == 15
    assert not val & test and not val & instances and not test & instances
    assert set(_job("dreambooth-eval-val.toml")["task"]["exclude_prompts"]) == instances


def test_known_shape_validation_is_disjoint_from_the_class_prompts_and_the_test():
    class_prompts = set(_job("dreambooth-train.toml")["task"]["class_prompt"])
    val, test = _prompts(_job("dreambooth-eval-val-drift.toml")), _prompts(_job("dreambooth-eval-drift.toml"))
    assert len(class_prompts) == 24 and len(val) == 52 and len(test) == 14
    assert not val & test and not val & class_prompts and not test & class_prompts
    assert sum(" circle " in p for p in val) == 10
