"""GroupNorm (+SiLU) in Triton: forward and backward, registered as torch.library custom ops.

x (B, C, *spatial) is viewed without a copy as (B, C, L) with its own strides, so NCHW
(stride_l = 1) and channels_last (stride_c = 1) run the same kernels. A group of one sample is
cut into T tiles of (BLOCK_C channels x BLOCK_L positions); every kernel has one program per
(tile, sample * group), so even a batch of 2 with 32 groups fills the GPU.

Forward: (1) each tile writes its count-weighted mean and centred sum of squares; (2) each
tile merges its group's partials (Chan et al. parallel variance, no E[x^2]-E[x]^2 cancellation),
normalises, applies weight, bias and SiLU, and writes y in x's memory format. The second read of
x mostly hits L2 on SD-sized activations.
Backward: (1) per tile, the group sums of dxhat and dxhat*xhat and per-channel partial sums of
dweight and dbias; (2) dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
All statistics are float32; x, y and the gradients keep the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from t2i_engine.kernels._backend import grad_needed, next_power_of_2
from t2i_engine.kernels._triton_utils import dual_kernel

__all__ = ["TritonGroupNorm", "group_norm_backward", "group_norm_forward", "triton_group_norm"]

_MAX_TILES = 1024  # partials per group; bigger groups get longer tiles


@dual_kernel
def _gn_fwd_stats_kernel(
    X,  # (B, C, L) input, any strides
    MeanPart, M2Part,  # (B*G, T) float32 outputs: tile mean, tile centred sum of squares
    stride_xb, stride_xc, stride_xl,
    L, G, Cg, T,  # positions, groups, channels per group, tiles per group
    BLOCK_C: tl.constexpr,  # channels per tile (Cg padded to a power of two)
    BLOCK_L: tl.constexpr,  # positions per tile
):
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    offs_c = tl.arange(0, BLOCK_C)
    offs_l = pid_t * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (offs_c[:, None] < Cg) & (offs_l[None, :] < L)
    ptrs = X + b * stride_xb + (g * Cg + offs_c[:, None]) * stride_xc + offs_l[None, :] * stride_xl
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_L)
    n = (Cg * tl.minimum(BLOCK_L, L - pid_t * BLOCK_L)).to(tl.float32)
    mean = tl.sum(tl.sum(x, 1), 0) / n
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, 1), 0)
    tl.store(MeanPart + pid_bg * T + pid_t, mean)
    tl.store(M2Part + pid_bg * T + pid_t, m2)


@dual_kernel
def _gn_fwd_apply_kernel(
    X, Y,  # (B, C, L) input and output, each with its own strides
    W, Bias,  # (C,) scale and shift; unused unless HAS_WEIGHT / HAS_BIAS
    MeanPart, M2Part,  # (B*G, T) float32 partials from the stats kernel
    Mean, Rstd,  # (B*G,) float32 outputs, saved for the backward pass
    stride_xb, stride_xc, stride_xl,
    stride_yb, stride_yc, stride_yl,
    L, G, Cg, T,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_T: tl.constexpr,  # T padded to a power of two
):
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    # Merge the group's tile statistics (Chan et al.): every program does it, it is tiny.
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    part_mean = tl.load(MeanPart + pid_bg * T + offs_t, mask=t_ok, other=0.0)
    part_m2 = tl.load(M2Part + pid_bg * T + offs_t, mask=t_ok, other=0.0)
    part_n = tl.where(t_ok, Cg * tl.minimum(BLOCK_L, L - offs_t * BLOCK_L), 0).to(tl.float32)
    n_total = Cg * L * 1.0
    mean = tl.sum(part_n * part_mean, 0) / n_total
    dm = part_mean - mean
    var = tl.sum(part_m2 + part_n * dm * dm, 0) / n_total
    rstd = 1.0 / tl.sqrt(var + eps)

    offs_c = tl.arange(0, BLOCK_C)
    offs_l = pid_t * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_c < Cg
    mask = c_ok[:, None] & (offs_l[None, :] < L)
    chan = g * Cg + offs_c
    x = tl.load(X + b * stride_xb + chan[:, None] * stride_xc + offs_l[None, :] * stride_xl,
                mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd  # (BLOCK_C, BLOCK_L)
    if HAS_WEIGHT:
        w = tl.load(W + chan, mask=c_ok, other=1.0).to(tl.float32)
        y = y * w[:, None]
    if HAS_BIAS:
        bb = tl.load(Bias + chan, mask=c_ok, other=0.0).to(tl.float32)
        y = y + bb[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + b * stride_yb + chan[:, None] * stride_yc + offs_l[None, :] * stride_yl,
             y.to(Y.dtype.element_ty), mask=mask)
    if pid_t == 0:
        tl.store(Mean + pid_bg, mean)
        tl.store(Rstd + pid_bg, rstd)


@dual_kernel
def _gn_bwd_reduce_kernel(
    X, DY,  # (B, C, L) input and output gradient
    W, Bias,  # (C,) or unused
    Mean, Rstd,  # (B*G,) float32 from the forward pass
    S1Part, S2Part,  # (B*G, T) float32 outputs: tile sums of dxhat and dxhat * xhat
    DWPart, DBPart,  # (B, T, C) float32 outputs: per-channel tile sums for dweight, dbias
    stride_xb, stride_xc, stride_xl,
    stride_dyb, stride_dyc, stride_dyl,
    C, L, G, Cg, T,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    mean = tl.load(Mean + pid_bg)
    rstd = tl.load(Rstd + pid_bg)
    offs_c = tl.arange(0, BLOCK_C)
    offs_l = pid_t * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_c < Cg
    mask = c_ok[:, None] & (offs_l[None, :] < L)
    chan = g * Cg + offs_c
    x = tl.load(X + b * stride_xb + chan[:, None] * stride_xc + offs_l[None, :] * stride_xl,
                mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + b * stride_dyb + chan[:, None] * stride_dyc + offs_l[None, :] * stride_dyl,
                 mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if HAS_WEIGHT:
        w = tl.load(W + chan, mask=c_ok, other=1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if SILU:
        z = xhat * w[:, None]
        if HAS_BIAS:
            z = z + tl.load(Bias + chan, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
    dz = tl.where(mask, dz, 0.0)
    tl.store(DWPart + (b * T + pid_t) * C + chan, tl.sum(dz * xhat, 1), mask=c_ok)
    tl.store(DBPart + (b * T + pid_t) * C + chan, tl.sum(dz, 1), mask=c_ok)
    dxhat = dz * w[:, None]
    tl.store(S1Part + pid_bg * T + pid_t, tl.sum(tl.sum(dxhat, 1), 0))
    tl.store(S2Part + pid_bg * T + pid_t, tl.sum(tl.sum(dxhat * xhat, 1), 0))


@dual_kernel
def _gn_bwd_apply_kernel(
    X, DY, DX,  # (B, C, L) input, output gradient, input gradient (own strides each)
    W, Bias, Mean, Rstd,
    S1Part, S2Part,  # (B*G, T) float32 from the reduce kernel
    stride_xb, stride_xc, stride_xl,
    stride_dyb, stride_dyc, stride_dyl,
    stride_dxb, stride_dxc, stride_dxl,
    L, G, Cg, T,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    mean = tl.load(Mean + pid_bg)
    rstd = tl.load(Rstd + pid_bg)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    n_total = Cg * L * 1.0
    c1 = tl.sum(tl.load(S1Part + pid_bg * T + offs_t, mask=t_ok, other=0.0), 0) / n_total
    c2 = tl.sum(tl.load(S2Part + pid_bg * T + offs_t, mask=t_ok, other=0.0), 0) / n_total

    offs_c = tl.arange(0, BLOCK_C)
    offs_l = pid_t * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_c < Cg
    mask = c_ok[:, None] & (offs_l[None, :] < L)
    chan = g * Cg + offs_c
    x = tl.load(X + b * stride_xb + chan[:, None] * stride_xc + offs_l[None, :] * stride_xl,
                mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + b * stride_dyb + chan[:, None] * stride_dyc + offs_l[None, :] * stride_dyl,
                 mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    if HAS_WEIGHT:
        w = tl.load(W + chan, mask=c_ok, other=1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if SILU:
        z = xhat * w[:, None]
        if HAS_BIAS:
            z = z + tl.load(Bias + chan, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    dx = rstd * (dz * w[:, None] - c1 - xhat * c2)
    tl.store(DX + b * stride_dxb + chan[:, None] * stride_dxc + offs_l[None, :] * stride_dxl,
             dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration


def _tiling(Cg: int, L: int, device: torch.device) -> tuple[int, int, int, dict[str, int]]:
    """(BLOCK_C, BLOCK_L, T, launch options) for groups of Cg channels x L positions."""
    tile = 256 if device.type == "cpu" else 4096  # elements per program
    block_c = next_power_of_2(Cg)
    block_l = max(1, tile // block_c)
    block_l = min(block_l, next_power_of_2(L))
    block_l = max(block_l, next_power_of_2(triton.cdiv(L, _MAX_TILES)))
    opts = {} if device.type == "cpu" else {"num_warps": 8 if block_c * block_l >= 4096 else 4}
    return block_c, block_l, triton.cdiv(L, block_l), opts


def _as_bcl(x: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C, L), a view whenever the spatial dims can merge (NCHW and
    channels_last both can)."""
    B, C = x.shape[:2]
    try:
        return x.view(B, C, -1)
    except RuntimeError:  # spatial dims that no single stride describes
        return x.reshape(B, C, -1)


def _flags(weight: Tensor | None, bias: Tensor | None, silu: bool) -> dict[str, bool]:
    return {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": silu}


def group_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward kernels; returns (y like x, mean (B, G) float32, rstd (B, G) float32)."""
    B, C = x.shape[:2]
    G = num_groups
    Cg = C // G
    x3 = _as_bcl(x)  # (B, C, L)
    L = x3.shape[2]
    y = torch.empty_like(x)  # keeps x's memory format
    y3 = _as_bcl(y)
    block_c, block_l, T, opts = _tiling(Cg, L, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    mean_part, m2_part = torch.empty(B * G, T, **f32), torch.empty(B * G, T, **f32)
    mean, rstd = torch.empty(B, G, **f32), torch.empty(B, G, **f32)
    grid = (T, B * G)
    _gn_fwd_stats_kernel.on(x.device)[grid](
        x3, mean_part, m2_part, *x3.stride(), L, G, Cg, T, BLOCK_C=block_c, BLOCK_L=block_l, **opts
    )
    _gn_fwd_apply_kernel.on(x.device)[grid](
        x3, y3, weight if weight is not None else x3, bias if bias is not None else x3,
        mean_part, m2_part, mean, rstd, *x3.stride(), *y3.stride(), L, G, Cg, T, float(eps),
        **_flags(weight, bias, silu), BLOCK_C=block_c, BLOCK_L=block_l,
        BLOCK_T=next_power_of_2(T), **opts,
    )
    return y, mean, rstd


def group_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    mean: Tensor, rstd: Tensor, num_groups: int, silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernels; returns (dx like x, dweight, dbias). dweight/dbias are (C,) in
    the parameter's dtype, or empty (0,) tensors when that parameter is None."""
    B, C = x.shape[:2]
    G = num_groups
    Cg = C // G
    x3, dy3 = _as_bcl(x), _as_bcl(dy)
    L = x3.shape[2]
    dx = torch.empty_like(x)
    dx3 = _as_bcl(dx)
    block_c, block_l, T, opts = _tiling(Cg, L, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    s1_part, s2_part = torch.empty(B * G, T, **f32), torch.empty(B * G, T, **f32)
    dw_part, db_part = torch.empty(B, T, C, **f32), torch.empty(B, T, C, **f32)
    grid = (T, B * G)
    w_arg = weight if weight is not None else x3
    b_arg = bias if bias is not None else x3
    flags = _flags(weight, bias, silu)
    _gn_bwd_reduce_kernel.on(x.device)[grid](
        x3, dy3, w_arg, b_arg, mean, rstd, s1_part, s2_part, dw_part, db_part,
        *x3.stride(), *dy3.stride(), C, L, G, Cg, T, **flags,
        BLOCK_C=block_c, BLOCK_L=block_l, **opts,
    )
    _gn_bwd_apply_kernel.on(x.device)[grid](
        x3, dy3, dx3, w_arg, b_arg, mean, rstd, s1_part, s2_part,
        *x3.stride(), *dy3.stride(), *dx3.stride(), L, G, Cg, T, **flags,
        BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_T=next_power_of_2(T), **opts,
    )
    dweight = dw_part.sum((0, 1)).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = db_part.sum((0, 1)).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("t2i_engine::group_norm_fwd", mutates_args=())
def _group_norm_fwd_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return group_norm_forward(x, weight, bias, num_groups, eps, silu)


@_group_norm_fwd_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty(x.shape[0], num_groups, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("t2i_engine::group_norm_bwd", mutates_args=())
def _group_norm_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    mean: Tensor, rstd: Tensor, num_groups: int, silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return group_norm_backward(dy, x, weight, bias, mean, rstd, num_groups, silu)


@_group_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu):
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dweight, dbias


class TritonGroupNorm(torch.autograd.Function):
    """Autograd for the Triton GroupNorm: forward saves (x, weight, bias, mean, rstd); backward
    recomputes xhat. ``setup_context``/``backward`` are also registered as the autograd formula
    of ``t2i_engine::group_norm_fwd``; ``apply`` returns (y, mean, rstd)."""

    @staticmethod
    def forward(x, weight, bias, num_groups, eps, silu):  # type: ignore[override]
        return torch.ops.t2i_engine.group_norm_fwd(x, weight, bias, num_groups, eps, silu)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, num_groups, _, silu = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        ctx.silu = silu

    @staticmethod
    def backward(ctx, dy, dmean, drstd):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.t2i_engine.group_norm_bwd(
            dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu
        )
        return dx, (dweight if weight is not None else None), (dbias if bias is not None else None), None, None, None


torch.library.register_autograd(
    "t2i_engine::group_norm_fwd", TritonGroupNorm.backward, setup_context=TritonGroupNorm.setup_context
)


class _EagerGroupNorm(torch.autograd.Function):
    """Eager autograd straight onto the launchers. On an H200 a forward+backward through the custom
    op took 1.14 ms of host time at a tiny shape (eager PyTorch: 0.30 ms), most of it in the
    backward's ``register_autograd`` node by torch.profiler, and autograd filled zero gradients
    for ``mean``/``rstd`` that nothing uses; here ``y`` is the only output. torch.compile traces
    the custom op instead (:func:`triton_group_norm`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):  # type: ignore[override]
        y, mean, rstd = group_norm_forward(x, weight, bias, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = group_norm_backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
        return dx, (dweight if weight is not None else None), (dbias if bias is not None else None), None, None, None


def triton_group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    silu: bool = False,
) -> Tensor:
    """GroupNorm (+SiLU) through the Triton kernels (CUDA, or CPU under the interpreter).

    Under ``torch.compile`` it is the ``t2i_engine::group_norm_fwd`` custom op; in eager mode the
    launchers are called directly (the same kernels and formulas, less host time per call)."""
    if torch.compiler.is_compiling():
        y, _, _ = torch.ops.t2i_engine.group_norm_fwd(x, weight, bias, num_groups, eps, silu)
        return y
    if not grad_needed(x, weight, bias):
        return group_norm_forward(x, weight, bias, num_groups, eps, silu)[0]
    return _EagerGroupNorm.apply(x, weight, bias, num_groups, eps, silu)
