"""The bilinear sampling rule S shared by every AlignFA/AlignCM kernel, as ``@triton.jit`` helpers.

Convention (identical to :mod:`alignseg.ops.sampling`, the eager reference): output pixel (i, j)
shifted by (dx, dy) output pixels reads the source of size (h, w) at
``x = (j + dx) * (w - 1) / (W - 1)``, ``y = (i + dy) * (h - 1) / (H - 1)`` (scale 0 for an output
size of 1), from its four integer neighbours; a neighbour outside the source weighs zero. A NaN
coordinate becomes -2 (outside, zero, no gradient); every coordinate is clamped to [-2, size + 1]
(all taps already outside there) so huge or infinite offsets convert to int32 safely.
All arithmetic runs in ``ACC_DTYPE`` (fp32, or fp64 for fp64 inputs).

``upsampled_sample_tile`` / ``upsampled_tap_gradients`` sample U(src), the align-corners bilinear
upsampling of a coarse map to the output grid, without building it: each in-range tap of U is
evaluated from its own four coarse taps (the authors' AlignFA: upsample, then warp). When the coarse map is no
larger than U's grid, those 16 coarse taps fall on at most 3x3 cells with separable weights:
``upsampled_cell_sample_tile`` / ``upsampled_cell_gradients`` visit the 9 cells instead (``upsampled_cell``).

Tiles of pixels x channels come in two orientations, the constexpr ``PIXELS_LAST``: [BLOCK_P, BLOCK_C] or
[BLOCK_C, BLOCK_P]. Which axis the lanes of a warp run along is the compiler's choice, and for a tap at a
learned offset it cannot prove either axis contiguous; the launchers pick the orientation that puts the
contiguous addresses (a channels_last map's channels, a contiguous map's neighbouring pixels) where the
installed Triton lays its lanes (:func:`alignseg.kernels.launch.pixels_last`). :func:`tile_offsets`,
:func:`tile_mask`, :func:`per_pixel`, :func:`zero_tile` and :func:`channel_sum` build and reduce either.
"""

import triton
import triton.language as tl

from .fixed_point import SCATTER_FLOAT, scatter_add


@triton.jit
def align_corners_scale(src_size, out_size, host_scale, ACC_DTYPE: tl.constexpr):
    """(src_size - 1) / (out_size - 1) as ACC_DTYPE (0 when out_size == 1), correctly rounded.

    fp32 kernels take ``host_scale``, the launcher's value: fp32 division on GPUs is approximate, and a
    scale an ulp off moves whole-pixel positions below the grid point and flips the one-sided offset
    gradient there (an IEEE division in the kernel costs ~70 registers). fp64 division is IEEE.
    """
    if ACC_DTYPE == tl.float64:
        # tl.cast, not .to(): Triton passes an integer argument equal to 1 as a constant (a Python int).
        src = tl.cast(src_size, tl.float64)
        out = tl.cast(out_size, tl.float64)
        ratio = (src - 1.0) / tl.maximum(out - 1.0, 1.0)
        return tl.where(out > 1.0, ratio, 0.0).to(tl.float64)
    return tl.cast(host_scale, ACC_DTYPE)


@triton.jit
def unit_scale(size, ACC_DTYPE: tl.constexpr):
    """The scale of a source as large as the output: exactly 1, or 0 for a size of 1."""
    return tl.where(size > 1, 1.0, 0.0).to(ACC_DTYPE)


@triton.jit
def source_coordinate(index, shift, scale, src_size):
    """Split the source coordinate (index + shift) * scale into (floor as int32, fraction).

    ``index`` is the output row/column, ``shift`` the offset in ACC_DTYPE. The clamp keeps
    tap arithmetic in int32 range; the fraction is exact for coordinates inside the map.
    """
    pos = (index + shift) * scale
    pos = tl.where(pos != pos, -2.0, pos)  # NaN -> outside
    pos = tl.minimum(tl.maximum(pos, -2.0), src_size + 1.0)
    pos_floor = tl.floor(pos)
    return pos_floor.to(tl.int32), pos - pos_floor


@triton.jit
def tap_weight(frac, D: tl.constexpr):
    """(weight, d weight / d frac) of tap D (0 or 1) of a linear interpolation at fraction ``frac``."""
    if D == 1:
        return frac, 1.0
    else:
        return 1.0 - frac, -1.0


@triton.jit
def bilinear_tap(x0, y0, fx, fy, h, w, DX: tl.constexpr, DY: tl.constexpr):
    """Tap (x0 + DX, y0 + DY): its source column and row, weight, d(weight)/dfx, d(weight)/dfy, inside mask.

    The weight is not masked: callers mask the load/store with ``inside`` instead.
    """
    xx = x0 + DX
    yy = y0 + DY
    wx, dwx = tap_weight(fx, DX)
    wy, dwy = tap_weight(fy, DY)
    inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    return xx, yy, wx * wy, dwx * wy, wx * dwy, inside


@triton.jit
def per_pixel(values, PIXELS_LAST: tl.constexpr):
    """A per-pixel vector broadcast along the channel axis of a tile, in the tile's orientation."""
    if PIXELS_LAST:
        return values[None, :]
    else:
        return values[:, None]


@triton.jit
def tile_offsets(pixel_offsets, channel_offsets, PIXELS_LAST: tl.constexpr):
    """Element offsets of a tile: [BLOCK_C, BLOCK_P] with PIXELS_LAST, else [BLOCK_P, BLOCK_C]."""
    if PIXELS_LAST:
        return channel_offsets[:, None] + pixel_offsets[None, :]
    else:
        return pixel_offsets[:, None] + channel_offsets[None, :]


@triton.jit
def tile_pointers(base, pixel_offsets, channel_offsets, PIXELS_LAST: tl.constexpr):
    """``base`` plus :func:`tile_offsets`, the pixel offsets added first (as the kernels were measured)."""
    if PIXELS_LAST:
        return base + pixel_offsets[None, :] + channel_offsets[:, None]
    else:
        return base + pixel_offsets[:, None] + channel_offsets[None, :]


@triton.jit
def tile_mask(pixel_mask, channel_mask, PIXELS_LAST: tl.constexpr):
    if PIXELS_LAST:
        return channel_mask[:, None] & pixel_mask[None, :]
    else:
        return pixel_mask[:, None] & channel_mask[None, :]


@triton.jit
def zero_tile(pixels, channels, dtype: tl.constexpr, PIXELS_LAST: tl.constexpr):
    """A zero tile for the [BLOCK_P] vector ``pixels`` and the [BLOCK_C] vector ``channels``."""
    if PIXELS_LAST:
        return tl.zeros((channels.shape[0], pixels.shape[0]), dtype=dtype)
    else:
        return tl.zeros((pixels.shape[0], channels.shape[0]), dtype=dtype)


@triton.jit
def channel_sum(tile, PIXELS_LAST: tl.constexpr):
    """The per-pixel sum over the channels of a tile."""
    if PIXELS_LAST:
        return tl.sum(tile, axis=0)
    else:
        return tl.sum(tile, axis=1)


@triton.jit
def sample_tile(
    src_ptr,  # source map [h, w] x channels of one batch row per pixel, already offset by n * stride_n
    channels,  # [BLOCK_C] channel indices
    stride_c, stride_h, stride_w,
    x0, y0, fx, fy,  # [BLOCK_P] tap corners and fractions
    h, w,
    mask_p, mask_c,
    PIXELS_LAST: tl.constexpr,
):
    """Bilinear sample of a pixels x channels tile, accumulated in the fractions' dtype."""
    acc = zero_tile(fx, channels, fx.dtype, PIXELS_LAST)
    for DY in tl.static_range(2):
        for DX in tl.static_range(2):
            xx, yy, weight, _, _, inside = bilinear_tap(x0, y0, fx, fy, h, w, DX, DY)
            ptrs = tile_pointers(src_ptr, yy.to(tl.int64) * stride_h + xx.to(tl.int64) * stride_w,
                                 channels * stride_c, PIXELS_LAST)
            tap = tl.load(ptrs, mask=tile_mask(inside & mask_p, mask_c, PIXELS_LAST), other=0.0)
            acc += tap.to(fx.dtype) * per_pixel(weight, PIXELS_LAST)
    return acc


@triton.jit
def tap_gradients(
    src_ptr,  # source map of one batch row per pixel, already offset by n * stride_n
    grad_src_ptr,  # fp32/fp64 gradient buffer of the source, same layout rules, offset likewise
    grad,  # incoming gradient tile (pixels x channels, see PIXELS_LAST) in ACC_DTYPE, zero where masked
    channels,
    stride_c, stride_h, stride_w,
    gstride_c, gstride_h, gstride_w,
    x0, y0, fx, fy,
    h, w,
    mask_p, mask_c,
    SCATTER: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    """Backward of :func:`sample_tile` for one channel block.

    Returns the per-pixel partial sums over this block's channels of grad * d(sample)/dfx and
    grad * d(sample)/dfy. With SCATTER it also atomically adds grad * weight into each tap of
    the source gradient (callers with a tiny source reduce per program instead).
    """
    dfx = tl.zeros((x0.shape[0],), dtype=fx.dtype)
    dfy = tl.zeros((x0.shape[0],), dtype=fx.dtype)
    for DY in tl.static_range(2):
        for DX in tl.static_range(2):
            xx, yy, weight, dwx, dwy, inside = bilinear_tap(x0, y0, fx, fy, h, w, DX, DY)
            mask = tile_mask(inside & mask_p, mask_c, PIXELS_LAST)
            row = yy.to(tl.int64)
            col = xx.to(tl.int64)
            ptrs = tile_pointers(src_ptr, row * stride_h + col * stride_w, channels * stride_c, PIXELS_LAST)
            tap = tl.load(ptrs, mask=mask, other=0.0).to(fx.dtype)
            grad_tap = channel_sum(grad * tap, PIXELS_LAST)
            dfx += dwx * grad_tap
            dfy += dwy * grad_tap
            if SCATTER:
                gptrs = tile_pointers(grad_src_ptr, row * gstride_h + col * gstride_w, channels * gstride_c,
                                      PIXELS_LAST)
                tl.atomic_add(gptrs, grad * per_pixel(weight, PIXELS_LAST), mask=mask, sem="relaxed")
    return dfx, dfy


@triton.jit
def scatter_tile(
    grad_src_ptr,  # gradient buffer of the source, already offset by n * stride_n: fp32/fp64, or int64 sums
    flags_ptr,  # SCATTER_FIXED: int32 flags with the buffer's strides, offset likewise (else unused)
    fixed_scale,  # SCATTER_FIXED: the fixed-point scale (else unused)
    grad,  # gradient of the sampled tile (pixels x channels, see PIXELS_LAST) in ACC_DTYPE
    channels,
    gstride_c, gstride_h, gstride_w,
    x0, y0, fx, fy,
    h, w,
    mask_p, mask_c,
    SCATTER: tl.constexpr,  # SCATTER_FLOAT or SCATTER_FIXED (fixed_point.py)
    PIXELS_LAST: tl.constexpr,
):
    """Adjoint of :func:`sample_tile` in the source: atomically add grad * weight into each of the four taps."""
    for DY in tl.static_range(2):
        for DX in tl.static_range(2):
            xx, yy, weight, _, _, inside = bilinear_tap(x0, y0, fx, fy, h, w, DX, DY)
            at = tile_offsets(yy.to(tl.int64) * gstride_h + xx.to(tl.int64) * gstride_w, channels * gstride_c,
                              PIXELS_LAST)
            scatter_add(grad_src_ptr, flags_ptr, at, grad * per_pixel(weight, PIXELS_LAST),
                        tile_mask(inside & mask_p, mask_c, PIXELS_LAST), fixed_scale, SCATTER)


@triton.jit
def upsampled_tap(x0, y0, fx, fy, H, W, scale_x, scale_y, h, w, DX: tl.constexpr, DY: tl.constexpr):
    """Tap (x0 + DX, y0 + DY) of the (H, W) grid of U(src), as :func:`bilinear_tap` returns it, plus its
    position on the (h, w) source (corners and fractions of U's own bilinear rule)."""
    xx, yy, weight, dwx, dwy, inside = bilinear_tap(x0, y0, fx, fy, H, W, DX, DY)
    cx0, cfx = source_coordinate(xx.to(fx.dtype), 0.0, scale_x, w)
    cy0, cfy = source_coordinate(yy.to(fx.dtype), 0.0, scale_y, h)
    return weight, dwx, dwy, inside, cx0, cy0, cfx, cfy


@triton.jit
def upsampled_sample_tile(
    src_ptr,  # coarse map [h, w] x channels of one batch row, already offset by n * stride_n
    channels,
    stride_c, stride_h, stride_w,
    x0, y0, fx, fy,  # [BLOCK_P] tap corners and fractions on the (H, W) grid of U(src)
    H, W, scale_x, scale_y, h, w,  # U's size and its align-corners scales (h-1)/(H-1), (w-1)/(W-1)
    mask_p, mask_c,
    PIXELS_LAST: tl.constexpr,
):
    """Bilinear sample of U(src) at (x0 + fx, y0 + fy): a tap outside U's grid weighs zero, a tap inside is
    U's bilinear value from four coarse taps. Up to 16 coarse loads per pixel; U is never stored."""
    acc = zero_tile(fx, channels, fx.dtype, PIXELS_LAST)
    for DY in tl.static_range(2):
        for DX in tl.static_range(2):
            weight, _, _, inside, cx0, cy0, cfx, cfy = upsampled_tap(x0, y0, fx, fy, H, W, scale_x, scale_y, h, w,
                                                                     DX, DY)
            tap = sample_tile(src_ptr, channels, stride_c, stride_h, stride_w, cx0, cy0, cfx, cfy, h, w,
                              inside & mask_p, mask_c, PIXELS_LAST)
            acc += tap * per_pixel(weight, PIXELS_LAST)
    return acc


@triton.jit
def upsampled_tap_gradients(
    src_ptr,  # coarse map of one batch row, already offset by n * stride_n
    grad_src_ptr,  # fp32/fp64 gradient buffer of the coarse map, offset likewise
    grad,  # incoming gradient tile (pixels x channels, see PIXELS_LAST) in ACC_DTYPE, zero where masked
    channels,
    stride_c, stride_h, stride_w,
    gstride_c, gstride_h, gstride_w,
    x0, y0, fx, fy,
    H, W, scale_x, scale_y, h, w,
    mask_p, mask_c,
    SCATTER: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    """Backward of :func:`upsampled_sample_tile` for one channel block, like :func:`tap_gradients`.

    Returns the per-pixel partial sums of grad * d(sample)/dfx and grad * d(sample)/dfy (the U values at
    the taps times the derivatives of the warp weights); with SCATTER it also scatters grad * (warp weight)
    * (upsample weight) into the coarse taps with atomics.
    """
    dfx = tl.zeros((x0.shape[0],), dtype=fx.dtype)
    dfy = tl.zeros((x0.shape[0],), dtype=fx.dtype)
    for DY in tl.static_range(2):
        for DX in tl.static_range(2):
            weight, dwx, dwy, inside, cx0, cy0, cfx, cfy = upsampled_tap(x0, y0, fx, fy, H, W, scale_x, scale_y, h, w,
                                                                         DX, DY)
            mask = inside & mask_p
            tap = sample_tile(src_ptr, channels, stride_c, stride_h, stride_w, cx0, cy0, cfx, cfy, h, w, mask, mask_c,
                              PIXELS_LAST)
            grad_tap = channel_sum(grad * tap, PIXELS_LAST)
            dfx += dwx * grad_tap
            dfy += dwy * grad_tap
            if SCATTER:
                scatter_tile(grad_src_ptr, grad_src_ptr, 1.0, grad * per_pixel(weight, PIXELS_LAST), channels,
                             gstride_c, gstride_h, gstride_w, cx0, cy0, cfx, cfy, h, w, mask, mask_c, SCATTER_FLOAT,
                             PIXELS_LAST)
    return dfx, dfy


@triton.jit
def upsampled_axis_weight(f0, ff, fine_size, up_scale, coarse_size, target):
    """Along one axis of W(U(src), d): what coarse index ``target`` receives from an output pixel whose warp taps
    are the fine indices f0, f0 + 1 (fraction ``ff``; a tap outside the fine map weighs zero). Each fine tap p is
    U's bilinear sample of the coarse axis at p * up_scale, from coarse taps u0, u0 + 1.

    Returns (weight, d weight / d ff, hit): ``hit`` says whether an in-map fine tap reaches ``target`` at all (its
    weight may still be 0, and 0 * inf is NaN, as in the unmerged sum). The target is not checked against the
    coarse map: callers mask it.
    """
    weight = tl.zeros(ff.shape, dtype=ff.dtype)
    dweight = tl.zeros(ff.shape, dtype=ff.dtype)
    hits = tl.zeros(ff.shape, dtype=tl.int32)
    for D in tl.static_range(2):
        p = f0 + D
        wf, dwf = tap_weight(ff, D)
        u0, uf = source_coordinate(p.to(ff.dtype), 0.0, up_scale, coarse_size)
        d = target - u0
        tap_hit = (p >= 0) & (p < fine_size) & ((d == 0) | (d == 1))
        u = tl.where(d == 0, 1.0 - uf, uf)
        weight += tl.where(tap_hit, wf * u, 0.0)
        dweight += tl.where(tap_hit, dwf * u, 0.0)
        hits += tap_hit.to(tl.int32)
    return weight, dweight, hits > 0


@triton.jit
def upsampled_cell(f0, ff, fine_size, up_scale, coarse_size, K: tl.constexpr):
    """Cell K (0, 1 or 2) of the three coarse cells, from U's lower tap of f0 on, that the fine taps f0, f0 + 1
    reach along one axis when the coarse axis is no longer than the fine one (up_scale <= 1: the two taps' coarse
    corners are at most one apart). Returns (index, weight, d weight / d ff, reached): ``reached`` includes the
    coarse map's bounds."""
    base, _ = source_coordinate(f0.to(ff.dtype), 0.0, up_scale, coarse_size)
    index = base + K
    weight, dweight, hit = upsampled_axis_weight(f0, ff, fine_size, up_scale, coarse_size, index)
    return index, weight, dweight, hit & (index >= 0) & (index < coarse_size)


@triton.jit
def upsampled_cell_sample_tile(
    src_ptr,  # coarse map of one batch row, already offset by n * stride_n
    channels,
    stride_c, stride_h, stride_w,
    x0, y0, fx, fy,  # [BLOCK_P] tap corners and fractions on U's (H, W) grid
    H, W, scale_x, scale_y, h, w,  # U's size and its align-corners scales; h <= H and w <= W
    mask_p, mask_c,
    PIXELS_LAST: tl.constexpr,
):
    """:func:`upsampled_sample_tile` from the at most 3x3 coarse cells the 4 fine taps reach (see
    :func:`upsampled_cell_gradients`): 9 loads per pixel and channel instead of 16."""
    acc = zero_tile(fx, channels, fx.dtype, PIXELS_LAST)
    for KY in tl.static_range(3):
        cy, wy, _, reached_y = upsampled_cell(y0, fy, H, scale_y, h, KY)
        for KX in tl.static_range(3):
            cx, wx, _, reached_x = upsampled_cell(x0, fx, W, scale_x, w, KX)
            ptrs = tile_pointers(src_ptr, cy.to(tl.int64) * stride_h + cx.to(tl.int64) * stride_w,
                                 channels * stride_c, PIXELS_LAST)
            cell = tl.load(ptrs, mask=tile_mask(reached_y & reached_x & mask_p, mask_c, PIXELS_LAST), other=0.0)
            acc += cell.to(fx.dtype) * per_pixel(wx * wy, PIXELS_LAST)
    return acc


@triton.jit
def upsampled_cell_gradients(
    src_ptr,  # coarse map of one batch row, already offset by n * stride_n (read only with OFFSETS)
    grad_src_ptr,  # its gradient buffer (fp32/fp64, or int64 fixed-point sums), offset likewise
    flags_ptr,  # SCATTER_FIXED: int32 flags with the buffer's strides, offset likewise (else unused)
    fixed_scale,  # SCATTER_FIXED: the fixed-point scale (else unused)
    grad,  # incoming gradient tile (pixels x channels, see PIXELS_LAST) in ACC_DTYPE, zero where masked
    channels,
    stride_c, stride_h, stride_w,
    gstride_c, gstride_h, gstride_w,
    x0, y0, fx, fy,  # [BLOCK_P] warp tap corners and fractions on U's (H, W) grid
    H, W, scale_x, scale_y, h, w,  # U's size and its align-corners scales; h <= H and w <= W
    mask_p, mask_c,
    OFFSETS: tl.constexpr,  # return the per-pixel partial sums of the offsets' gradient (reads src)
    SCATTER: tl.constexpr,  # 0 (no scatter), SCATTER_FLOAT or SCATTER_FIXED (fixed_point.py)
    PIXELS_LAST: tl.constexpr,
):
    """The backward of :func:`upsampled_sample_tile` (what :func:`upsampled_tap_gradients` computes) over the at
    most 3x3 coarse cells a pixel's 4 fine taps reach, when the coarse map is no larger than U's grid: the weight
    of a cell is separable, (sum over the fine taps of w_DY u_y) * (sum of w_DX u_x), so 9 loads and 9 atomics
    per pixel and channel replace 16 of each. A cell that any in-map tap reaches gets its merged contribution,
    whatever its weight, so the same cells turn non-finite as in the 16-tap sum for a non-finite gradient (inf
    or NaN: the 16-tap sum can give NaN where an inf meets one zero and one non-zero weight, the merged one inf)."""
    tile_x = zero_tile(fx, channels, fx.dtype, PIXELS_LAST)  # sum over cells of d(weight)/dfx * src
    tile_y = zero_tile(fx, channels, fx.dtype, PIXELS_LAST)
    for KY in tl.static_range(3):
        cy, wy, dwy, reached_y = upsampled_cell(y0, fy, H, scale_y, h, KY)
        for KX in tl.static_range(3):
            cx, wx, dwx, reached_x = upsampled_cell(x0, fx, W, scale_x, w, KX)
            mask = tile_mask(reached_y & reached_x & mask_p, mask_c, PIXELS_LAST)
            row = cy.to(tl.int64)
            col = cx.to(tl.int64)
            if OFFSETS:
                ptrs = tile_pointers(src_ptr, row * stride_h + col * stride_w, channels * stride_c, PIXELS_LAST)
                cell = tl.load(ptrs, mask=mask, other=0.0).to(fx.dtype)
                tile_x += cell * per_pixel(dwx * wy, PIXELS_LAST)
                tile_y += cell * per_pixel(wx * dwy, PIXELS_LAST)
            if SCATTER != 0:
                at = tile_offsets(row * gstride_h + col * gstride_w, channels * gstride_c, PIXELS_LAST)
                scatter_add(grad_src_ptr, flags_ptr, at, grad * per_pixel(wx * wy, PIXELS_LAST), mask, fixed_scale,
                            SCATTER)
    if OFFSETS:
        return channel_sum(grad * tile_x, PIXELS_LAST), channel_sum(grad * tile_y, PIXELS_LAST)
    else:
        return tl.zeros((x0.shape[0],), dtype=fx.dtype), tl.zeros((x0.shape[0],), dtype=fx.dtype)


@triton.jit
def output_pixels(pid_p, H, W, BLOCK_P: tl.constexpr):
    """Rows and columns (int64) of one block of output pixels of an (H, W) grid, and its mask.

    The index arithmetic is int32 (H * W is checked by the launchers; a 64-bit division is slow),
    the results int64 because they multiply strides.
    """
    pixels = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = pixels // W
    return rows.to(tl.int64), (pixels - rows * W).to(tl.int64), pixels < H * W


@triton.jit
def channel_offset(index, stride_c):
    """``index * stride_c`` in int64: a 32-bit product overflows once a map has over 2**31 / index pixels.

    ``tl.cast``, not ``.to()``: a stride of 1 arrives as a constant (a Python int).
    """
    return index * tl.cast(stride_c, tl.int64)


@triton.jit
def load_shift(offsets_ptr, index, stride_c, pixel_offsets, mask_p, ACC_DTYPE: tl.constexpr):
    """Offset channel ``index`` at a block of pixels, as ACC_DTYPE."""
    return tl.load(offsets_ptr + channel_offset(index, stride_c) + pixel_offsets, mask=mask_p, other=0.0).to(ACC_DTYPE)
