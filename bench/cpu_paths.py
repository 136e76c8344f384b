"""The CPU paths of the alignment ops side by side: the gather reference vs the ``F.grid_sample`` formulation.

    python -m bench.cpu_paths [--repeats 5] [--threads N]

Without a GPU, ``auto`` runs the ``grid_sample`` formulation (:func:`alignseg.ops.align_fa_grid_sample`);
the gather reference (:func:`alignseg.ops.align_fa_reference`) stays as the test oracle. This times both on
the CPU at the decoder's AlignFA shapes, fp32 channels_last, forward and forward+backward (best of
``repeats`` wall-clock runs, after one warm-up) and prints the ratio. Plain eager PyTorch: no Triton, no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from alignseg.ops import align_fa_grid_sample, align_fa_reference

# (N, C, (H, W) of low and the output, (h, w) of high): the shapes of issue 8, then sizes that are not powers
# of two (the network's own: the grid_sample path zero-pads its sources to a power of two first).
SHAPES = (
    (2, 128, (64, 128), (32, 64)),
    (1, 256, (128, 256), (64, 128)),
    (2, 128, (65, 129), (33, 65)),
)
PATHS: dict[str, Callable] = {"reference": align_fa_reference, "grid_sample": align_fa_grid_sample}


@dataclasses.dataclass
class CpuPathTiming:
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    reference_ms: float
    grid_sample_ms: float

    @property
    def ratio(self) -> float:
        """How many times faster the grid_sample path is than the gather reference."""
        return self.reference_ms / self.grid_sample_ms


def _best_ms(fn: Callable, inputs: tuple[torch.Tensor, ...], backward: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up the allocator and is not counted
        args = [t.detach().requires_grad_(backward) for t in inputs]
        start = time.perf_counter()
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
        elapsed = time.perf_counter() - start
        best = min(best, elapsed) if _ else best
    return best * 1e3


def time_cpu_paths(shapes=SHAPES, repeats: int = 5, dtype: torch.dtype = torch.float32) -> list[CpuPathTiming]:
    """Best-of-``repeats`` times of the reference and grid_sample paths of align_fa, channels_last, on the CPU."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n, c, (H, W), (h, w) in shapes:
        cl = torch.channels_last
        low = torch.randn(n, c, H, W, generator=generator, dtype=dtype).contiguous(memory_format=cl)
        high = torch.randn(n, c, h, w, generator=generator, dtype=dtype).contiguous(memory_format=cl)
        offsets = (2 * torch.randn(n, 4, H, W, generator=generator, dtype=dtype)).contiguous(memory_format=cl)
        inputs = (low, high, offsets)
        for backward in (False, True):
            times = {name: _best_ms(fn, inputs, backward, repeats) for name, fn in PATHS.items()}
            rows.append(CpuPathTiming(f"N={n} C={c} {H}x{W}<-{h}x{w}", "fwd+bwd" if backward else "fwd",
                                      times["reference"], times["grid_sample"]))
    return rows


def format_table(rows: list[CpuPathTiming]) -> str:
    lines = [
        f"{'align_fa fp32 channels_last':<32} {'mode':<8} {'reference ms':>12} {'grid_sample ms':>14} {'ratio':>6}"
    ]
    for r in rows:
        lines.append(f"{r.shape:<32} {r.mode:<8} {r.reference_ms:>12.1f} {r.grid_sample_ms:>14.1f} {r.ratio:>5.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(format_table(time_cpu_paths(repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
