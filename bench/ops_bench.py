"""Microbenchmarks of ``align_fa`` and ``align_cm``: the Triton kernels against eager PyTorch and torch.compile.

Providers (all compute the same math):

* ``triton``: the library ops on the Triton backend (ours; ``align_fa`` in its default exact form,
  upsample-then-warp fused);
* ``one_step``: ``align_fa(..., upsample_first=False)`` on the Triton backend, the one-step variant
  (a different function, checked against its own reference; align_fa only);
* ``reference``: the library's eager reference (``align_fa_reference`` / ``align_cm_reference``);
* ``authors``: the authors' formulation (:mod:`bench.baselines`: upsample, two ``grid_sample``, add);
* ``compiled``: ``torch.compile`` of the library reference (static shapes, recompiled per shape).

Modes: ``fwd`` (the training forward: inputs require grad), ``bwd`` (backward of one retained
forward), ``full`` (forward + backward). Before any timing, every provider's output and gradients
are compared with the reference evaluated in float64 on the same inputs and output gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import torch
import torch._functorch.config

from bench import common  # noqa: F401  (first: sets TRITON_INTERPRET=1 without a GPU)

# isort: split
from alignseg.ops import align_cm, align_cm_reference, align_fa, align_fa_reference, use_backend
from alignseg.ops.sampling import _align_corners_scale
from bench.baselines import align_cm_authors, align_fa_authors, authors_formulation_is_exact
from bench.common import HAS_GPU, log, measure, peak_memory_mib
from bench.shapes import MODES, OpCase, flops, min_bytes

PROVIDERS = ("triton", "one_step", "reference", "authors", "compiled")
BASELINES = ("one_step", "reference", "authors", "compiled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

_PUBLIC = {"align_fa": align_fa, "align_cm": align_cm}
_REFERENCE = {"align_fa": align_fa_reference, "align_cm": align_cm_reference}
_AUTHORS = {"align_fa": align_fa_authors, "align_cm": align_cm_authors}
_ONE_STEP = {"align_fa": functools.partial(align_fa, upsample_first=False)}
_ONE_STEP_REFERENCE = {"align_fa": functools.partial(align_fa_reference, upsample_first=False)}

# Largest error allowed against the float64 reference, relative to the largest magnitude of the
# float64 result: fp32 providers must match closely; bf16 ones may be a few bf16 roundings off
# (bf16 has 8 significant bits, 2**-8 = 0.004), or three times the eager reference's own error.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
KNOT_MARGIN = 0.01  # source pixels between a sampling position and the nearest whole pixel (make_inputs)


@dataclasses.dataclass
class OpInputs:
    """The differentiable arguments of one op call (in the op's argument order) and a shared grad_output."""

    args: list[torch.Tensor]
    grad_out: torch.Tensor
    names: list[str]


def make_inputs(
    case: OpCase, dtype: torch.dtype, layout: torch.memory_format, device: torch.device, seed: int = 0
) -> OpInputs:
    """Random features and realistic offsets (a pixel or two, float32, in the features' memory format).

    Every sampling position stays inside its map, short of the last row and column, and at least
    ``KNOT_MARGIN`` source pixels from a whole-pixel position in each axis, both of the source (the
    one-step form's knots) and of the output grid (the exact form's). At a whole pixel the
    gradient with respect to the offset is one-sided by convention, so two correct implementations
    whose positions differ in the last bit (a GPU's fast fp32 division, a fused multiply-add) could
    pick opposite sides there, and the comparison would flag a difference that is no error.
    """
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no host-to-device copies
    n, c = case.n, case.c
    (oh, ow), (sh, sw) = case.out_hw, case.src_hw

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def feature(h: int, w: int) -> torch.Tensor:
        return normal(n, c, h, w).to(dtype).contiguous(memory_format=layout).requires_grad_()

    def away_from_knots(index: torch.Tensor, shift: torch.Tensor, out_size: int, src_size: int) -> torch.Tensor:
        # Inside the output grid, short of its last line: the one-sided derivative there would read
        # the zero padding, where the authors' formulation legitimately differs from the others.
        position = (index + shift).clamp(0, out_size - 1.001)
        scale = _align_corners_scale(src_size, out_size)
        if scale != 0:  # off the whole pixels of the source (the one-step form samples it directly)
            source = position * scale
            whole = source.floor()
            position = (whole + (source - whole).clamp(2 * KNOT_MARGIN, 1 - 2 * KNOT_MARGIN)) / scale
        # ... and of the output grid (the exact form warps there): a nudge of at most KNOT_MARGIN output
        # pixels, at most as many source pixels, keeps the margin above.
        whole = position.floor()
        position = whole + (position - whole).clamp(KNOT_MARGIN, 1 - KNOT_MARGIN)
        return position - index

    def offsets(src_sizes: list[tuple[int, int]]) -> torch.Tensor:
        d = 1.5 * normal(n, 2 * len(src_sizes), oh, ow)
        cols = torch.arange(ow, dtype=torch.float32, device=device).view(1, 1, ow)
        rows = torch.arange(oh, dtype=torch.float32, device=device).view(1, oh, 1)
        for pair, (src_h, src_w) in enumerate(src_sizes):
            d[:, 2 * pair] = away_from_knots(cols, d[:, 2 * pair], ow, src_w)
            d[:, 2 * pair + 1] = away_from_knots(rows, d[:, 2 * pair + 1], oh, src_h)
        return d.contiguous(memory_format=layout).requires_grad_()

    if case.op == "align_fa":
        args, names = [feature(oh, ow), feature(sh, sw), offsets([(sh, sw), (oh, ow)])], ["low", "high", "offsets"]
    else:
        args, names = [feature(sh, sw), offsets([(sh, sw)]), feature(oh, ow)], ["context", "offsets", "local"]
    grad_out = normal(n, c, oh, ow).to(dtype).contiguous(memory_format=layout)
    return OpInputs(args, grad_out, names)


def _on_triton(public: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: torch.Tensor) -> torch.Tensor:
        with use_backend("triton"):
            return public(*args)

    return run


def provider_fn(op: str, provider: str, compile_backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """The callable a provider times for ``op`` (None where it does not apply: ``one_step`` of align_cm).
    ``compiled`` gives a fresh static-shape compile."""
    if provider == "triton":
        return _on_triton(_PUBLIC[op])
    if provider == "one_step":
        return _on_triton(_ONE_STEP[op]) if op in _ONE_STEP else None
    if provider == "reference":
        return _REFERENCE[op]
    if provider == "authors":
        return _AUTHORS[op]
    if provider == "compiled":
        return torch.compile(_REFERENCE[op], dynamic=False, backend=compile_backend)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def forward_backward(fn: Callable[..., torch.Tensor], inputs: OpInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and input gradients of one call, for the agreement check."""
    for a in inputs.args:
        a.grad = None
    out = fn(*inputs.args)
    out.backward(inputs.grad_out)
    grads = [a.grad.detach().clone() for a in inputs.args]
    for a in inputs.args:
        a.grad = None
    return out.detach(), grads


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (x.double() - reference).abs().max().item() / max(scale, 1e-12)


def check_agreement(
    case: OpCase, inputs: OpInputs, fns: dict[str, Callable[..., torch.Tensor]], dtype: torch.dtype
) -> dict[str, dict]:
    """Compare output and every gradient of each provider with the float64 reference.

    Returns, per provider, ``{"ok": bool | None, "max_rel_err": float | None, "worst": str, "note": str}``;
    ``ok`` is None where the comparison does not apply (the authors' formulation runs its grid in the
    features' dtype, and its align_cm only matches on whole-number scales: see :mod:`bench.baselines`).
    The ``one_step`` provider is compared with its own reference (``upsample_first=False``).
    """
    exact64 = [a.detach().double().requires_grad_() for a in inputs.args]
    oracle = OpInputs(exact64, inputs.grad_out.double(), inputs.names)
    references = {"default": _REFERENCE[case.op]}
    if "one_step" in fns:
        references["one_step"] = _ONE_STEP_REFERENCE[case.op]

    def errors(fn: Callable[..., torch.Tensor], targets: list[tuple[str, torch.Tensor]]) -> list[tuple[float, str]]:
        out, grads = forward_backward(fn, inputs)
        return [(_relative_error(x, ref), name) for x, (name, ref) in zip([out, *grads], targets)]

    checks = {}
    for form, reference in references.items():
        ref_out, ref_grads = forward_backward(reference, oracle)
        targets = [("out", ref_out)] + [(f"grad_{name}", g) for name, g in zip(inputs.names, ref_grads)]
        own_error = max(errors(reference, targets))[0]  # the eager reference at this dtype
        checks[form] = targets, max(TOLERANCE[dtype], 3 * own_error)
    report = {}
    for provider, fn in fns.items():
        comparable = dtype == torch.float32 and (
            case.op == "align_fa" or authors_formulation_is_exact(case.out_hw, case.src_hw)
        )
        if provider == "authors" and not comparable:
            why = "bf16 grid" if dtype != torch.float32 else "scale not a whole number"
            report[provider] = {"ok": None, "max_rel_err": None, "worst": "", "note": f"not comparable ({why})"}
            continue
        targets, allowed = checks["one_step" if provider == "one_step" else "default"]
        err, worst = max(errors(fn, targets))
        report[provider] = {"ok": err <= allowed, "max_rel_err": err, "worst": worst, "note": f"allowed {allowed:.1e}"}
    return report


def timed_call(fn: Callable[..., torch.Tensor], inputs: OpInputs, mode: str) -> Callable[[], object]:
    """The zero-argument call that ``mode`` times (``bwd`` runs its forward now, once)."""
    if mode == "fwd":
        return lambda: fn(*inputs.args)
    if mode == "bwd":
        out = fn(*inputs.args)
        return lambda: out.backward(inputs.grad_out, retain_graph=True)
    if mode == "full":
        return lambda: fn(*inputs.args).backward(inputs.grad_out)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def bench_config(
    case: OpCase,
    dtype_name: str,
    layout_name: str,
    *,
    providers: Sequence[str] = PROVIDERS,
    modes: Sequence[str] = MODES,
    compile_backend: str = "inductor",
    copy_gbs: float | None = None,
    rep_ms: float = 100,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Check, then time, every provider and mode of one (case, dtype, layout); one row per point,
    each passed to ``on_row`` as soon as it is measured (the speed-ups are added once all are)."""
    # ``bwd`` reruns backward on one retained graph; a compiled backward may only do that without
    # buffer donation (donation only lets it free saved tensors early: the timing is unaffected).
    no_donation = {"donated_buffer": False} if hasattr(torch._functorch.config, "donated_buffer") else {}
    with torch._functorch.config.patch(**no_donation):
        return _bench_config(case, dtype_name, layout_name, providers, modes, compile_backend, copy_gbs, rep_ms, on_row)


def _bench_config(
    case, dtype_name, layout_name, providers, modes, compile_backend, copy_gbs, rep_ms, on_row=None
) -> list[dict]:
    dtype, layout = DTYPES[dtype_name], LAYOUTS[layout_name]
    inputs = make_inputs(case, dtype, layout, common.device())
    torch._dynamo.reset()  # a fresh static compile per shape, and no recompile limit to run into
    fns = {p: fn for p in providers if (fn := provider_fn(case.op, p, compile_backend)) is not None}
    agreement = check_agreement(case, inputs, fns, dtype)
    element_bytes = torch.finfo(dtype).bits // 8
    rows = []
    for provider, fn in fns.items():
        for mode in modes:
            timed = timed_call(fn, inputs, mode)
            median, p20, p80 = measure(timed, grad_to_none=inputs.args, warmup_ms=10 if HAS_GPU else 0, rep_ms=rep_ms)
            # The kernels alone, without the Python launch path (empty on the CPU). Not for ``bwd``:
            # its retained forward ran outside the capture stream.
            graph_ms = common.measure_cudagraph(timed, inputs.args) if mode != "bwd" else None
            nbytes = min_bytes(case, mode, element_bytes)
            gbs = nbytes / (median * 1e-3) / 1e9
            check = agreement[provider]
            rows.append(
                {
                    "op": case.op,
                    "case": case.label,
                    "shape": case.shape_text,
                    "dtype": dtype_name,
                    "layout": layout_name,
                    "provider": provider + (
                        f"({compile_backend})" if provider == "compiled" and compile_backend != "inductor" else ""
                    ),
                    "mode": mode,
                    "ms": median,
                    "ms_p20": p20,
                    "ms_p80": p80,
                    "ms_cudagraph": graph_ms,
                    "min_bytes": nbytes,
                    "flops": flops(case, mode, upsample_first=provider != "one_step"),
                    "gbs": gbs,
                    "frac_of_copy": gbs / copy_gbs if copy_gbs else None,
                    "floor_ms": nbytes / (copy_gbs * 1e9) * 1e3 if copy_gbs else None,
                    "peak_mib": peak_memory_mib(timed, inputs.args),
                    "agrees": check["ok"],
                    "max_rel_err": check["max_rel_err"],
                    "check_note": (
                        check["note"] if check["ok"] is not False else f"{check['worst']} off: {check['note']}"
                    ),
                }
            )
            if on_row is not None:
                on_row(rows[-1])
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """On each triton row: how many times faster it is than each baseline at the same mode."""
    by_mode = {(r["provider"].split("(")[0], r["mode"]): r for r in rows}
    for (provider, mode), row in by_mode.items():
        if provider != "triton":
            continue
        for baseline in BASELINES:
            other = by_mode.get((baseline, mode))
            row[f"x_vs_{baseline}"] = other["ms"] / row["ms"] if other else None


def run_suite(
    cases: Sequence[OpCase],
    configs: Sequence[tuple[str, str]],
    *,
    providers: Sequence[str] = PROVIDERS,
    modes: Sequence[str] = MODES,
    compile_backend: str = "inductor",
    copy_gbs: float | None = None,
    budget_s: float | None = None,
    rep_ms: float = 100,
) -> tuple[list[dict], list[str]]:
    """Every case at every (dtype, layout) of ``configs``, in that order; stops starting new ones after
    ``budget_s``. Returns the rows and a list of what was skipped for lack of time.
    """
    configs = [(case, d, lay) for d, lay in configs for case in cases]
    start = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []
    for i, (case, dtype_name, layout_name) in enumerate(configs, 1):
        title = f"{case.op} {case.label} [{case.shape_text}] {dtype_name} {layout_name}"
        if budget_s is not None and time.perf_counter() - start > budget_s:
            skipped.append(title)
            continue
        log(f"ops {i}/{len(configs)}: {title}")
        config_rows = bench_config(
            case, dtype_name, layout_name, providers=providers, modes=modes,
            compile_backend=compile_backend, copy_gbs=copy_gbs, rep_ms=rep_ms,
        )
        for row in config_rows:
            if row["agrees"] is False:
                log(
                    f"  DISAGREES: {row['provider']} {row['mode']}: {row['check_note']} "
                    f"(max rel err {row['max_rel_err']:.2e})"
                )
        rows += config_rows
    if skipped:
        log(
            f"ops: time budget of {budget_s:.0f} s spent; {len(skipped)} configurations not run (listed in the summary)"
        )
    return rows, skipped


TABLE_COLUMNS = (
    ("op", "op", ""),
    ("case", "case", ""),
    ("dtype", "dtype", ""),
    ("layout", "layout", ""),
    ("mode", "mode", ""),
    ("triton ms", "ms", ".3f"),
    ("p20-p80", "spread", ""),
    ("GB/s", "gbs", ".0f"),
    ("% copy", "pct_copy", ".0f"),
    ("floor ms", "floor_ms", ".3f"),
    ("x authors", "x_vs_authors", ".2f"),
    ("x one-step", "x_vs_one_step", ".2f"),
    ("x compiled", "x_vs_compiled", ".2f"),
    ("x reference", "x_vs_reference", ".2f"),
    ("peak MiB", "peak_mib", ".1f"),
    ("all agree", "all_agree", ""),
)


def summary_rows(rows: Sequence[dict]) -> list[dict]:
    """One line per (case, dtype, layout, mode): the triton row with its speed-ups, and whether every
    provider agreed with the float64 reference ("yes", or the providers that did not)."""
    out = []
    for row in rows:
        if not row["provider"].startswith("triton"):
            continue
        same = [r for r in rows if all(r[k] == row[k] for k in ("op", "case", "dtype", "layout", "mode"))]
        failed = sorted({r["provider"] for r in same if r["agrees"] is False})
        out.append(
            {
                **row,
                "spread": f"{row['ms_p20']:.3f}-{row['ms_p80']:.3f}",
                "pct_copy": 100 * row["frac_of_copy"] if row["frac_of_copy"] else None,
                "all_agree": "yes" if not failed else "NO: " + ",".join(failed),
            }
        )
    return out
