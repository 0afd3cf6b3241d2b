"""MiDaS v3.0 DPT-Hybrid (Ranftl, Bochkovskiy & Koltun 2021, "Vision Transformers for Dense
Prediction", arXiv 2103.13413) on timm 1.x: the depth annotator of ControlNet's depth models.

The original code (isl-org/MiDaS ``midas/dpt_depth.py``, ``blocks.py``, ``vit.py``) patches a
timm 0.4 ``vit_base_resnet50_384`` with forward hooks and injected methods and breaks on timm
>= 0.9. Here the same network is written out: timm 1.x's ``vit_base_r50_s16_384`` (its
parameter names are those of the old model) read by an explicit forward, the DPT reassemble
layers, the four fusion blocks and the depth head. Parameter names are the original file's
(``pretrained.model.*``, ``pretrained.act_postprocess{3,4}.*``, ``scratch.*``), so the user's
``dpt_hybrid-midas-501f0c75.pt`` loads strictly; only the unused ImageNet classifier
(``pretrained.model.head.*``) is dropped.

The hint (lllyasviel's ``MidasDetector``): the image in [-1, 1] at about 384 pixels (sides
multiples of 64), the predicted relative inverse depth scaled per image to [0, 1], resized back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.errors import CheckpointError

__all__ = ["MIDAS_FILE", "DPTHybrid", "load_midas", "midas_depth_hint"]

MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"
_UNUSED = ("pretrained.model.head.",)  # the ImageNet classifier of the backbone: no part of the depth network
_VIT_WIDTH, _PATCH = 768, 16


class ProjectReadout(nn.Module):
    """DPT's "project" readout: each patch token concatenated with the class token, projected back."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, tokens: Tensor) -> Tensor:  # (B, 1 + N, D) -> (B, N, D)
        readout = tokens[:, :1].expand_as(tokens[:, 1:])
        return self.project(torch.cat([tokens[:, 1:], readout], dim=-1))


def _reassemble(*convs: nn.Module) -> nn.Sequential:
    """``act_postprocess{3,4}``: readout, (transpose, unflatten: done in the forward), convs; the
    indices are the original's."""
    return nn.Sequential(ProjectReadout(_VIT_WIDTH), nn.Identity(), nn.Identity(), *convs)


class ResidualConvUnit(nn.Module):
    """ReLU, 3x3 conv, ReLU, 3x3 conv, plus the input."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """DPT's feature fusion: add the refined skip, refine, upsample (bilinear, align_corners), 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, *, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, size=size, scale_factor=None if size else 2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Upsample2x(nn.Module):
    """Bilinear x2 with aligned corners (the head's ``Interpolate``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class DPTHybrid(nn.Module):
    """``(B, 3, H, W)`` in [-1, 1] (H, W multiples of 32) -> relative inverse depth ``(B, H, W)`` >= 0."""

    def __init__(self, features: int = 256) -> None:
        super().__init__()
        import timm

        self.pretrained = nn.Module()
        self.pretrained.model = timm.create_model("vit_base_r50_s16_384", pretrained=False, num_classes=0)
        self.pretrained.act_postprocess3 = _reassemble(nn.Conv2d(_VIT_WIDTH, _VIT_WIDTH, 1))
        self.pretrained.act_postprocess4 = _reassemble(nn.Conv2d(_VIT_WIDTH, _VIT_WIDTH, 1),
                                                       nn.Conv2d(_VIT_WIDTH, _VIT_WIDTH, 3, stride=2, padding=1))
        self.scratch = nn.Module()
        for i, width in enumerate((256, 512, _VIT_WIDTH, _VIT_WIDTH), 1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(width, features, 3, padding=1, bias=False))
            setattr(self.scratch, f"refinenet{i}", FusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1), Upsample2x(),
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity())

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        """The position embedding resized to a ``gh x gw`` patch grid (bilinear), class token kept."""
        pos = self.pretrained.model.pos_embed  # (1, 1 + n * n, D)
        n = int(math.sqrt(pos.shape[1] - 1))
        grid = pos[0, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid], dim=1)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The four feature maps DPT reassembles: ResNet stages 1 and 2 (strides 4, 8), ViT blocks 9
        and 12 (strides 16, 32)."""
        vit = self.pretrained.model
        backbone = vit.patch_embed.backbone
        b, _, h, w = x.shape
        layer1 = backbone.stages[0](backbone.stem(x))  # (B, 256, H/4, W/4)
        layer2 = backbone.stages[1](layer1)  # (B, 512, H/8, W/8)
        feats = backbone.norm(backbone.stages[2](layer2))
        tokens = vit.patch_embed.proj(feats).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(h // _PATCH, w // _PATCH)
        outs = {}
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i in (8, 11):
                outs[i] = tokens
        maps = []
        for post, i in ((self.pretrained.act_postprocess3, 8), (self.pretrained.act_postprocess4, 11)):
            t = post[0](outs[i]).transpose(1, 2)  # (B, D, N)
            maps.append(post[3:](t.unflatten(2, (h // _PATCH, w // _PATCH))))
        return [layer1, layer2, *maps]

    def forward(self, x: Tensor) -> Tensor:
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(f) for i, f in enumerate(self.encode(x), 1))
        path = s.refinenet4(l4, size=l3.shape[2:])
        path = s.refinenet3(path, l3, size=l2.shape[2:])
        path = s.refinenet2(path, l2, size=l1.shape[2:])
        path = s.refinenet1(path, l1)
        return s.output_conv(path).squeeze(1)


def midas_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The original file's tensors without the nesting of training checkpoints and the unused classifier."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    return {k: v for k, v in state.items() if not k.startswith(_UNUSED)}


def load_midas(path: str) -> DPTHybrid:
    """DPT-Hybrid from the user's ``dpt_hybrid-midas-501f0c75.pt`` (weights-only pickle, strict)."""
    from t2i_engine.checkpoint.io import load_state_dict_strict

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file; the depth_midas annotator needs {MIDAS_FILE} "
                              "(MiDaS v3.0 DPT-Hybrid; nothing is downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = DPTHybrid()
    load_state_dict_strict(net, midas_state_dict(state), source=path)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def midas_depth_hint(net: DPTHybrid, image: Tensor, *, resolution: int = 384) -> Tensor:
    """The depth hint of ``image`` ``(B, 3, H, W)`` in [0, 1]: the net run at ``resolution`` on the
    short side (sides rounded to multiples of 64), depth min-max scaled to [0, 1] per image, resized
    to ``H x W``, in three channels."""
    b, _, h, w = image.shape
    k = resolution / min(h, w)
    size = (max(64, round(h * k / 64) * 64), max(64, round(w * k / 64) * 64))
    param = next(net.parameters())
    x = F.interpolate(image.to(param), size=size, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    depth = net(x)  # (B, h', w')
    flat = depth.flatten(1)
    lo, hi = flat.amin(1).view(b, 1, 1), flat.amax(1).view(b, 1, 1)
    depth = (depth - lo) / (hi - lo).clamp_min(1e-8)
    depth = F.interpolate(depth[:, None], size=(h, w), mode="bilinear", align_corners=False)
    return depth.clamp(0, 1).to(image.dtype).expand(-1, 3, -1, -1)
