"""How many steps the deterministic gathers take, counted on the CPU: pixel bins against the window scan they replaced.

    python -m bench.gather_steps [--scales 1.5 0.5 0.2] [--size 219 219 110 110]

Both gathers run a program per tile of 8x8 source cells (the channels_last tile of ``GATHER_CONFIGS``) and
channel block, and every step loads one candidate output pixel per cell of the tile (offsets, tap weights, a
masked gradient row). So the tile steps per image and channel block are a count of their work, which the
instruction-bound window gathers (ncu on an H200: 62-73 % of the SMs' issue, almost no memory traffic;
bench/README.md, run 3) spent their time on. Counted here, not timed:

* **binned** (today): for each tile and each of its SPAN^2 bin displacements, as many steps as the tile's fullest
  bin holds pixels (``binned_transpose_kernel``'s loop), from the real bins (``pixel_bins``, under the
  interpreter). grad_low over the fine tiles, grad_high over the coarse tiles.
* **window** (until 2026-11-28): every fine tile scanned the low window and then, in the same fused launch, the
  high window for the coarse cells whose home lay in it; each window is the range of ``i - home(t)`` over every
  (pixel, reachable cell) pair per axis (``home(t) = t * (H - 1) // (th - 1)``), recomputed here in float64
  from the same rule as the deleted ``gather_window_kernel``.

Offsets are s·N(0, 1) px per channel, like ``bench.deterministic_backward`` (s = 1.5 there).
"""

from __future__ import annotations

import argparse

import torch

from bench import common  # noqa: F401  (first: sets TRITON_INTERPRET=1 without a GPU)

TILE = 8  # source cells per tile side (GATHER_CONFIGS["channels_last"])


def reached_cells(index: torch.Tensor, shift: torch.Tensor, out_size: int, size: int, composite: bool):
    """(lowest, highest) source cell an output index reaches along one axis, float64 (lowest > highest: none).

    The rule of ``align_fa_gather.reachable_targets``: a bilinear sample reaches floor(x) and floor(x) + 1
    inside the map; the upsample-then-warp reaches, through its fine taps f and f + 1 inside the output grid,
    the coarse cells from floor(f * scale) to floor((f + 1) * scale) + 1.
    """
    scale = (size - 1) / (out_size - 1) if out_size > 1 else 0.0
    pos = torch.nan_to_num(index + shift, nan=-2.0).clamp(-2.0, out_size + 1.0)
    if not composite:
        t0 = torch.floor(pos * scale)
        return t0.clamp(min=0), torch.minimum(t0 + 1, torch.tensor(size - 1.0, dtype=torch.float64))
    f0 = torch.floor(pos)
    lo, hi = f0.clamp(min=0), torch.minimum(f0 + 1, torch.tensor(out_size - 1.0, dtype=torch.float64))
    empty = torch.tensor(float(size), dtype=torch.float64)
    return (torch.where(lo <= hi, torch.floor(lo * scale), empty),
            torch.minimum(torch.floor(hi * scale) + 1, torch.tensor(size - 1.0, dtype=torch.float64)))


def window_area(offsets2: torch.Tensor, target_hw: tuple[int, int], composite: bool) -> int:
    """Displacements the window gather scanned per tile: (d_max - d_min + 1) per axis, multiplied."""
    _, _, H, W = offsets2.shape
    area = 1
    for axis, (out_size, size) in enumerate(((H, target_hw[0]), (W, target_hw[1]))):
        index = torch.arange(out_size, dtype=torch.float64)
        index = index[:, None].expand(H, W) if axis == 0 else index[None, :].expand(H, W)
        shift = offsets2[:, 1 - axis].double()  # (dx, dy): rows take dy
        lo, hi = reached_cells(index, shift, out_size, size, composite)
        other_lo, other_hi = reached_cells(
            *((torch.arange(W, dtype=torch.float64)[None, :].expand(H, W), offsets2[:, 0].double(), W,
               target_hw[1]) if axis == 0 else
              (torch.arange(H, dtype=torch.float64)[:, None].expand(H, W), offsets2[:, 1].double(), H,
               target_hw[0])), composite)
        reaches = (lo <= hi) & (other_lo <= other_hi)

        def home(t, out_size=out_size, size=size):
            return torch.div(t.long() * (out_size - 1), max(size - 1, 1), rounding_mode="floor")

        d_min = (index.long() - home(hi))[reaches].min()
        d_max = (index.long() - home(lo))[reaches].max()
        area *= int(d_max - d_min + 1)
    return area


def binned_steps(offsets2: torch.Tensor, target_hw: tuple[int, int], mode: int) -> int:
    """Tile steps of ``binned_transpose_kernel`` over one image (8x8 tiles, one channel block)."""
    from alignseg.kernels import align_fa_gather as G

    _, _, H, W = offsets2.shape
    th, tw = target_hw
    bins = G.pixel_bins(offsets2.contiguous(), 1, (H, W), target_hw, mode)
    counts = (bins.starts[1:] - bins.starts[:-1]).reshape(th, tw)
    span_y, span_x = G.bin_span(H, th, mode), G.bin_span(W, tw, mode)
    # counts of the bin at (ty - a, tx - b) for every cell, zero off the map; then each tile's fullest
    padded = torch.nn.functional.pad(counts, (span_x, TILE, span_y, TILE))
    steps = 0
    for a in range(span_y):
        for b in range(span_x):
            shifted = padded[span_y - a:span_y - a + th, span_x - b:span_x - b + tw]
            tiles = torch.nn.functional.pad(shifted, (0, -tw % TILE, 0, -th % TILE))
            steps += int(tiles.reshape(-(-th // TILE), TILE, -(-tw // TILE), TILE).amax(dim=(1, 3)).sum())
    return steps


def count(scale: float, H: int, W: int, h: int, w: int, seed: int = 0) -> dict[str, int]:
    """Tile steps per image and channel block of both designs, for offsets of scale·N(0, 1) px."""
    from alignseg.kernels import align_fa_gather as G

    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(1, 4, H, W, generator=generator) * scale
    high, low = offsets[:, 0:2], offsets[:, 2:4]
    fine_tiles = -(-H // TILE) * -(-W // TILE)
    return dict(
        binned_low=binned_steps(low, (H, W), G.DIRECT),
        binned_high=binned_steps(high, (h, w), G.COMPOSITE),
        window_low=fine_tiles * window_area(low, (H, W), composite=False),
        window_high=fine_tiles * window_area(high, (h, w), composite=True),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.5, 0.5, 0.2])
    parser.add_argument("--size", nargs=4, type=int, default=[219, 219, 110, 110], metavar=("H", "W", "h", "w"))
    args = parser.parse_args(argv)
    H, W, h, w = args.size
    print(f"tile steps per image and channel block, upsample-then-warp, {H}x{W} <- {h}x{w} (counted, not timed)")
    print(f"{'offsets':>14} {'binned low':>11} {'binned high':>12} {'window low':>11} {'window high':>12} {'ratio':>6}")
    for scale in args.scales:
        c = count(scale, H, W, h, w)
        binned, window = c["binned_low"] + c["binned_high"], c["window_low"] + c["window_high"]
        print(f"{scale:>5}·N(0, 1) px {c['binned_low']:>11} {c['binned_high']:>12} {c['window_low']:>11} "
              f"{c['window_high']:>12} {window / binned:>5.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
