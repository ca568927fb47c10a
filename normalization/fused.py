"""Fused uint8 kernels for the classical normalizers: lookup tables in, lookup tables out, cache-sized chunks.

After its per-tile fit, a classical normalizer is a fixed per-pixel map of three bytes. The float
path (:mod:`normalization.functional`) takes it in about fifteen full-batch passes (uint8→float,
divide, log, 3×3, exp, clamp, round, back to uint8), each streaming the whole batch through
memory. Here, for uint8 input:

* the input side is a 256-entry table (``log1p`` for optical density, the sRGB curve for LAB),
  gathered with ``index_select``: exact, and cheaper than a ``log`` or ``pow``;
* every affine step (the OD map with its constants, LAB's matrices, Reinhard's scale and shift)
  is folded into one ``baddbmm`` per step;
* the output side (``exp`` or the sRGB encoding, then clamp, round and the uint8 cast) is one
  gather in a uint8 table indexed by the quantised result, at steps fine enough that only
  values within a few hundredths of a rounding boundary can land one level off the float path
  (about 0.2% of values on real tiles; never more than one level);
* the batch is processed in chunks of about :data:`CHUNK_PIXELS` pixels, with reused buffers,
  so that the intermediates stay in cache instead of streaming 50 MB per pass.

``torch.compile`` was measured as the alternative (g++ is present here): about 25 s to compile
the fused OD kernel (every process, the cache notwithstanding), and the generated loop was slower
than these chunked gathers on this 2-core CPU, so it is not used. ``index_select`` on a 1-D
table runs on one thread: with two, the gathers are the serial part.

Every kernel is per pixel and per tile: outputs do not depend on batch companions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch

from normalization.functional import concentrations_nonneg, rgb_to_od

#: Pixels per chunk (two 256² tiles): intermediates stay in cache, and few enough chunks that the
#: per-op overhead (dispatch, thread start) stays small.
CHUNK_PIXELS = 131072
#: Steps per unit of the quantised log-intensity ``w = log(255·rgb + 1)`` (OD output table).
OD_STEPS = 16384
#: Steps per unit of normalised XYZ (LAB forward table) and of linear RGB (sRGB output table).
LAB_STEPS = 65536
SRGB_STEPS = 65536

# LAB constants, exactly as kornia.color (D65, its thresholds and matrices).
_WHITE = (0.95047, 1.0, 1.08883)
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_XYZ_TO_RGB = (
    (3.2404813432005266, -1.5371515162713185, -0.4985363261688878),
    (-0.9692549499965682, 1.8759900014898907, 0.0415559265582928),
    (0.0556466391351772, -0.2040413383665112, 1.0573110696453443),
)
_F_TO_LAB = ((0.0, 116.0, 0.0), (500.0, -500.0, 0.0), (0.0, 200.0, -200.0))  # lab = A·f + (-16, 0, 0)
_LAB_OFFSET = (-16.0, 0.0, 0.0)

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Build (once per device) and return one of the lookup tables."""
    key = (name, device)
    if key not in _TABLES:
        v = torch.arange(256, dtype=torch.float64)
        if name == "log1p":  # log(255·rgb + 1) of each byte
            table = torch.log1p(v).float()
        elif name == "srgb_to_linear":  # kornia's rgb_to_linear_rgb of each byte
            rgb = v / 255.0
            table = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92).float()
        elif name == "lab_f":  # kornia's LAB companding f(t) on t in [0, 1]
            t = torch.arange(LAB_STEPS + 1, dtype=torch.float64) / LAB_STEPS
            table = torch.where(t > 0.008856, t.clamp(min=0.008856) ** (1 / 3), 7.787 * t + 4.0 / 29.0).float()
        elif name == "od_out":  # round(clamp(exp(w) - 1, 0, 255)), w = log(io·exp(-od))
            w = torch.arange(int(math.log(256.0) * OD_STEPS) + 2, dtype=torch.float64) / OD_STEPS
            table = (torch.exp(w) - 1.0).clamp(0.0, 255.0).round().to(torch.uint8)
        elif name == "srgb_out":  # round(255 · clamp(kornia's linear_rgb_to_rgb(lin), 0, 1)), lin in [0, 1]
            lin = torch.arange(SRGB_STEPS + 1, dtype=torch.float64) / SRGB_STEPS
            srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, 12.92 * lin)
            table = (srgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        else:
            raise KeyError(name)
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _chunks(b: int, n: int, device: torch.device) -> Iterator[tuple[slice, slice]]:
    """(tile slice, pixel slice) pairs covering ``(b, n)`` in chunks of about :data:`CHUNK_PIXELS` pixels.

    Off the CPU a chunk is the whole batch (a GPU wants few large kernels, not cache blocking).
    """
    if device.type != "cpu":
        yield slice(0, b), slice(0, n)
        return
    if n >= CHUNK_PIXELS:
        for i in range(b):
            for p in range(0, n, CHUNK_PIXELS):
                yield slice(i, i + 1), slice(p, min(n, p + CHUNK_PIXELS))
        return
    step = max(1, CHUNK_PIXELS // n)
    for i in range(0, b, step):
        yield slice(i, min(b, i + step)), slice(0, n)


class _Scratch:
    """Buffers reused across the chunks of one call, one per (name, shape, dtype)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.buffers = device, {}

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, tuple(shape), dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return self.buffers[key]


Kernel = Callable[[torch.Tensor, slice, _Scratch], torch.Tensor]


def _map_uint8(images: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Run ``kernel(index_chunk, tile_slice, scratch)`` over cache-sized chunks of a uint8 ``(B,3,H,W)`` batch.

    ``index_chunk`` is the chunk's bytes as int32 ``(b,3,n)`` (ready for ``index_select``; the
    kernel may overwrite it); the kernel returns the uint8 ``(b,3,n)`` result.
    """
    b, c, h, w = images.shape
    flat = images.reshape(b, c, h * w)
    out = torch.empty((b, c, h * w), dtype=torch.uint8, device=images.device)
    scratch = _Scratch(images.device)
    for tiles, pixels in _chunks(b, h * w, images.device):
        src = flat[tiles, :, pixels]
        index = scratch("index", src.shape, torch.int32).copy_(src)
        out[tiles, :, pixels] = kernel(index, tiles, scratch)
    return out.reshape(b, c, h, w)


def _gather(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``table[index]`` into ``out`` (same shape as the int32 ``index``): one ``index_select``."""
    torch.index_select(table, 0, index.reshape(-1), out=out.view(-1))
    return out


def _lookup(table: torch.Tensor, values: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Values already scaled to table steps (+0.5 folded in) -> ``table`` at the nearest step, into ``out``.

    ``values`` is clamped in place; ``index`` (int32, same shape) is overwritten.
    """
    values.clamp_(0.0, float(table.numel() - 1))
    index.copy_(values)  # truncation of non-negative values: floor, i.e. the nearest step
    return _gather(table, index, out)


def od_of_bytes(pixels: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """``rgb_to_od(pixels / 255, io)`` of uint8 pixels ``(B,N,3)``, by a 256-entry table of those values.

    The table is :func:`~normalization.functional.rgb_to_od` of the 256 bytes in float32, so the
    values are the float path's (to the last bit but for the vectorised ``log``'s tail handling).
    The result keeps the input's layout (channel-first samples stay channel-first).
    """
    key = (f"od:{io!r}", pixels.device)
    if key not in _TABLES:
        _TABLES[key] = rgb_to_od(torch.arange(256, dtype=torch.float32, device=pixels.device) / 255.0, io)
    rows = pixels.transpose(1, 2).to(torch.int32)  # (B,3,N)
    return _TABLES[key].index_select(0, rows.reshape(-1)).reshape(rows.shape).transpose(1, 2)


def apply_od_map_uint8(images: torch.Tensor, matrix: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """:func:`~normalization.functional.apply_od_map` for uint8 images, in one fused, table-driven pass.

    With ``l = log(x + 1)`` of each byte ``x`` and ``od = log(io) - l``, the mapped intensity is
    ``io·exp(-M·od) = exp(w)`` with ``w = log(io)·(1 - M·1) + M·l``; ``w`` (scaled to table steps)
    is one ``baddbmm``, and ``round(clamp(exp(w) - 1, 0, 255))`` one gather.

    Shape:
        images ``(B,3,H,W)`` uint8, matrix ``(B,3,3)`` -> ``(B,3,H,W)`` uint8.

    Example:
        >>> x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        >>> torch.equal(apply_od_map_uint8(x, torch.eye(3).expand(2, 3, 3)), x)
        True
    """
    lut_in, lut_out = _table("log1p", images.device), _table("od_out", images.device)
    m = matrix.to(device=images.device, dtype=torch.float32)
    weight = m * OD_STEPS
    bias = math.log(io) * (1.0 - m.sum(-1, keepdim=True)) * OD_STEPS + 0.5  # (B,3,1)

    def kernel(index: torch.Tensor, tiles: slice, scratch: _Scratch) -> torch.Tensor:
        log_rgb = _gather(lut_in, index, scratch("a", index.shape))
        w = torch.baddbmm(bias[tiles], weight[tiles], log_rgb, out=scratch("b", index.shape))
        return _lookup(lut_out, w, index, scratch("out", index.shape, torch.uint8))

    return _map_uint8(images, kernel)


def lab_transfer_matrices(
    source_mean: torch.Tensor, source_std: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinhard's per-channel LAB affine map folded into LAB's linear part: ``lab' = P·f + q``.

    ``f`` is the companded normalised XYZ (``lab = A·f + o``); then ``P = D·A`` and
    ``q = D·(o - μ_s) + μ_t`` with ``D = diag(σ_t/σ_s)``.

    Shape:
        statistics ``(B,3)`` -> ``(B,3,3)``, ``(B,3,1)``.
    """
    a = torch.tensor(_F_TO_LAB, dtype=torch.float64)
    o = torch.tensor(_LAB_OFFSET, dtype=torch.float64)
    scale = target_std.double() / source_std.double()
    p = scale[..., None] * a
    q = scale * (o - source_mean.double()) + target_mean.double()
    return p.float(), q.float()[..., None]


@functools.lru_cache(maxsize=8)
def _lab_constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    """LAB's fixed matrices (built once per device).

    In table steps: linear RGB → f, then f's inverse map and offset, XYZ → linear RGB, the +0.5
    of rounding; and f → LAB with its offset.
    """
    white = torch.tensor(_WHITE, dtype=torch.float64)
    to_f = (torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / white[:, None] * LAB_STEPS).float().to(device)
    a_inv = torch.linalg.inv(torch.tensor(_F_TO_LAB, dtype=torch.float64))
    inv_offset = (-a_inv @ torch.tensor(_LAB_OFFSET, dtype=torch.float64)).float().to(device)[:, None]
    to_lin = (torch.tensor(_XYZ_TO_RGB, dtype=torch.float64) * white * SRGB_STEPS).float().to(device)
    to_lab = torch.tensor(_F_TO_LAB, dtype=torch.float32, device=device)
    offset = torch.tensor(_LAB_OFFSET, dtype=torch.float32, device=device)[:, None]
    return to_f, a_inv.float().to(device), inv_offset, to_lin, torch.full((1, 1, 1), 0.5, device=device), to_lab, offset


def reinhard_transfer_uint8(
    images: torch.Tensor,
    source_mean: torch.Tensor,
    source_std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
) -> torch.Tensor:
    """:func:`~normalization.functional.reinhard_transfer` for uint8 images, table-driven and chunked.

    sRGB → linear is a 256-entry table; normalised XYZ is one ``bmm``; LAB's cube root a table
    over [0, 1]; Reinhard's affine map and LAB's matrix one ``baddbmm``; after the L clamp, the
    inverse (kornia's ``lab_to_rgb``, clip on) ends in a uint8 sRGB table.

    Shape:
        images ``(B,3,H,W)`` uint8; statistics ``(B,3)`` -> ``(B,3,H,W)`` uint8.
    """
    p, q = lab_transfer_matrices(source_mean, source_std, target_mean, target_std)
    p, q = p.to(images.device), q.to(images.device)

    def kernel(index: torch.Tensor, tiles: slice, scratch: _Scratch) -> torch.Tensor:
        return _rgb_of_f(_f_of_bytes(index, scratch), p[tiles], q[tiles], index, scratch)

    return _map_uint8(images, kernel)


def _f_of_bytes(index: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """LAB's companded normalised XYZ ``f`` ``(b,3,n)`` of int32 bytes (in scratch "a"; uses "b")."""
    shape, device = index.shape, index.device
    to_f, half = _lab_constants(device)[0], _lab_constants(device)[4]
    xyz = torch.baddbmm(half, to_f.expand(shape[0], 3, 3), _gather(_table("srgb_to_linear", device), index,
                        scratch("a", shape)), out=scratch("b", shape))  # XYZ/white, in table steps
    return _lookup(_table("lab_f", device), xyz, index, scratch("a", shape))


def _rgb_of_f(
    f: torch.Tensor, p: torch.Tensor, q: torch.Tensor, index: torch.Tensor, scratch: _Scratch
) -> torch.Tensor:
    """Reinhard's ``lab' = P·f + q``, the L clamp, and kornia's ``lab_to_rgb`` (clip on) to uint8 bytes.

    ``f`` must be scratch "a"; ``index`` (int32, same shape) is overwritten.
    """
    shape, device = f.shape, f.device
    _, a_inv, inv_offset, to_lin, half = _lab_constants(device)[:5]
    b, c, d = shape[0], scratch("b", shape), scratch("c", shape)
    lab = torch.baddbmm(q, p, f, out=c)
    lab[:, 0].clamp_(0.0, 100.0)
    f = torch.baddbmm(inv_offset, a_inv.expand(b, 3, 3), lab, out=f)
    f[:, 2].clamp_(min=0.0)  # kornia: Z < 0 is out of range
    cube = torch.mul(f, f, out=c).mul_(f)
    linear = torch.sub(f, 4.0 / 29.0, out=d).div_(7.787)
    above = torch.gt(f, 0.2068966, out=scratch("mask", shape))  # 0/1 floats: lerp is exact there, and cheap
    xyz = torch.lerp(linear, cube, above, out=f)
    rgb = torch.baddbmm(half, to_lin.expand(b, 3, 3), xyz, out=c)  # linear RGB, in table steps
    return _lookup(_table("srgb_out", device), rgb, index, scratch("out", shape, torch.uint8))


def reinhard_own_statistics_uint8(
    images: torch.Tensor, mask: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor
) -> torch.Tensor:
    """Reinhard transfer of uint8 images from their own LAB statistics over ``mask`` (RandStainNA's step).

    One pass of byte tables gives ``f``; the LAB mean and std over the masked pixels and the
    transfer both start from it (no second conversion). Not chunked: for augmentation-sized batches.

    Shape:
        images ``(B,3,H,W)`` uint8, mask ``(B,H,W)`` bool, targets ``(B,3)`` -> ``(B,3,H,W)`` uint8.
    """
    b, _, h, w = images.shape
    index = images.reshape(b, 3, h * w).to(torch.int32)
    scratch = _Scratch(images.device)
    f = _f_of_bytes(index, scratch)
    constants = _lab_constants(images.device)
    lab = torch.baddbmm(constants[6], constants[5].expand(b, 3, 3), f)
    weight = mask.reshape(b, 1, h * w).to(lab.dtype)
    count = weight.sum(-1).clamp(min=1.0)
    mean = (lab * weight).sum(-1) / count
    std = (lab.sub_(mean[..., None]).square_().mul_(weight).sum(-1) / count).sqrt_().clamp_(min=1e-3)
    p, q = lab_transfer_matrices(mean, std, target_mean, target_std)
    return _rgb_of_f(f, p.to(f.device), q.to(f.device), index, scratch).reshape(b, 3, h, w)


def tissue_mask_of_bytes(
    images: torch.Tensor, io: float = 240.0, beta: float = 0.15, od_max: float = 3.0
) -> torch.Tensor:
    """``tissue_mask_od(rgb_to_od(images / 255))`` on uint8 bytes, in integer arithmetic.

    Every channel's OD ``-log((x + 1)/io)`` is at least ``beta`` iff the largest byte is at most
    ``io·e^-beta - 1``; the mean OD is at most ``od_max`` iff ``Π(x + 1) ≥ io³·e^(-3·od_max)``.

    Shape:
        images ``(B,3,H,W)`` uint8 -> ``(B,H,W)`` bool.
    """
    brightest = math.floor(io * math.exp(-beta) - 1.0)
    product = images.to(torch.int32).add_(1).prod(dim=1)
    return (images.amax(dim=1) <= brightest) & (product >= math.ceil(io**3 * math.exp(-3.0 * od_max)))


def lab_of_uint8_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """LAB (kornia's conversion) of uint8 RGB pixels ``(B,N,3)`` -> ``(B,3,N)``, for estimation subsets.

    The same tables as :func:`reinhard_transfer_uint8`: the sRGB curve exact, LAB's cube root at
    steps of 1/65536 (L within 0.01, a and b within 0.06 of kornia's).
    """
    device = pixels.device
    index = pixels.transpose(1, 2).to(torch.int32)
    constants = _lab_constants(device)
    to_f, to_lab, offset = constants[0], constants[5], constants[6]
    lin = _gather(_table("srgb_to_linear", device), index, torch.empty(index.shape, device=device))
    t = torch.matmul(to_f, lin).add_(0.5)
    f = _lookup(_table("lab_f", device), t, index, lin)
    return torch.baddbmm(offset, to_lab.expand(len(f), 3, 3), f)


def vahadane_apply_uint8(
    images: torch.Tensor,
    stains: torch.Tensor,
    scale: torch.Tensor,
    target_stains: torch.Tensor,
    io: float = 240.0,
) -> torch.Tensor:
    """Vahadane's map for uint8 images: table OD in, chunked non-negative concentrations, table out.

    ``out = od_to_rgb(T · diag(scale) · nnls(S, od))`` per tile, with the same closed-form NNLS as
    :func:`~normalization.functional.concentrations_nonneg`.

    Shape:
        images ``(B,3,H,W)`` uint8, stains/target_stains ``(B,3,2)``, scale ``(B,2)`` -> uint8.
    """
    device = images.device
    lut_in, lut_out = _table("log1p", device), _table("od_out", device)
    log_io = math.log(io)
    stains = stains.to(device=device, dtype=torch.float32)
    weight = -(target_stains.to(stains) * scale.to(stains)[:, None, :]) * OD_STEPS  # (B,3,2)
    bias = torch.full((1, 1, 1), log_io * OD_STEPS + 0.5, device=device)

    def kernel(index: torch.Tensor, tiles: slice, scratch: _Scratch) -> torch.Tensor:
        od = _gather(lut_in, index, scratch("a", index.shape)).neg_().add_(log_io)
        conc = concentrations_nonneg(od, stains[tiles])
        w = torch.baddbmm(bias, weight[tiles], conc, out=scratch("b", index.shape))
        return _lookup(lut_out, w, index, scratch("out", index.shape, torch.uint8))

    return _map_uint8(images, kernel)
