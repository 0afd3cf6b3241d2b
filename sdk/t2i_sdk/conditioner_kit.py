"""Behavioural conformance checks for a conditioner (re-exported by :mod:`t2i_sdk.testing`).

:func:`check_conditioner` drives a registered conditioner the way a job does, through the core's
own config loader, chain and composed network, on a tiny model (:func:`t2i_sdk.toy_model.tiny_model`
unless the plugin passes its own), and raises AssertionError with a message saying what failed.
"""

from __future__ import annotations

import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import torch
from torch import Tensor

from t2i_engine.conditioning import ConditionerChain, Entry, check_conditioner as _check_methods
from t2i_engine.config.loader import resolve_config
from t2i_engine.config.render import render_toml
from t2i_engine.errors import T2IError
from t2i_engine.interfaces import Conditioning
from t2i_engine.pipeline import mark_branches

__all__ = ["check_conditioner"]


def _fail(label: str, what: str) -> AssertionError:
    return AssertionError(f"{label}: {what}")


def _save_images(images: Mapping[str, Tensor], folder: Path) -> dict[str, str]:
    from t2i_engine.utils.images import save_png, to_pil

    paths = {}
    for name, image in images.items():
        paths[name] = str(folder / f"{name}.png")
        save_png(to_pil(image[:1].float())[0], paths[name])
    return paths


def _resolve(pm: Any, entry: dict[str, Any], label: str) -> Any:
    data = {"task": {"name": "sample-grid", "prompts": ["x"]}, "conditioners": [entry]}
    try:
        config = resolve_config(data, pm)
    except T2IError as exc:
        raise _fail(label, f"its config does not load: {exc}") from exc
    again = resolve_config(tomllib.loads(render_toml(config)), pm)  # what `t2i-engine config` prints, read back
    first, second = config.conditioners[0], again.conditioners[0]
    if (first.options, first.keys) != (second.options, second.keys):
        raise _fail(label, f"its config does not round-trip through `t2i-engine config`: {first.options!r} "
                    f"was printed and read back as {second.options!r}")
    return first


def _noise(model: Any, *, seed: int = 0) -> Tensor:
    """Latents of guidance's batch for 2 prompts: 2 unconditional rows, then 2 conditional ones."""
    return torch.randn(4, model.autoencoder.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def _evaluate(model: Any, chain: ConditionerChain | None, *, x: Tensor, step: tuple[int, int] | None) -> Tensor:
    """One guided-batch network evaluation of ``x`` (uncond rows, then cond rows) through the chain."""
    batch = x.shape[0] // 2
    f = model.autoencoder.downsample_factor
    t = torch.full((2 * batch,), 500.0)
    prompts = [f"prompt {i}" for i in range(batch)]
    cond = Conditioning(text=model.text_encoder.encode(prompts))
    uncond = Conditioning(text=model.text_encoder.encode([""] * batch))
    cond, uncond = mark_branches(cond, uncond)
    net: Any = model.denoiser
    if chain is not None:
        cond, uncond = chain.condition(cond, uncond, prompts=prompts, negative_prompts=[""] * batch,
                                       height=x.shape[-2] * f, width=x.shape[-1] * f, device=x.device, dtype=x.dtype)
        net = chain.compose(model.denoiser)
        if step is not None:
            chain.clocked(None, total=step[1])
            chain.clock.step = step[0]
    try:
        with torch.no_grad():
            return net(x, t, Conditioning.cat([uncond, cond]))
    finally:
        if chain is not None:
            chain.clock.stop()


def check_conditioner(module: ModuleType | object, conditioner: str, *, options: Mapping[str, Any] | None = None,
                      images: Mapping[str, Tensor] | None = None, model: Any = None,
                      plugin_name: str = "under-test", scale: float = 1.0) -> None:
    """Check the behaviour of the conditioner registered as ``conditioner`` by ``module``.

    It must: load from a ``[[conditioners]]`` table with ``options`` (its own keys) and round-trip
    through ``t2i-engine config``; build and ``setup(model)``; implement ``condition`` or
    ``residuals``; change the network output at ``scale`` (> 0) on guidance's conditional rows, and
    not at all at scale 0 (exactly the output of the model before ``setup``: a conditioner that
    patches the network is caught); give each row of a batch of 2 (and of the CFG batch of 4) what
    that row gives alone; act at a step inside its ``start``/``end`` window and not (exactly) at a
    step outside. ``images`` are its named inputs ``(1, 3, H, W)`` in [-1, 1] (written to PNG
    files and given as the entry's ``inputs``); ``model`` defaults to the SDK's tiny model.
    """
    from t2i_sdk.testing import plugin_manager_with
    from t2i_sdk.toy_model import tiny_model

    label = f"conditioner '{conditioner}'"
    pm = plugin_manager_with(module, name=plugin_name)
    model = model if model is not None else tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = _save_images(images or {}, Path(tmp))
        entry = {"type": conditioner, **(options or {}), **({"inputs": inputs} if inputs else {})}
        component = _resolve(pm, entry, label)

        x = _noise(model)
        plain = _evaluate(model, None, x=x, step=None)  # before setup(model): it must not change the model
        try:  # built once, as a run builds it; each chain below only changes the core keys
            obj = pm.build(component)
            _check_methods(obj, label=label)
            if callable(getattr(obj, "setup", None)):
                obj.setup(model)
        except T2IError as exc:
            raise _fail(label, str(exc)) from exc

        def chain(**keys: Any) -> ConditionerChain:
            return ConditionerChain([Entry(obj, keys=attrs.evolve(component.keys, **keys), label=label)])

        steered = _evaluate(model, chain(scale=scale), x=x, step=None)
        if steered.shape != plain.shape or not bool(steered.isfinite().all()):
            raise _fail(label, f"the output has shape {tuple(steered.shape)} or non-finite values "
                        f"(expected {tuple(plain.shape)}, finite)")
        rows = slice(2, 4) if component.keys.branch != "uncond" else slice(0, 2)
        if torch.equal(steered[rows], plain[rows]):
            raise _fail(label, f"at scale {scale} it does not change the denoiser output")
        if not torch.equal(_evaluate(model, chain(scale=0.0), x=x, step=None), plain):
            raise _fail(label, "at scale 0 the denoiser output is not exactly the unconditioned one")
        alone = _evaluate(model, chain(scale=scale), x=x[[0, 2]], step=None)
        if not torch.allclose(alone, steered[[0, 2]], atol=1e-4, rtol=1e-4):
            raise _fail(label, "in a batch of 2 (CFG batch of 4) a row differs from the same row alone: "
                        "it mixes rows or ignores the batch size")
        late = chain(scale=scale, start=0.5, end=1.0)
        if not torch.equal(_evaluate(model, late, x=x, step=(0, 4)), plain):
            raise _fail(label, "with start = 0.5 it still acts at the first of 4 steps")
        if torch.equal(_evaluate(model, late, x=x, step=(3, 4))[rows], plain[rows]):
            raise _fail(label, "with start = 0.5 it does not act at the last of 4 steps")
