"""A tiny kernel whose compiled layout shows how the installed Triton orients a gathered tile.

A 2-D load at data-dependent addresses gives the compiler no contiguity to follow, so which tile axis it lays
fastest across a warp's lanes is its tie-break, and that changed between versions (the first axis in triton 3.6,
the last in 3.7 to 3.9). :func:`alignseg.kernels.report.first_axis_wins_ties` compiles this kernel ahead of time
and reads the layout; the kernels' tile orientation (:func:`alignseg.kernels.launch.pixels_last`) depends on it.
Never launched.
"""

import triton
import triton.language as tl


# out[i] = sum over j of src[index[i] * stride + index[ROWS + j]]: rows and columns both gathered.
@triton.jit
def gathered_tile_kernel(out_ptr, src_ptr, index_ptr, stride, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.load(index_ptr + tl.arange(0, ROWS))
    cols = tl.load(index_ptr + ROWS + tl.arange(0, COLS))
    tile = tl.load(src_ptr + rows[:, None] * stride + cols[None, :])
    tl.store(out_ptr + tl.arange(0, ROWS), tl.sum(tile, axis=1))
