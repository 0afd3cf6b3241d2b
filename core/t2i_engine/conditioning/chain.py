"""The conditioner chain: every ``[[conditioners]]`` entry of a run around one denoiser network.

:class:`ConditionerChain` holds the built conditioners in the declared order with their core keys
(scale, window, branch). Per generation :meth:`ConditionerChain.condition` asks each for its
extras on both guidance branches; :meth:`ConditionerChain.compose` gives the
:class:`ConditionedNet` the core calls instead of the raw network. At each network evaluation
the composed net

* leaves out every entry outside its step window or at ``scale = 0`` (the keys it added are
  removed, its ``residuals`` are not called: the output is exactly the unconditioned one);
* sums the active entries' residuals times their scale (multi-ControlNet), zeroed on the rows of
  a guidance branch an entry does not apply to;
* calls the network once per group of rows that must see different extras (only when an entry
  without residuals is restricted to one branch), else once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from t2i_engine.conditioning.config import ConditionerKeys
from t2i_engine.conditioning.window import StepClock
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import ConditionInputs, Conditioning, Residuals

__all__ = ["ConditionedNet", "ConditionerChain", "Entry"]


@dataclass
class Entry:
    """One built conditioner, its core keys and a label naming it in errors."""

    conditioner: Any
    keys: ConditionerKeys = field(default_factory=ConditionerKeys)
    label: str = "conditioner"
    added: set[str] = field(default_factory=set)  # extras keys its condition() added this generation

    @property
    def has_residuals(self) -> bool:
        return callable(getattr(self.conditioner, "residuals", None))

    def applies_to(self, conditional: bool) -> bool:
        return self.keys.branch == "both" or (self.keys.branch == "cond") == conditional


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class ConditionerChain(nn.Module):
    """The run's conditioners in declared order (an ``nn.Module``, so conditioners that are
    modules move with it and their parameters train)."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        super().__init__()
        self.entries = list(entries)
        self.modules_ = nn.ModuleList(e.conditioner for e in self.entries if isinstance(e.conditioner, nn.Module))
        self.clock = StepClock()
        self._loaded: dict[tuple[int, str, int, int], Tensor] = {}  # inputs' files, by (entry, name, h, w)
        self._given: dict[tuple[int, str], Tensor] = {}  # set_images(): tensors by (entry, name)
        self._composed: dict[int, ConditionedNet] = {}

    def entry_index(self, entry: int | str) -> int:
        """The position of ``entry``: its index, or the label of exactly one entry."""
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 0 <= entry < len(self.entries):
                raise ValueError(f"conditioners: no entry {entry} (the chain has {len(self.entries)})")
            return entry
        found = [i for i, e in enumerate(self.entries) if e.label == entry]
        if len(found) != 1:
            labels = ", ".join(repr(e.label) for e in self.entries) or "none"
            raise ValueError(f"conditioners: {len(found)} entries are labelled {entry!r} (labels: {labels}); "
                             "give the entry's index")
        return found[0]

    def set_images(self, entry: int | str, name: str, images: Tensor | None) -> None:
        """Give ``entry``'s input ``name`` as a tensor instead of a file: ``(B, C, H, W)``, one
        image per sample of the following generations (or ``(1, C, H, W)`` for every sample), in
        the range the entry's files load to ([-1, 1]), at the output size (not resized). It
        replaces the file the entry's ``inputs`` names under ``name``, or adds the input. Checked
        when a generation (or a training batch) uses it: ``B`` must be its batch size or 1, ``H``
        and ``W`` its height and width, else a ConfigError. ``None`` removes it again.

        This is how a task gives every sample its own hint (``controlnet-eval``): row ``i`` of
        ``images`` goes with prompt ``i``, exactly as if that sample were generated alone with
        that image as its file."""
        i = self.entry_index(entry)
        if images is None:
            self._given.pop((i, name), None)
            return
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            what = f"a {images.ndim}-d {images.dtype} tensor" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{self.entries[i].label}: inputs.{name} must be a floating-point (B, C, H, W) "
                             f"tensor, got {what}")
        self._given[(i, name)] = images

    def clear_inputs(self) -> None:
        """Forget every loaded input file and every :meth:`set_images` tensor: the next
        generation reads the files the entries' ``inputs`` name (now) again."""
        self._loaded.clear()
        self._given.clear()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the conditioners that require grad (the train task adds them to the optimizer)."""
        yield from (p for p in self.modules_.parameters() if p.requires_grad)

    def compose(self, net: Any) -> ConditionedNet:
        """The network with the chain around it (built once per network and kept)."""
        if id(net) not in self._composed:
            self._composed[id(net)] = ConditionedNet(net, self)
        return self._composed[id(net)]

    def _images(self, i: int, entry: Entry, *, height: int, width: int, batch: int,
                device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        from t2i_engine.conditioning.inputs import load_input

        out = {}
        names = list(entry.keys.inputs) + [n for (j, n) in self._given if j == i and n not in entry.keys.inputs]
        for name in names:
            if (i, name) in self._given:
                value = self._given[(i, name)]
                if value.shape[0] not in (1, batch) or tuple(value.shape[-2:]) != (height, width):
                    raise ConfigError(f"{entry.label}: inputs.{name} was given {value.shape[0]} images of "
                                      f"{tuple(value.shape[-2:])} pixels (set_images) for a batch of {batch} at "
                                      f"{(height, width)}: give one per sample (or one for all) at the output size")
            else:
                cache = (i, name, height, width)
                if cache not in self._loaded:
                    self._loaded[cache] = load_input(entry.keys.inputs[name], width=width, height=height,
                                                     key=f"conditioners[{i}].inputs.{name}")
                value = self._loaded[cache]
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
            out[name] = value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value
        return out

    def _condition_entry(self, entry: Entry, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        fn = getattr(entry.conditioner, "condition", None)
        if not callable(fn) or entry.keys.scale == 0:
            return cond
        out = fn(cond, inputs)
        if not isinstance(out, Conditioning):
            raise TypeError(f"{entry.label}: condition() must return a Conditioning, got {type(out).__name__}")
        changed = [k for k in cond.extras if out.extras.get(k) is not cond.extras[k]]
        if changed or out.text is not cond.text:
            what = f"the extras key '{changed[0]}'" if changed else "the text embedding"
            raise ConfigError(f"{entry.label}: condition() changed {what}; a conditioner may only add "
                              "new extras keys (cond.with_extras(name=tensor))")
        added = {k: v for k, v in out.extras.items() if k not in cond.extras}
        if not entry.has_residuals and entry.keys.scale != 1:  # the scale acts on what it adds
            added = {k: v * entry.keys.scale if v.is_floating_point() else v for k, v in added.items()}
        entry.added |= set(added)
        return Conditioning(text=cond.text, extras={**cond.extras, **added}, branch=cond.branch)

    def _condition_one(self, cond: Conditioning, *, branch: str, prompts: list[str], height: int, width: int,
                       device: torch.device, dtype: torch.dtype, batch: Mapping[str, Any] | None) -> Conditioning:
        for i, entry in enumerate(self.entries):
            images = self._images(i, entry, height=height, width=width, batch=len(prompts), device=device, dtype=dtype)
            inputs = ConditionInputs(branch=branch, prompts=prompts,  # type: ignore[arg-type]
                                     height=height, width=width, device=device, dtype=dtype, images=images, batch=batch)
            cond = self._condition_entry(entry, cond, inputs)
        return cond

    def condition(self, cond: Conditioning, uncond: Conditioning, *, prompts: Sequence[str],
                  negative_prompts: Sequence[str], height: int, width: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[Conditioning, Conditioning]:
        """``(cond, uncond)`` with every conditioner's extras added, in declared order."""
        for entry in self.entries:
            entry.added = set()
        kw: dict[str, Any] = {"height": height, "width": width, "device": device, "dtype": dtype, "batch": None}
        cond = self._condition_one(cond, branch="cond", prompts=list(prompts), **kw)
        uncond = self._condition_one(uncond, branch="uncond", prompts=list(negative_prompts), **kw)
        if set(cond.extras) != set(uncond.extras):
            raise ConfigError("conditioners: condition() added different extras keys on the cond and uncond "
                              f"branches ({sorted(cond.extras)} vs {sorted(uncond.extras)}); add the same keys "
                              "on both (a neutral value on the branch it does not steer)")
        return cond, uncond

    def condition_batch(self, cond: Conditioning, batch: Mapping[str, Any], *, prompts: Sequence[str],
                        height: int, width: int) -> Conditioning:
        """Training: ``cond`` with every conditioner's extras for a collated ``batch`` (its extra
        fields, e.g. ``hint``, reach ``condition()`` as ``inputs.batch``; the entry's ``inputs``
        from the job, when it names any, as ``inputs.images``)."""
        for entry in self.entries:
            entry.added = set()
        ref = cond.text.tokens if cond.text is not None else next(iter(cond.extras.values()))
        return self._condition_one(cond, branch="cond", prompts=list(prompts), height=height, width=width,
                                   device=ref.device, dtype=ref.dtype, batch=batch)

    def clocked(self, callback: Callable[[dict[str, Any]], None] | None, *,
                total: int) -> Callable[[dict[str, Any]], None]:
        """Start a sampler run of ``total`` steps (see :meth:`StepClock.clocked`)."""
        return self.clock.clocked(callback, total=total)


class ConditionedNet:
    """The denoiser network with a :class:`ConditionerChain` around it: ``(x_t, t, cond) -> output``
    with the same ``prediction``; the core calls this instead of the raw network."""

    def __init__(self, net: Any, chain: ConditionerChain) -> None:
        self.net, self.chain = net, chain
        self.prediction = net.prediction

    def __getattr__(self, name: str) -> Any:  # e.g. sigma_data, parameters(): the network's own
        if name in ("net", "chain"):  # not set yet (a copy being built): no recursion through self.net
            raise AttributeError(name)
        return getattr(self.net, name)

    def _active(self) -> list[Entry]:
        clock = self.chain.clock
        return [e for e in self.chain.entries
                if e.keys.scale != 0 and clock.open(start=e.keys.start, end=e.keys.end)]

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``x_t`` ``(N, ...)``, ``t`` ``(N,)`` -> network output ``(N, ...)``."""
        active = self._active()
        if not active and not any(e.added for e in self.chain.entries):
            return self.net(x_t, t, cond)
        flags = cond.branch.cpu() if cond.branch is not None else torch.ones(x_t.shape[0], dtype=torch.bool)
        present = {flag for flag in (True, False) if bool((flags == flag).any())}  # branches in this batch
        # entries whose extras reach the net directly are gated by splitting the rows, exactly
        direct = {flag: tuple(id(e) for e in active if not e.has_residuals and e.applies_to(flag)) for flag in present}
        if len(set(direct.values())) > 1:
            out = torch.empty_like(x_t)
            t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
            for flag in present:
                rows = (flags == flag).nonzero().squeeze(1).to(x_t.device)
                part = self._run(x_t[rows], t[rows], cond.rows(rows), active, flags[flags == flag], {flag})
                out[rows] = part.to(out.dtype)
            return out
        return self._run(x_t, t, cond, active, flags, present)

    @staticmethod
    def _residuals(entry: Entry, x_t: Tensor, t: Tensor, cond: Conditioning, rows: Tensor | None) -> Residuals:
        """``entry``'s residuals times its scale, computed on ``rows`` only (None: every row) and
        zero on the others."""
        n = x_t.shape[0]
        if rows is not None:
            t = t.expand(n) if t.ndim == 0 else t
            x_t, t, cond = x_t[rows], t[rows], cond.rows(rows)
        res = entry.conditioner.residuals(x_t, t, cond)
        if not isinstance(res, Residuals):
            raise TypeError(f"{entry.label}: residuals() must return a Residuals, got {type(res).__name__}")
        scale = entry.keys.scale

        def place(r: Tensor | None) -> Tensor | None:
            if r is None:
                return None
            r = r * scale if scale != 1 else r
            if rows is None:
                return r
            full = r.new_zeros((n, *r.shape[1:]))
            full[rows] = r
            return full

        down = None if res.down is None else [place(r) for r in res.down]
        return Residuals(down=down, mid=place(res.mid))  # type: ignore[arg-type]

    def _run(self, x_t: Tensor, t: Tensor, cond: Conditioning, active: list[Entry], flags: Tensor,
             present: set[bool]) -> Tensor:
        here = [e for e in active if any(e.applies_to(f) for f in present)]
        keep = set().union(*(e.added for e in here)) if here else set()
        dropped = set().union(*(e.added for e in self.chain.entries)) - keep
        if dropped:
            cond = Conditioning(text=cond.text, extras={k: v for k, v in cond.extras.items() if k not in dropped},
                                branch=cond.branch)
        down: list[Tensor] | None = None
        mid: Tensor | None = None
        for entry in here:
            if not entry.has_residuals:
                continue
            # rows of a branch it does not apply to: not computed at all (guess mode runs the
            # ControlNet on the cond half only, as diffusers does) and given exact zeros
            rows = None if all(entry.applies_to(f) for f in present) else \
                (flags if entry.keys.branch == "cond" else ~flags).to(x_t.device).nonzero().squeeze(1)
            res = self._residuals(entry, x_t, t, cond, rows)
            if res.down is not None:
                down = res.down if down is None else [a + b for a, b in zip(down, res.down, strict=True)]
            mid = _add(mid, res.mid)
        kwargs: dict[str, Any] = {}
        if down is not None:
            kwargs["down_residuals"] = down
        if mid is not None:
            kwargs["mid_residual"] = mid
        return self.net(x_t, t, cond, **kwargs)
