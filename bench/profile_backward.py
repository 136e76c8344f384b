"""The align_fa backward on a GPU, kernel by kernel: a launch-config sweep, and one run of each path for ``ncu``.

    python -m bench.profile_backward sweep [--dtypes bf16] [--layouts channels_last contiguous]
    ncu --clock-control none -k regex:'align_fa|gather|finalize' --section SpeedOfLight ... \\
        python -m bench.profile_backward paths

``sweep`` times the atomic backward (both AlignFA forms), the fixed-point scatter of the sources and the one-launch
gather backward at the issue 12 shape (N=8, C=256, 219x219 <- 110x110), and the AlignCM backward at its stride-4 stress
shape (N=4, 3x3 context; also with 1 and 4 pixel blocks per program, against ``TARGET_PROGRAMS``' choice), under a
few launch configs each, the table's own config first, and prints each time against the table's; a config that
fails to compile or launch is reported and skipped (the candidates are not checked for spills: the compile matrix
checks the tables only).
``paths`` runs each backward path once per layout (atomic, fixed point, gathers; both forms), printing a marker
line before each, so a profiler's kernel list can be read path by path. Both need a GPU; without one they run
tiny shapes under the interpreter, which only shows that the script works.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import HAS_GPU, SMOKE_BANNER, measure  # sets TRITON_INTERPRET without a GPU
from bench.deterministic_backward import DTYPES, LAYOUTS, fa_inputs

# (block_p, max_block_c, num_warps) tried per kernel, besides the table's own.
CANDIDATES = ((16, 64, 8), (32, 32, 8), (64, 16, 8), (64, 8, 4), (128, 8, 8))
# (tile_h, tile_w, max_block_c, num_warps, pixel_block) of the one-launch gather backward (GatherConfig;
# pixel_block: its offsets-gradient step), besides the table's own (FUSED_GATHER_CONFIGS).
GATHER_CANDIDATES = ((8, 8, 64, 8, 16), (8, 8, 32, 8, 8), (8, 8, 64, 4, 8), (4, 8, 64, 8, 8), (8, 16, 64, 8, 8),
                     (16, 16, 32, 8, 16), (2, 32, 32, 8, 16))


def inputs(dtype: torch.dtype, fmt: torch.memory_format) -> tuple[torch.Tensor, ...]:
    """(grad, low, high, offsets), the backward launchers' argument order, at issue 12's shape."""
    low, high, offsets, grad = fa_inputs(dtype, fmt)
    return grad, low, high, offsets


def cm_inputs(dtype: torch.dtype, fmt: torch.memory_format) -> tuple[torch.Tensor, ...]:
    """(grad, context, offsets) of the AlignCM backward at the stride-4 stress shape (tiny without a GPU)."""
    n, c, H, W = (4, 256, 219, 219) if HAS_GPU else (1, 4, 13, 11)
    dev = "cuda" if HAS_GPU else "cpu"
    grad = torch.randn(n, c, H, W, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    context = torch.randn(n, c, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    return grad, context, (torch.randn(n, 2, H, W, device=dev) * 1.5).contiguous(memory_format=fmt)


def time_configs(dname: str, lname: str, name: str, configs: list, table, label, run) -> None:
    """Time ``run(config)`` for each config (only the table's without a GPU), against the first that runs."""
    base = None
    for cfg in configs if HAS_GPU else configs[:1]:
        try:
            median, p20, p80 = measure(lambda cfg=cfg: run(cfg))
        except Exception as error:  # noqa: BLE001  (a config that does not compile is a result too)
            print(f"{dname:5} {lname:13} {name:24} {label(cfg):12} failed: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:100]}", flush=True)
            continue
        base = median if base is None else base
        mark = " (table)" if cfg == table else ""
        print(f"{dname:5} {lname:13} {name:24} {label(cfg):12} {median * 1e3:9.1f} us "
              f"[{p20 * 1e3:.1f}, {p80 * 1e3:.1f}]  {base / median:5.2f}x the table's{mark}", flush=True)


def sweep(dtype_names, layout_names) -> None:
    from alignseg.kernels import launch as launch_module
    from alignseg.kernels.align_cm import align_cm_backward
    from alignseg.kernels.align_fa import align_fa_backward, align_fa_sources_fixed_point
    from alignseg.kernels.align_fa_gather import (
        FUSED_GATHER_CONFIGS,
        GatherConfig,
        align_fa_backward_deterministic,
        gather_config,
    )

    kernels = (
        ("align_fa_backward_exact", lambda g, lo, hi, o, cfg: align_fa_backward(g, lo, hi, o, config=cfg)),
        ("align_fa_backward", lambda g, lo, hi, o, cfg: align_fa_backward(g, lo, hi, o, config=cfg,
                                                                           upsample_first=False)),
        ("align_fa_scatter_exact", lambda g, lo, hi, o, cfg: align_fa_sources_fixed_point(g, lo, hi, o, config=cfg)),
        ("align_fa_scatter", lambda g, lo, hi, o, cfg: align_fa_sources_fixed_point(g, lo, hi, o, config=cfg,
                                                                                     upsample_first=False)),
    )
    for dname in dtype_names:
        for lname in layout_names:
            args = inputs(DTYPES[dname], LAYOUTS[lname])
            for name, fn in kernels:
                table = launch_module.launch_config(name, args[1])
                configs = [table] + [launch_module.LaunchConfig(*c) for c in CANDIDATES
                                     if launch_module.LaunchConfig(*c) != table]
                time_configs(dname, lname, name, configs, table,
                             lambda cfg: f"{cfg.block_p}x{cfg.max_block_c}/{cfg.num_warps}",
                             lambda cfg, fn=fn: fn(*args, cfg))
            cm_args = cm_inputs(DTYPES[dname], LAYOUTS[lname])
            table = launch_module.launch_config("align_cm_backward", cm_args[0])
            configs = [table] + [launch_module.LaunchConfig(*c) for c in CANDIDATES
                                 if launch_module.LaunchConfig(*c) != table]
            for per_program in (None, 1, 4):
                time_configs(dname, lname, f"align_cm_backward/{per_program or 'auto'}", configs, table,
                             lambda cfg: f"{cfg.block_p}x{cfg.max_block_c}/{cfg.num_warps}",
                             lambda cfg, per_program=per_program: align_cm_backward(
                                 *cm_args, config=cfg, pixel_blocks_per_program=per_program))
            table = gather_config(args[0], None, FUSED_GATHER_CONFIGS)
            configs = [table] + [GatherConfig(*c) for c in GATHER_CANDIDATES if GatherConfig(*c) != table]
            for first in (True, False):
                time_configs(dname, lname, f"gather_backward{'_exact' if first else ''}", configs, table,
                             lambda cfg: f"{cfg.tile_h}x{cfg.tile_w}x{cfg.max_block_c}/{cfg.num_warps}"
                                         f"p{cfg.pixel_block or '-'}",
                             lambda cfg, first=first: align_fa_backward_deterministic(*args, upsample_first=first,
                                                                                      config=cfg))


def paths(dtype_names, layout_names) -> None:
    from alignseg.kernels.align_fa import align_fa_backward, align_fa_sources_fixed_point
    from alignseg.kernels.align_fa_gather import align_fa_backward_deterministic

    runs = (("atomic", align_fa_backward), ("fixed point", align_fa_sources_fixed_point),
            ("gathers", align_fa_backward_deterministic))
    for dname in dtype_names:
        for lname in layout_names:
            args = inputs(DTYPES[dname], LAYOUTS[lname])
            for first in (True, False):
                for label, fn in runs:
                    print(f"== {dname} {lname} {label} ({'upsample-first' if first else 'one-step'})", flush=True)
                    fn(*args, upsample_first=first)
                    if HAS_GPU:
                        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("sweep", "paths"))
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["channels_last", "contiguous"], choices=sorted(LAYOUTS))
    args = parser.parse_args(argv)
    if not HAS_GPU:
        print(SMOKE_BANNER)
    (sweep if args.what == "sweep" else paths)(args.dtypes, args.layouts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
