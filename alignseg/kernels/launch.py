"""Block sizes and warp counts of every kernel launch, in one place for tuning.

``GPU_CONFIGS`` (channels_last maps with C a multiple of 16), ``GPU_CONFIGS_CONTIGUOUS`` (every other map) and
their fp64 overrides hold what real launches use; edit them (or pass ``config=`` to a launcher) to tune.
Under ``TRITON_INTERPRET=1`` each program instance costs milliseconds of Python, so the
interpreter gets few, large blocks instead (same kernels, different constexprs).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any

import torch
import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_p: int  # output pixels per program (power of two)
    max_block_c: int  # channels per program (or per loop step in the backward): min(this, next_pow2(C))
    num_warps: int


# Chosen so no kernel spills at sm_80/sm_90 (python -m alignseg.kernels.report prints the registers).
# channels_last (the fast path): about 4-16 tile elements per thread; the backward holds the
# gradient tile plus a tap tile and two address tiles per source, so it takes smaller tiles.
GPU_CONFIGS: dict[str, LaunchConfig] = {
    "align_fa_forward": LaunchConfig(block_p=64, max_block_c=64, num_warps=8),
    "align_fa_backward": LaunchConfig(block_p=16, max_block_c=64, num_warps=8),
    # The exact (upsample-first) form reads up to 9 coarse cells per output pixel (16 taps where the coarse map is
    # larger, align_fa.merged_cells): smaller backward tiles.
    "align_fa_forward_exact": LaunchConfig(block_p=64, max_block_c=64, num_warps=8),
    "align_fa_backward_exact": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    # A coarse map larger than the fine one: the exact form's 16 coarse taps a pixel, unmerged (align_fa.merged_cells).
    "align_fa_backward_exact_16_taps": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    "align_cm_forward": LaunchConfig(block_p=64, max_block_c=64, num_warps=8),
    "align_cm_backward": LaunchConfig(block_p=32, max_block_c=64, num_warps=8),
    # The deterministic fixed-point scatter of the sources (no source taps loaded; int64 atomics): the integer
    # conversion and a flag address per element are costly in registers, so two elements a thread (32x32 on 4
    # warps spilled 88-632 B at 255 registers; 16x32 on 8 takes 62-106, fp32/bf16 at sm_80/sm_90).
    "align_fa_scatter": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    "align_fa_scatter_exact": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    # The tiled layout copy (relayout.py): a 64x64 tile, 16 elements a thread, one shared-memory transpose.
    "relayout": LaunchConfig(block_p=64, max_block_c=64, num_warps=8),
}
# Contiguous (NCHW) maps, and channels_last ones with C not a multiple of 16: no axis of a tap's tile is provably
# contiguous (pixels_last orients an NCHW tile so the lanes still run along pixels), the compiler keeps two
# layouts of a tile alive and needs more registers, so smaller tiles.
GPU_CONFIGS_CONTIGUOUS: dict[str, LaunchConfig] = {
    "align_fa_forward": LaunchConfig(block_p=32, max_block_c=32, num_warps=4),
    # Once NCHW tiles were oriented per Triton version (pixels_last), 16x32 on 8 left 8-16 B stacks at 64-128
    # registers under triton 3.9 in the 1-row and 1-column shapes; 32x8 on 8 compiles the whole matrix clean.
    "align_fa_backward": LaunchConfig(block_p=32, max_block_c=8, num_warps=8),
    "align_fa_forward_exact": LaunchConfig(block_p=32, max_block_c=32, num_warps=8),
    # With the coarse cells merged (align_fa.merged_cells) the exact backward needs fewer registers, and at 16x16
    # on 8 ptxas (triton 3.9) aimed for 128 of them and left 8-24 B stacks at sm_80; 16x8 and 32x8 on 8, 32x8 and
    # 16x8 on 4 and 32x16 on 8 also spilled somewhere in the matrix. 16x16 on 4: none, 254 registers at most
    # (1-row maps, C = 20). The 16 taps keep 16x16 on 8 (on 4 they spilled 56-584 B).
    "align_fa_backward_exact": LaunchConfig(block_p=16, max_block_c=16, num_warps=4),
    "align_fa_backward_exact_16_taps": LaunchConfig(block_p=16, max_block_c=16, num_warps=8),
    # 64x32 on 8 warps spilled 28 B at 80 registers in fp16 at sm_90 (ptxas with triton 3.9's
    # --regAllocOptLevel=2, its workaround for a ptxas 13 bug; without that option there is no spill), and with
    # oriented tiles 32x32 on 4 spilled 8 B (fp16, sm_80). align_cm_backward: 32x16 on 4 spilled 8 B under 3.9
    # (1-column maps), 64x16 on 8 24 B under 3.6; 32x32 on 8 takes 177-226 registers under both, no stack.
    "align_cm_forward": LaunchConfig(block_p=32, max_block_c=32, num_warps=8),
    "align_cm_backward": LaunchConfig(block_p=32, max_block_c=32, num_warps=8),
    "align_fa_scatter": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    "align_fa_scatter_exact": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    # The tiled layout copy (relayout.py): a 64x64 tile, 16 elements a thread, one shared-memory transpose.
    "relayout": LaunchConfig(block_p=64, max_block_c=64, num_warps=8),
}

# fp64 takes two registers per tile element and per coordinate: where the tiles above spill in fp64 (at
# sm_80/sm_90, triton 3.9), smaller ones. A hopeless demand is worse than it looks: ptxas then falls back
# to 32 registers and a stack of several KB (align_fa_forward_exact, 64x64 fp64: 6.9 KB of spill stores).
GPU_CONFIGS_FLOAT64: dict[str, LaunchConfig] = {
    "align_fa_forward": LaunchConfig(block_p=64, max_block_c=32, num_warps=8),
    "align_fa_backward": LaunchConfig(block_p=16, max_block_c=32, num_warps=8),
    "align_fa_forward_exact": LaunchConfig(block_p=32, max_block_c=32, num_warps=8),
    "align_fa_backward_exact": LaunchConfig(block_p=16, max_block_c=16, num_warps=8),
    "align_fa_backward_exact_16_taps": LaunchConfig(block_p=16, max_block_c=16, num_warps=8),
}
GPU_CONFIGS_CONTIGUOUS_FLOAT64: dict[str, LaunchConfig] = {
    "align_fa_backward": LaunchConfig(block_p=32, max_block_c=4, num_warps=4),  # 32x8 on 8: 8-24 B stacks
    # 16x8 on 8 (and 16x8 on 4): 8-16 B stacks once the coarse cells were merged; 32x4 on 4 compiles clean.
    "align_fa_backward_exact": LaunchConfig(block_p=32, max_block_c=4, num_warps=4),
    "align_fa_backward_exact_16_taps": LaunchConfig(block_p=16, max_block_c=8, num_warps=8),
    "align_cm_backward": LaunchConfig(block_p=16, max_block_c=16, num_warps=4),
    # 16x32 on 8: an 8 B stack at sm_80 in 1-column maps once the finiteness test became a comparison (fixed_point.py).
    "align_fa_scatter_exact": LaunchConfig(block_p=32, max_block_c=8, num_warps=4),
}

# Hopper (sm_90) overrides of GPU_CONFIGS, measured faster there. sm_80's ptxas cannot fit them: 255 registers and
# a 128-160 B stack under triton 3.9, a fallback to 32-64 registers and a 1.2-1.4 KB stack under 3.6, where sm_90
# takes 213-246 registers and no stack.
GPU_CONFIGS_SM90: dict[str, LaunchConfig] = {
    # 1.61x faster than 16x32 on 8 on an H200 (bf16, triton 3.6, N=8 C=256 219x219 <- 110x110: 3.11 against
    # 5.00 ms; python -m bench.profile_backward sweep, bench/results/h200-2026-11-27/run3_sweep.txt).
    "align_fa_backward_exact": LaunchConfig(block_p=32, max_block_c=32, num_warps=8),
    "align_fa_backward_exact_16_taps": LaunchConfig(block_p=32, max_block_c=32, num_warps=8),
}

INTERPRETER_CONFIG = LaunchConfig(block_p=1024, max_block_c=128, num_warps=1)

# tl.dot (the per-program context reduction of align_cm) needs every dimension >= 16.
MIN_DOT_SIZE = 16
# align_cm reduces the context gradient per program when the context has at most this many cells;
# larger contexts scatter with atomics like align_fa.
MAX_REDUCED_CELLS = 64


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One planned launch: what the launchers run and what alignseg/kernels/report.py compiles ahead of time."""

    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple[Any, ...]  # runtime arguments, in the kernel's order
    constexprs: dict[str, Any]
    num_warps: int

    def __call__(self) -> None:
        with device_guard(self.args):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


def device_guard(args: tuple[Any, ...]) -> contextlib.AbstractContextManager:
    """``torch.cuda.device`` of the first tensor in ``args`` when it is a CUDA tensor, else a no-op.

    Triton launches on the current CUDA device, not the tensors' (tensors on cuda:1 with device 0 current
    would fail); the guard costs little when the device is already current.
    """
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version() -> tuple[int, int]:
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


# The axis of a 2-D tile that Triton lays fastest across a warp's lanes when neither axis is provably contiguous
# (a gathered load, an atomic at data-dependent addresses): the first up to triton 3.6, the last from 3.7 on
# (read from the compiled layouts; tests/test_kernels_launch.py checks it against the installed compiler). An
# axis the compiler can prove contiguous (a channels_last map's channels) is laid fastest in every version.
FIRST_AXIS_WINS_TIES = triton_version() < (3, 7)


def pixels_last(features: torch.Tensor) -> bool:
    """The ``PIXELS_LAST`` orientation of the kernels' tiles for ``features``: [BLOCK_C, BLOCK_P] if True, else
    [BLOCK_P, BLOCK_C].

    The aim is a warp reading neighbouring addresses. A channels_last map's channels are contiguous and provably
    so, and the compiler lays them fastest: [BLOCK_P, BLOCK_C]. In a contiguous (NCHW) map the neighbouring
    addresses are neighbouring pixels, which the compiler cannot prove for a tap at a learned offset, so the
    pixels go on the axis the compiler lays fastest when nothing is proven (:data:`FIRST_AXIS_WINS_TIES`).
    """
    if contiguous_channels(features):
        return False
    return not FIRST_AXIS_WINS_TIES


def contiguous_channels(features: torch.Tensor) -> bool:
    """Whether each pixel's channels are adjacent in memory (channels_last, with more than one channel)."""
    return features.stride(1) == 1 and features.shape[1] > 1


def stage_channels_last(features: torch.Tensor) -> bool:
    """Whether a backward pass should run on a channels_last copy of ``features``: a 4-D map whose channels are not
    adjacent but whose copy would get vector loads (C a multiple of 16).

    A contiguous (NCHW) map's scatter sends each warp's atomics to 16-32 cache lines, a channels_last one's to one
    or two. On an H200 (bf16, triton 3.6, the issue-12 shape) the atomic align_fa backward took 18.2 ms on
    contiguous maps, 3.06 ms on channels_last ones, and 5.25 ms on contiguous maps staged through PyTorch's own
    permuting copies; the tiled copy of relayout.py now does the staging (estimated 0.3 ms there, not yet
    measured). See bench/README.md, "Contiguous maps in the backward".
    """
    return features.dim() == 4 and not contiguous_channels(features) and features.shape[1] % 16 == 0


def vector_loads(features: torch.Tensor) -> bool:
    """Whether the kernels read ``features`` as contiguous channel vectors: channels_last with C a multiple of 16.

    Triton's JIT marks an integer argument divisible by 16; only then are the pixel strides of a channels_last
    map (C, W * C) known to keep each pixel's channel vector aligned for vector loads. With any other C every
    element is a scalar load with its own 64-bit address, which costs registers like the contiguous layout.
    """
    return contiguous_channels(features) and features.shape[1] % 16 == 0


def launch_config(kernel: str, features: torch.Tensor, config: LaunchConfig | None = None) -> LaunchConfig:
    """``config`` if given, else the interpreter's, else the GPU one for the layout, channels and dtype of ``features``.

    ``GPU_CONFIGS`` for vector loads (:func:`vector_loads`), else ``GPU_CONFIGS_CONTIGUOUS``; fp64 overrides
    some of either (``GPU_CONFIGS_FLOAT64``, ``GPU_CONFIGS_CONTIGUOUS_FLOAT64``).
    """
    if config is not None:
        return config
    if interpreting():
        return INTERPRETER_CONFIG
    vectorised = vector_loads(features)
    table = GPU_CONFIGS if vectorised else GPU_CONFIGS_CONTIGUOUS
    if features.dtype == torch.float64:
        table = {**table, **(GPU_CONFIGS_FLOAT64 if vectorised else GPU_CONFIGS_CONTIGUOUS_FLOAT64)}
    elif vectorised and target_arch(features) == 90:
        table = {**table, **GPU_CONFIGS_SM90}
    return table[kernel]


_PLANNING_FOR: contextvars.ContextVar[int | None] = contextvars.ContextVar("planning_for", default=None)


def target_arch(features: torch.Tensor) -> int | None:
    """The compute capability (major * 10 + minor) a launch on ``features`` is planned for: the one
    :func:`planning_for` names (the ahead-of-time report), else ``features``' GPU's, else None (CPU tensors)."""
    planned = _PLANNING_FOR.get()
    if planned is not None:
        return planned
    if features.is_cuda:
        major, minor = torch.cuda.get_device_capability(features.device)
        return 10 * major + minor
    return None


@contextlib.contextmanager
def planning_for(arch: int):
    """Plan launches for sm_<arch> (its configs) whatever device the tensors are on: ``with planning_for(90): ...``."""
    token = _PLANNING_FOR.set(arch)
    try:
        yield
    finally:
        _PLANNING_FOR.reset(token)


def channel_block(channels: int, config: LaunchConfig, minimum: int = 1) -> int:
    """Channels per block: a power of two up to ``config.max_block_c`` (a LaunchConfig or a gather's GatherConfig)."""
    return max(minimum, min(config.max_block_c, triton.next_power_of_2(channels)))


def align_corners_scale(src_size: int, out_size: int) -> float:
    """(src_size - 1) / (out_size - 1), 0 for an output size of 1: the rule of alignseg.ops.sampling
    (repeated here because kernels/ does not import the ops), computed on the host for fp32 kernels."""
    return (src_size - 1) / (out_size - 1) if out_size > 1 else 0.0


def strides(t: torch.Tensor) -> tuple[int, ...]:
    """(n, c, h, w) strides in elements: the kernels address every tensor through them."""
    return tuple(t.stride())


def accumulation_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """fp64 for fp64 inputs, else fp32: as a torch dtype (buffers) and a Triton dtype (constexpr)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


MAX_PIXELS = 2**31 - 2**16  # pixel indices are int32 inside the kernels, blocks included


def check_index_range(name: str, t: torch.Tensor) -> None:
    """The kernels index the pixels of one map in int32 and put the batch on a grid axis (limit 65535)."""
    if t.shape[-2] * t.shape[-1] >= MAX_PIXELS:
        raise ValueError(f"{name} has {t.shape[-2] * t.shape[-1]} pixels per map; "
                         f"the kernels support fewer than {MAX_PIXELS}")
    if t.shape[0] > 65535:
        raise ValueError(f"{name} has batch size {t.shape[0]}; the kernels' grid supports at most 65535")
