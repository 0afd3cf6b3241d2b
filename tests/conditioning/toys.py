"""Toy conditioners and a toy network whose outputs are known in closed form."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from t2i_engine.conditioning import ConditionerChain, ConditionerKeys, Entry
from t2i_engine.interfaces import ConditionInputs, Conditioning, DenoiserNet, Residuals


class SumNet(DenoiserNet):
    """``out = mid_residual + extras["offset"]`` (zeros without them); records its calls."""

    prediction = "eps"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, *,  # type: ignore[override]
                down_residuals: list[Tensor] | None = None, mid_residual: Tensor | None = None) -> Tensor:
        self.calls.append({"rows": x_t.shape[0], "keys": sorted(cond.extras), "mid": mid_residual is not None})
        out = torch.zeros_like(x_t)
        if mid_residual is not None:
            out = out + mid_residual
        if "offset" in cond.extras:
            out = out + cond.extras["offset"]
        return out


class ResidualOffset:
    """Residuals only: a mid residual of ``value`` everywhere."""

    def __init__(self, value: float = 1.0) -> None:
        self.value, self.calls, self.rows = value, 0, []

    def residuals(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Residuals:
        self.calls += 1
        self.rows.append(x_t.shape[0])
        return Residuals(mid=torch.full_like(x_t, self.value))


class ExtraOffset:
    """condition() only: adds ``extras["offset"] = value`` (broadcast over the latents)."""

    def __init__(self, value: float = 1.0, key: str = "offset", source: str | None = None) -> None:
        self.value, self.key, self.source = value, key, source
        self.seen: list[ConditionInputs] = []

    def condition(self, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        self.seen.append(inputs)
        base = cond.extras[self.source] if self.source else torch.ones(inputs.batch_size, 1, 1, 1)
        return cond.with_extras(**{self.key: base * self.value})


class LearnedOffset(nn.Module):
    """A trainable mid residual ``weight * hint.mean()``: its hint comes from the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def condition(self, cond: Conditioning, inputs: ConditionInputs) -> Conditioning:
        hint = inputs.batch["hint"] if inputs.batch is not None else inputs.images["hint"]
        return cond.with_extras(learned_hint=hint.mean(dim=(1, 2, 3), keepdim=True).to(inputs.dtype))

    def residuals(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Residuals:
        h, w = ((n + 1) // 2 for n in x_t.shape[-2:])  # the shapes-64 UNet's middle: 128 channels, half size
        return Residuals(mid=self.weight * cond.extras["learned_hint"].expand(-1, 128, h, w))


def chain(*items: tuple[Any, dict[str, Any]]) -> ConditionerChain:
    """A chain of ``(conditioner, core keys)`` in this order."""
    return ConditionerChain([Entry(c, keys=ConditionerKeys(**keys), label=f"toy[{i}]")
                             for i, (c, keys) in enumerate(items)])


def branches(cond_rows: int, uncond_rows: int) -> Conditioning:
    """A conditioning of guidance's batch: ``uncond_rows`` unconditional rows then the conditional ones."""
    flags = torch.tensor([False] * uncond_rows + [True] * cond_rows)
    return Conditioning(branch=flags)


def conditioned(ch: ConditionerChain, b: int = 2) -> tuple[Conditioning, Conditioning]:
    """``(cond, uncond)`` of batch ``b`` after the chain's condition()."""
    c = Conditioning(branch=torch.ones(b, dtype=torch.bool))
    u = Conditioning(branch=torch.zeros(b, dtype=torch.bool))
    return ch.condition(c, u, prompts=["p"] * b, negative_prompts=[""] * b, height=8, width=8,
                        device=torch.device("cpu"), dtype=torch.float32)
