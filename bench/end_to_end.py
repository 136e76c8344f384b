"""End-to-end throughput: AlignSeg training steps and inference, eager vs. torch.compile, reference vs. Triton ops.

Variants (the same initial weights in each): eager model with the reference ops and with the Triton
ops, compiled model with the reference ops and with the Triton ops. Everything runs under bf16 autocast with
channels_last images and weights (fp32 in the CPU smoke mode). A training step is forward, the loss
(cross-entropy on the main
and auxiliary logits), backward and an SGD step; inference is the eval-mode forward, logits upsampled
to the image size. Reported: images/s over the timed steps, the time the warm-up (compilation
included) took, and the peak memory allocated during the timed steps.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence

import torch

from alignseg.losses import build_criterion
from alignseg.models import build
from alignseg.ops import use_backend
from bench import common  # noqa: F401  (first: sets TRITON_INTERPRET=1 without a GPU)
from bench.common import HAS_GPU, log

# The issue's three variants first; eager + Triton (the kernels' gain without compile) runs last,
# so it is the one a spent time budget drops.
VARIANTS = (("eager", "reference"), ("compiled", "reference"), ("compiled", "triton"), ("eager", "triton"))
EXTRA_VARIANTS = (("eager", "triton"),)
# Compiling the network on a 2-core CPU takes minutes per variant, so smoke mode runs the eager
# variants unless asked (``python -m bench --e2e-compile``).
SMOKE_VARIANTS = (("eager", "reference"), ("eager", "triton"))


@dataclasses.dataclass(frozen=True)
class EndToEndConfig:
    preset: str
    num_classes: int
    train_size: tuple[int, int]
    train_batch: int
    infer_size: tuple[int, int]
    infer_batch: int
    warmup_steps: int  # untimed; the first one compiles (compiled variants get at least one)
    steps: int
    bf16_autocast: bool


# The paper's setting: Cityscapes 872x872 crops, 4 images per GPU; full 1024x2048 images at test time.
GPU_CONFIG = EndToEndConfig(
    "alignseg_r101", 19, (872, 872), 4, (1024, 2048), 1, warmup_steps=3, steps=10, bf16_autocast=True
)
# fp32 on the CPU: bf16 convolutions there are emulated, many times slower, and would show nothing.
SMOKE_CONFIG = EndToEndConfig(
    "alignseg_tiny", 19, (64, 64), 1, (64, 64), 1, warmup_steps=0, steps=1, bf16_autocast=False
)


def _sync() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


def _autocast(enabled: bool):
    return torch.autocast(device_type=common.device().type, dtype=torch.bfloat16, enabled=enabled)


def _timed_loop(step, warmup_steps: int, steps: int) -> dict:
    """Warm-up steps, then timed steps; the seconds of each part, peak MiB of the timed part, and the
    value (loss, or mean logit) the first and the last step returned."""
    values = []
    start = time.perf_counter()
    for _ in range(warmup_steps):
        values.append(step())
    _sync()
    warmup_s = time.perf_counter() - start
    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        values.append(step())
    _sync()
    timed_s = time.perf_counter() - start
    return {
        "warmup_s": warmup_s,
        "timed_s": timed_s,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if HAS_GPU else None,
        "first_value": float(values[0]),
        "last_value": float(values[-1]),
    }


def _photos(model: torch.nn.Module, batch: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Random 8-bit photos, normalised by the model's input convention (alignseg.api.model_info) as real ones are."""
    from alignseg.api import model_info

    pixels = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
    return model_info(model).input.normalize(pixels)


def run_variant(model: torch.nn.Module, config: EndToEndConfig, task: str, execution: str, ops_backend: str,
                compile_backend: str = "inductor") -> dict:
    """Time ``task`` ("train" or "infer") of a fresh copy of ``model`` in one variant; one result row."""
    dev = common.device()
    model = copy.deepcopy(model).to(dev, memory_format=torch.channels_last)
    torch._dynamo.reset()  # each variant compiles from scratch with its own ops backend
    runner = torch.compile(model, backend=compile_backend) if execution == "compiled" else model
    g = torch.Generator(device="cpu").manual_seed(0)
    if task == "train":
        (h, w), batch = config.train_size, config.train_batch
        images = _photos(model, batch, h, w, g).to(dev).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, config.num_classes, (batch, h, w), generator=g).to(dev)
        criterion = build_criterion("ce", config.num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        model.train()

        def step():
            with _autocast(config.bf16_autocast):
                loss = criterion(runner(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
    else:
        (h, w), batch = config.infer_size, config.infer_batch
        images = _photos(model, batch, h, w, g).to(dev).contiguous(memory_format=torch.channels_last)
        model.eval()

        def step():
            with torch.no_grad(), _autocast(config.bf16_autocast):
                return runner(images).float().mean()

    torch.manual_seed(0)  # the same dropout masks in every eager variant, so first losses compare
    with use_backend(ops_backend):
        # A compiled model compiles on its first step, which must never be timed.
        warmup_steps = config.warmup_steps if execution == "eager" else max(1, config.warmup_steps)
        timing = _timed_loop(step, warmup_steps, config.steps)
    execution_name = execution + (
        f"({compile_backend})" if execution == "compiled" and compile_backend != "inductor" else ""
    )
    return {
        "task": task,
        "preset": config.preset,
        "size": f"{h}x{w}",
        "batch": batch,
        "execution": execution_name,
        "ops": ops_backend,
        "precision": "bf16 autocast" if config.bf16_autocast else "fp32",
        "images_per_s": batch * config.steps / timing["timed_s"],
        "ms_per_step": 1000 * timing["timed_s"] / config.steps,
        "warmup_s": timing["warmup_s"],
        "peak_mib": timing["peak_mib"],
        "first_value": timing["first_value"],
        "last_value": timing["last_value"],
    }


def run_suite(config: EndToEndConfig, *, tasks: Sequence[str] = ("train", "infer"),
              variants: Sequence[tuple[str, str]] = VARIANTS, compile_backend: str = "inductor",
              budget_s: float | None = None) -> tuple[list[dict], list[str]]:
    """Every (task, variant); stops starting new ones after ``budget_s``. Returns rows and what was skipped."""
    torch.manual_seed(0)
    model = build(config.preset, config.num_classes)
    start = time.perf_counter()
    rows, skipped = [], []
    plan = [(t, v) for t in tasks for v in variants if v not in EXTRA_VARIANTS]
    plan += [(t, v) for t in tasks for v in variants if v in EXTRA_VARIANTS]
    for task, (execution, ops_backend) in plan:
        title = f"{task} {config.preset} {execution} + {ops_backend} ops"
        if budget_s is not None and time.perf_counter() - start > budget_s:
            skipped.append(title)
            continue
        log(f"end-to-end: {title} (warm-up{' and compile' if execution == 'compiled' else ''} first)")
        row = run_variant(model, config, task, execution, ops_backend, compile_backend)
        log(f"  {row['images_per_s']:.2f} images/s, warm-up {row['warmup_s']:.1f} s")
        rows.append(row)
    baseline = {r["task"]: r for r in rows if r["execution"] == "eager" and r["ops"] == "reference"}
    for row in rows:
        base = baseline.get(row["task"])
        row["x_vs_eager_reference"] = row["images_per_s"] / base["images_per_s"] if base else None
    if skipped:
        log(f"end-to-end: time budget of {budget_s:.0f} s spent; {len(skipped)} variants not run")
    return rows, skipped


TABLE_COLUMNS = (
    ("task", "task", ""),
    ("model", "preset", ""),
    ("size", "size", ""),
    ("batch", "batch", ""),
    ("execution", "execution", ""),
    ("ops", "ops", ""),
    ("images/s", "images_per_s", ".2f"),
    ("ms/step", "ms_per_step", ".1f"),
    ("x eager+ref", "x_vs_eager_reference", ".2f"),
    ("warm-up s", "warmup_s", ".1f"),
    ("peak MiB", "peak_mib", ".0f"),
)
