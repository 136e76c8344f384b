"""The op shapes worth benchmarking, and the bytes and FLOPs each op must move and compute there.

Shapes follow AlignSeg-R101 (decoder width C = 256): the deep-stem ResNet maps of an image of size
(H, W) are found with the network's own conv/pool arithmetic (:func:`feature_sizes`), and

* AlignFA stage 1 fuses the stride-4 map ``d1`` with the stride-8 map, stage 2 with stride 16,
  stages 3 and 4 with stride 32 (layer4 and the AlignCM output: the same shape, benchmarked once);
* AlignCM adds a 3x3 pooled context to the stride-32 ``local`` map; a second "stress" case runs it
  on a stride-4 map, where 47k+ pixels per image scatter gradients into nine context cells.

Minimum bytes (``e`` = bytes per feature element, offsets float32; M = N*C*H*W output elements,
m = N*C*h*w source elements, P = N*H*W output pixels):

==========  =======================================================  =========================
op, mode    must read / write                                          bytes
==========  =======================================================  =========================
FA fwd      read low, high, offsets; write out                         e*(2M + m) + 16P
FA bwd      read grad_out, low, high, offsets; write grad_low,         e*(3M + 2m) + 32P
            grad_high, grad_offsets
CM fwd      read context, local, offsets; write out                    e*(2M + m) + 8P
CM bwd      read grad_out, context, offsets; write grad_context,       e*(M + 2m) + 16P
            grad_offsets (grad_local *is* grad_out: nothing to write)
full        fwd + bwd (each pass must touch its own tensors)
==========  =======================================================  =========================

The AlignFA rows hold for both forms of ``align_fa``: the exact (default) form evaluates the upsampled
map ``U(high)`` from ``high`` inside the kernel, so it moves no more than the one-step form. The
authors' chain stores U (M elements) and reads it back in each pass, and its gradient likewise in the
backward: :func:`upsampled_map_bytes` counts that extra traffic (a lower bound; its intermediate
outputs and grids come on top).

FLOPs count the per-channel work only (the per-pixel coordinate and weight arithmetic is shared
by all C channels and negligible at C = 256): a bilinear sample is 4 multiply-adds (8 FLOPs); its
backward scatters 4 products (8) and forms the two position derivatives from the 4 taps (8).
The exact form of AlignFA evaluates U(high) at each of the 4 warp taps (4 x 8), then warps (8):
40 FLOPs for ``high`` forward; backward it recomputes those U values (32), forms the two
derivatives (8) and scatters into 16 coarse taps (32): 72. Those are the counts of the 16-tap kernels that
runs 1-4 measured (bench/results/h200-2026-11-27); kept so their figures stay comparable. Since then, where the
coarse map is no larger than the fine one, the kernels merge the 16 coarse taps into 9 cells
(``alignseg.kernels.align_fa.merged_cells``): 18 FLOPs for ``high`` forward, about 58 backward.
"""

from __future__ import annotations

import dataclasses
import math

DECODER_CHANNELS = 256
OFFSET_BYTES = 4  # offsets are float32 in every benchmark (positions need the precision)

# (name, image height, image width, batch per GPU)
SETTINGS = (
    ("cityscapes-crop", 872, 872, 4),
    ("cityscapes-full", 1024, 2048, 1),
    ("ade20k", 512, 512, 8),
)


def _conv_stride2(size: int) -> int:
    """3x3 (or 1x1) conv, stride 2, padding 1 (0): floor((size - 1) / 2) + 1."""
    return (size - 1) // 2 + 1


def _maxpool_ceil(size: int) -> int:
    """3x3 max-pool, stride 2, padding 1, ceil_mode=True (the deep-stem ResNet's pool)."""
    out = math.ceil((size + 2 - 3) / 2) + 1
    if (out - 1) * 2 >= size + 1:  # a last window starting in the padding is dropped
        out -= 1
    return out


def feature_sizes(height: int, width: int) -> dict[int, tuple[int, int]]:
    """Sizes of the stride-4, 8, 16, 32 maps of the deep-stem ResNet for an image of (height, width)."""
    sizes = {}
    h, w = _maxpool_ceil(_conv_stride2(height)), _maxpool_ceil(_conv_stride2(width))
    for stride in (4, 8, 16, 32):
        sizes[stride] = (h, w)
        h, w = _conv_stride2(h), _conv_stride2(w)
    return sizes


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op at one shape: ``out_hw`` is the output (low / local) size, ``src_hw`` the sampled map's."""

    op: str  # "align_fa" or "align_cm"
    setting: str
    stage: str
    n: int
    c: int
    out_hw: tuple[int, int]
    src_hw: tuple[int, int]

    @property
    def label(self) -> str:
        return f"{self.setting} {self.stage}"

    @property
    def shape_text(self) -> str:
        (oh, ow), (sh, sw) = self.out_hw, self.src_hw
        return f"{self.n}x{self.c}x{oh}x{ow} <- {sh}x{sw}"


def model_cases(channels: int = DECODER_CHANNELS) -> list[OpCase]:
    """The AlignFA and AlignCM shapes of AlignSeg-R101 in the three settings of :data:`SETTINGS`."""
    cases = []
    for setting, height, width, batch in SETTINGS:
        s = feature_sizes(height, width)
        fa = lambda stage, src: OpCase("align_fa", setting, stage, batch, channels, s[4], src)  # noqa: E731
        cases += [
            fa("fa1 s4<-s8", s[8]),
            fa("fa2 s4<-s16", s[16]),
            fa("fa3/4 s4<-s32", s[32]),
            OpCase("align_cm", setting, "cm s32, 3x3 context", batch, channels, s[32], (3, 3)),
            OpCase("align_cm", setting, "cm stress s4, 3x3 context", batch, channels, s[4], (3, 3)),
        ]
    return cases


def smoke_cases() -> list[OpCase]:
    """Tiny CPU shapes. Every source-to-output scale is a whole number, so the authors' formulation
    (upsample, then sample the upsampled map) is exact there and can be checked against the reference."""
    return [
        OpCase("align_fa", "smoke", "fa s1<-s2", 2, 6, (9, 13), (5, 7)),
        OpCase("align_cm", "smoke", "cm 3x3 context", 2, 6, (9, 11), (3, 3)),
    ]


# ----------------------------------------------------------------------------------------------
# Bytes and FLOPs (the formulas of the module docstring).

MODES = ("fwd", "bwd", "full")


def _counts(case: OpCase) -> tuple[int, int, int]:
    (oh, ow), (sh, sw) = case.out_hw, case.src_hw
    return case.n * case.c * oh * ow, case.n * case.c * sh * sw, case.n * oh * ow


def min_bytes(case: OpCase, mode: str, element_bytes: int) -> int:
    """The fewest bytes ``mode`` of ``case`` must move between memory and the chip."""
    out_elems, src_elems, pixels = _counts(case)
    e, o = element_bytes, OFFSET_BYTES
    offset_channels = 4 if case.op == "align_fa" else 2
    if case.op == "align_fa":
        fwd = e * (2 * out_elems + src_elems) + offset_channels * o * pixels
        bwd = e * (3 * out_elems + 2 * src_elems) + 2 * offset_channels * o * pixels
    else:
        fwd = e * (2 * out_elems + src_elems) + offset_channels * o * pixels
        bwd = e * (out_elems + 2 * src_elems) + 2 * offset_channels * o * pixels
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def upsampled_map_bytes(case: OpCase, mode: str, element_bytes: int) -> int:
    """The bytes the authors' chain spends on the stored upsampled map (fwd: write U, read it; bwd: write
    its gradient, read it), which the fused ops never move. Same formula for AlignCM's context."""
    out_elems, _, _ = _counts(case)
    per_pass = 2 * element_bytes * out_elems
    return {"fwd": per_pass, "bwd": per_pass, "full": 2 * per_pass}[mode]


def flops(case: OpCase, mode: str, upsample_first: bool = True) -> int:
    """Floating-point operations of ``mode`` of ``case``, per-channel work only (module docstring);
    ``upsample_first`` picks align_fa's exact form (default) or its one-step form."""
    out_elems, _, _ = _counts(case)
    samples = 2 if case.op == "align_fa" else 1  # bilinear samples per output element
    fwd = out_elems * (8 * samples + 1)  # + the sum of the two samples, or of sample and local
    bwd = out_elems * 16 * samples
    if case.op == "align_fa" and upsample_first:  # high's sample of U(high): see the module docstring
        fwd += out_elems * (40 - 8)
        bwd += out_elems * (72 - 16)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def floor_time_us(case: OpCase, mode: str, element_bytes: int, bandwidth_gbs: float) -> float:
    """The time the minimum bytes take at ``bandwidth_gbs``: no kernel can beat it."""
    return min_bytes(case, mode, element_bytes) / (bandwidth_gbs * 1e9) * 1e6
