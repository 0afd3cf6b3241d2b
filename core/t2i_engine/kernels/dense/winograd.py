"""3x3 convolutions as Winograd F(4x4, 3x3) on the CPU: fewer multiplications, the same convolution.

A direct 3x3 convolution spends 9 multiply-adds per output pixel and input channel. Winograd's
minimal filtering algorithm (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
2016) computes each 4x4 output tile from a 6x6 input tile with 36: the input tile and the
weight are each taken into a 6x6 "transformed" space by fixed matrices (``B``, ``G``), multiplied
there element by element, summed over input channels (36 GEMMs of tiles x in -> out), and brought
back by a third fixed matrix (``A``). So the GEMM work is 36/144 = 1/4 of the direct
convolution's, plus transforms that are linear in the activation and weight sizes.

The float32 UNet of SD-1.5 already runs its direct convolutions at this CPU core's GEMM peak
(docs/benchmarks.md): less arithmetic is the only way left to run them faster. Measured on the
AMD EPYC (Zen 4) of docs/benchmarks.md, one thread, against oneDNN's convolution on a weight packed
for the input's shape, with the weight transform paid on every call (so no weight copy is kept):

=======================  =====  =================
input -> out             tiles  Winograd / oneDNN
=======================  =====  =================
2x320x32x32 -> 320       128    0.55
2x640x32x32 -> 640       128    0.52
1x512x32x32 -> 512       64     0.70
1x512x64x64 -> 512       256    0.58
1x256x64x64 -> 256       256    0.58
1x128x256x256 -> 128     4096   0.54
1x64x64x64 -> 64         256    0.91
2x320x16x16 -> 320       32     0.86-0.87 (not taken)
2x1280x16x16 -> 1280     32     0.85-0.95 (not taken)
1x512x16x16 -> 512       16     1.33 (not taken)
1x128x128x128 -> 3       1024   1.16 (not taken: 3 output channels)
=======================  =====  =================

The per-call weight transform weighs most where there are few tiles, so the path takes only
convolutions with at least :data:`MIN_TILES` output tiles and :data:`MIN_CHANNELS` channels on
both sides (:func:`winograd_applies`). Autograd differentiates it (its ops are pads, views, GEMMs
and copies); in training, where the weight gradient's transforms are paid too, it gains from
:data:`MIN_TRAIN_TILES` tiles. Float32 only: the transforms' coefficients (up to 5 in ``B``, 8 in
``A``) amplify rounding, which float32's 24-bit mantissa absorbs (max error 5-9e-6 of the
output's largest value, against 2e-6 for oneDNN's direct convolution, both against float64) and
bf16's 8 bits would not.

Tiles are processed in bands of about :data:`BAND_BYTES` of transformed input (2.25x the input it
stands for), each padded on its own, and output channels in chunks of about :data:`CHUNK_BYTES` of
transformed weight (4x the weight) or products (2.25x the output). That keeps the temporaries
bounded on a VAE's 512x512 layers (an SD-1.5 generation at 128 px, whose peak is the decoder's,
peaked 161-177 MiB above its weights without the path, 202-213 MiB with a whole padded copy of the
input and 24 MiB bands, 168-187 MiB as it is now) and below the size from which glibc's malloc maps every block fresh (32 MiB at most), where fresh
pages are faulted in on first touch: with 38 MB bands a 256 px VAE decode took 6.5 s instead of
4.4-4.8 under glibc's default settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BAND_BYTES", "BAND_TILES", "CHUNK_BYTES", "CHUNK_CHANNELS", "MIN_CHANNELS", "MIN_TILES", "MIN_TRAIN_TILES", "winograd_applies",
           "winograd_conv2d", "winograd_tiles", "winograd_weight"]

MIN_TILES = 64
"""Fewest 4x4 output tiles (batch x ceil(H/4) x ceil(W/4)) a convolution takes Winograd with:
from 64 every SD shape measured gained (0.52-0.70x); at 32 tiles (16x16 pixels, a batch of 2) the
per-call weight transform leaves 0.81-1.01x, too little to count on across CPUs; at 16, 1.33x."""
MIN_TRAIN_TILES = 128
"""The same for a convolution that needs a gradient: forward + backward took 0.70-0.79x
``F.conv2d``'s time at 128-512 tiles, 0.93x at 64 (4x640x16x16) and 1.32x at 32."""
MIN_CHANNELS = 64
"""Fewest input and output channels: below that the transforms outweigh the GEMMs (a VAE's
128 -> 3 output convolution ran 1.16x slower; 64 -> 64 gained, 0.91x)."""
BAND_BYTES = 8 << 20
"""Most bytes of transformed input (36 x tiles x in x 4) at once, unless :data:`BAND_TILES` tiles
take more: the whole batch where it fits, else bands of whole images or of tile rows of one image,
of even size."""
BAND_TILES = 128
"""Fewest tiles a band holds (where the input has as many): fewer rows make the 36 GEMMs and the
per-band weight transform inefficient (SD's first level at 256 px, 960 input channels in bands of
32 tiles: 0.73x the direct convolution's time; in one band of 128: 0.51-0.57x as its narrower layers)."""
CHUNK_BYTES = 8 << 20
"""Most bytes of transformed weight (36 x in x out-chunk x 4) or of products (36 x tiles x
out-chunk x 4) at once, unless :data:`CHUNK_CHANNELS` output channels take more."""
CHUNK_CHANNELS = 64
"""Fewest output channels a chunk holds (where the layer has as many)."""

_M, _A = 4, 6  # output tile side, input tile side (_M + 3 - 1)

# Lavin and Gray's F(4x4, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


_INPUT, _OUTPUT = (torch.tensor(m, dtype=torch.float32) for m in (_BT, _AT))  # (6, 6), (4, 6)
_WEIGHT = torch.kron(*(2 * (torch.tensor(_G, dtype=torch.float64),))).float()  # (36, 9): g -> G g G^T flattened


def _both_axes(m: Tensor, t: Tensor) -> Tensor:
    """``m t m^T`` over the first two axes of ``t`` ``(a, a, X)``: ``(b, b, X)`` for ``m`` ``(b, a)``
    (two small GEMMs: about 2a multiply-adds an element instead of the a^2 of one Kronecker matrix,
    which ran 2-4x slower on the input)."""
    a, x = t.shape[1], t.shape[2]
    return torch.matmul(m, (m @ t.reshape(a, a * x)).view(m.shape[0], a, x))


def winograd_tiles(x: Tensor) -> int:
    """The number of 4x4 output tiles of a same-size convolution of ``x`` ``(N, C, H, W)``."""
    n, _, h, w = x.shape
    return n * -(-h // _M) * -(-w // _M)


def winograd_applies(x: Tensor, weight: Tensor, stride: object, padding: object, dilation: object,
                     groups: int, *, min_tiles: int = MIN_TILES) -> bool:
    """True for the convolutions this path computes and wins on: a 4-D input, a 3x3 kernel, stride
    1, padding 1, dilation 1, one group, at least :data:`MIN_CHANNELS` input and output channels
    and at least ``min_tiles`` output tiles (:data:`MIN_TILES`; :data:`MIN_TRAIN_TILES` for a
    convolution that needs a gradient). Dtype, device and autograd are the dispatcher's to check
    (:func:`t2i_engine.kernels.dense.dispatch.winograd_unsupported_reason`)."""
    return (
        x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and groups == 1
        and stride in (1, (1, 1), [1, 1]) and padding in (1, (1, 1), [1, 1]) and dilation in (1, (1, 1), [1, 1])
        and x.shape[1] >= MIN_CHANNELS and weight.shape[0] >= MIN_CHANNELS
        and winograd_tiles(x) >= min_tiles
    )


def winograd_weight(weight: Tensor) -> Tensor:
    """``G g G^T`` of every ``(out, in, 3, 3)`` float32 kernel, as ``(36, out, in)``."""
    k, c = weight.shape[:2]
    # one (36, 9) GEMM: the separable form's second step, a batched GEMM over 3-long rows, ran
    # 20-60x slower (157 ms for 640 x 640 weights)
    return (_WEIGHT @ weight.reshape(k * c, 9).t()).view(_A * _A, k, c)


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 float32 ``weight`` (stride 1, one group)
    by Winograd F(4x4, 3x3); any ``H`` and ``W`` (the last tiles are zero-padded and cropped).
    Differentiable by autograd."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // _M), -(-w // _M)
    per_channel = _A * _A * x.element_size()  # bytes of one channel of one transformed tile
    y = x.new_empty(n, k, th * _M, tw * _M)
    for images, r0, rows in _bands(n, th, tw, max(BAND_TILES, BAND_BYTES // (per_channel * c))):
        _band(_padded_rows(x[images], r0, rows, tw), weight, y[images, :, r0 * _M:(r0 + rows) * _M], per_channel)
    if th * _M != h or tw * _M != w:
        y = y[:, :, :h, :w].contiguous()
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


def _bands(n: int, th: int, tw: int, most: int) -> list[tuple[slice, int, int]]:
    """``(images, first tile row, tile rows)`` per band of at most ``most`` tiles, of even sizes:
    groups of whole images where one fits, else tile rows of one image."""
    if th * tw <= most:
        per = max(1, min(n, most // (th * tw)))
        count = -(-n // per)
        per = -(-n // count)
        return [(slice(i, min(i + per, n)), 0, th) for i in range(0, n, per)]
    count = -(-th * tw // most)  # bands per image
    rows = -(-th // count)
    return [(slice(i, i + 1), r0, min(rows, th - r0)) for i in range(n) for r0 in range(0, th, rows)]


def _padded_rows(x: Tensor, r0: int, rows: int, tw: int) -> Tensor:
    """The input of tile rows ``r0 .. r0 + rows``: rows ``4 r0 - 1 .. 4 (r0 + rows) + 1`` of ``x``,
    zero-padded by 1 on the left and top and up to whole tiles plus 1 on the right and bottom (a
    band's copy, not the whole padded input)."""
    h, w = x.shape[2:]
    first, last = _M * r0 - 1, _M * (r0 + rows) + 1  # input rows the band reads, end exclusive
    band = x[:, :, max(first, 0):min(last, h)]
    return F.pad(band, (1, tw * _M - w + 1, max(-first, 0), max(last - h, 0)))


def _input_transform(xb: Tensor) -> Tensor:
    """``B^T d B`` of every 6x6 tile of ``xb`` ``(N, C, 4 * rows + 2, 4 * cols + 2)``, as ``(36,
    N * rows * cols, C)`` (the gathered tiles are freed on return)."""
    n, c = xb.shape[:2]
    tiles = xb.unfold(2, _A, _M).unfold(3, _A, _M)  # (N, C, rows, cols, 6, 6), a view
    t = n * tiles.shape[2] * tiles.shape[3]
    d = tiles.permute(4, 5, 0, 2, 3, 1).reshape(_A, _A, t * c)  # (6, 6, tiles * C)
    return _both_axes(_INPUT, d).view(_A * _A, t, c)


def _band(xb: Tensor, weight: Tensor, y: Tensor, per_channel: int) -> None:
    """One band of output tiles, written into ``y`` ``(N, out, 4 * rows, 4 * cols)``: ``xb`` is its
    ``(N, C, 4 * rows + 2, 4 * cols + 2)`` padded input. The weight is transformed and multiplied
    a chunk of output channels at a time, so that neither its transform (four times the weight)
    nor the products exceed :data:`CHUNK_BYTES`."""
    n, c, k = xb.shape[0], xb.shape[1], weight.shape[0]
    rows, cols = y.shape[2] // _M, y.shape[3] // _M
    v = _input_transform(xb)  # (36, tiles, C)
    t = v.shape[1]
    chunks = -(-k // max(CHUNK_CHANNELS, CHUNK_BYTES // (per_channel * max(c, t))))
    chunk = -(-k // chunks)  # output channels at a time, in chunks of even size
    for k0 in range(0, k, chunk):
        u = winograd_weight(weight[k0:k0 + chunk]).transpose(1, 2)  # (36, in, chunk), column-major
        m = torch.bmm(v, u)  # (36, tiles, chunk): the element-wise products summed over input channels
        kc = m.shape[2]
        out = _both_axes(_OUTPUT, m.view(_A, _A, t * kc)).view(_M, _M, n, rows, cols, kc)  # A^T m A
        y[:, k0:k0 + kc].view(n, kc, rows, _M, cols, _M).copy_(out.permute(2, 5, 3, 0, 4, 1))
