"""Protocol conformance is checked with hasattr, not isinstance: from Python 3.12, isinstance()
against a runtime-checkable protocol looks members up with inspect.getattr_static, which misses
an nn.Module's submodules (behind __getattr__). On 3.12 the SD train task failed with "does not
implement LatentDiffusionModel" that way."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from t2i_engine import interfaces
from t2i_engine.interfaces import LatentDiffusionModel, missing_members, protocol_members

ROOT = Path(__file__).resolve().parents[1]


class _Bundle(nn.Module):
    """Members as an nn.Module holds them: submodules behind __getattr__, methods on the class."""

    def __init__(self) -> None:
        super().__init__()
        self.text_encoder = nn.Linear(2, 2)
        self.autoencoder = nn.Identity()
        self.denoiser = nn.Linear(2, 2)
        self.schedule = object()

    def trainable(self, *, caption_dropout: float, train_text_encoder: bool) -> nn.Module:
        return self

    def save(self, url: str, *, format: str | None = None) -> None:
        pass


def test_submodule_members_count_although_getattr_static_misses_them() -> None:
    bundle = _Bundle()
    with pytest.raises(AttributeError):  # what Python 3.12's isinstance() relies on
        inspect.getattr_static(bundle, "text_encoder")
    assert missing_members(bundle, LatentDiffusionModel) == []


def test_missing_members_are_named() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = nn.Identity()

    assert missing_members(Partial(), LatentDiffusionModel) == ["autoencoder", "denoiser", "save", "schedule",
                                                                "trainable"]  # `to` comes with nn.Module


def _protocols_with_data_members() -> set[str]:
    names = set()
    for name, obj in vars(interfaces).items():
        if isinstance(obj, type) and getattr(obj, "_is_runtime_protocol", False):
            if any(not callable(getattr(obj, m, None)) for m in protocol_members(obj)):
                names.add(name)
    return names


def test_no_isinstance_against_protocols_with_data_members() -> None:
    """A guard for Python 3.12+, which CI (3.11) would not catch: the source never calls
    isinstance(x, P) for an interfaces protocol P that has data members."""
    protocols = _protocols_with_data_members()
    assert "LatentDiffusionModel" in protocols
    offenders = []
    for root in ("core", "sdk", "plugins", "tests"):
        for path in (ROOT / root).rglob("*.py"):
            if "build" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                        and len(node.args) == 2):
                    for target in ast.walk(node.args[1]):
                        if isinstance(target, ast.Name) and target.id in protocols:
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_sd_model_conforms() -> None:
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    torch.manual_seed(0)
    assert missing_members(build_model(None, PRESETS["tiny"]), LatentDiffusionModel) == []
