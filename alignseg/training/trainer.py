"""The training loop: build everything from a :class:`~alignseg.config.Config`, train, evaluate, checkpoint.

One code path for a single process and for ``torchrun`` (DDP, SyncBatchNorm, one data shard per rank,
sharded evaluation without duplicates, rank 0 alone writes files). Resuming replays the exact data
order and random state, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .. import data as data_lib
from .. import distributed as dist_utils
from .. import evaluation, losses, models
from ..builders import build_datasets, build_model, dataset_root, evaluate_sharded, resolve_input_convention
from ..checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    unwrap_model,
    write_text_atomic,
)
from ..config import Config, ConfigError, apply_overrides, config_from_dict
from ..distributed import DistributedContext
from ..ops import get_backend
from .data_order import ResumableDistributedSampler, SeededSamples
from .logs import MetricsLog, add_file_log, log
from .schedule import build_optimizer, build_scheduler

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Training stopped because too many steps had a NaN or infinite loss."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Training stopped because weights or BatchNorm statistics became NaN or infinite; nothing was saved."""


class Trainer:
    """Train ``cfg`` (optionally resuming from a checkpoint). ``fit()`` runs to ``cfg.train.iterations``."""

    def __init__(self, cfg: Config, resume: str | Path | None = None, ctx: DistributedContext | None = None):
        self.ctx = ctx or dist_utils.init_distributed(cfg.train.device)
        self.device = self.ctx.device
        self.resume_state = load_checkpoint(resume) if resume is not None else None
        self.cfg = cfg
        self.run_dir = self._resolve_run_dir()
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(self.run_dir)))
        t = self.cfg.train

        if cfg.data.batch_size % self.ctx.world_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} (the total over all processes) must be divisible by the "
                f"{self.ctx.world_size} processes"
            )
        self.per_rank_batch = cfg.data.batch_size // self.ctx.world_size
        torch.manual_seed(t.seed + self.ctx.rank)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        if self.resume_state is None:
            _check_new_run_dir(self.run_dir)
        elif self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"train.run_dir {self.run_dir} is a file, not a folder")
        # Nothing is written into the run folder until every check below has passed (the datasets, the
        # model, a resumed optimiser state): a refused start leaves no folder and no changed config.yaml.

        # Weights to start from (model.init, e.g. a converted checkpoint of the authors') bring their input convention.
        init_state = load_checkpoint(cfg.model.init) if self.resume_state is None and cfg.model.init else None
        self.convention = resolve_input_convention(self.cfg, self.resume_state or init_state)
        datasets = build_datasets(self.cfg, self.ctx, convention=self.convention)
        self.train_set, self.val_set = datasets["train"], datasets["val"]
        self.sampler = ResumableDistributedSampler(self.train_set, self.ctx.world_size, self.ctx.rank, seed=t.seed)
        self.batches_per_epoch = self.sampler.num_samples // self.per_rank_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(self.train_set)} images, fewer than one batch of {self.per_rank_batch} "
                f"per process; lower data.batch_size"
            )
        samples = data_lib.SkipCorrupt(self.train_set) if cfg.data.on_corrupt == "skip" else self.train_set
        self.loader = data_lib.build_loader(
            SeededSamples(samples),
            self.per_rank_batch,
            train=True,
            workers=cfg.data.workers,
            sampler=self.sampler,
            generator=torch.Generator(),  # keeps loader start-up off the global RNG that dropout uses
            drop_last=True,
        )

        model = build_model(self.cfg, load_pretrained=self.resume_state is None and init_state is None)
        if init_state is not None:
            load_model_state(model, init_state)
        if self.ctx.is_distributed and self.device.type == "cuda":
            model = models.convert_sync_batchnorm(model)
        elif self.ctx.is_distributed:
            # PyTorch's SyncBatchNorm runs on GPUs only; on CPU each process normalises its own batch
            # and DDP broadcasts rank 0's running statistics before every forward pass.
            log.info("CPU processes: BatchNorm statistics per process (SyncBatchNorm needs CUDA)")
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.memory_format = memory_format
        self.criterion = losses.build_criterion(
            self.cfg.loss.name,
            self.cfg.data.num_classes,
            aux_weight=self.cfg.loss.aux_weight,
            ignore_index=self.cfg.loss.ignore_index,
            **self.cfg.loss.options,
        )
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, t.iterations)
        self.amp_dtype = AMP_DTYPES.get(t.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")

        self.iteration = 0
        self.best_miou = -math.inf
        self.nonfinite_steps = 0
        self.last_eval: dict[str, Any] | None = None
        # The loss sum and step count since the last metrics record; saved, so a resumed run logs the
        # same averages as an uninterrupted one.
        self.window_loss, self.window_steps = 0.0, 0
        if self.resume_state is not None:
            self._load_training_state(self.resume_state)

        # BatchNorm statistics move in the forward pass; a skipped (non-finite) step restores them
        # from this copy, so one bad batch cannot leave NaN running statistics behind.
        self._buffers = list(self.model.buffers())
        self._buffer_backup = [b.detach().clone() for b in self._buffers]

        self.train_model: nn.Module = self.model
        if self.ctx.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if t.channels_last:
                # 1x1-kernel weights have two valid stride sets in channels_last; DDP compares strides
                # exactly and warns on every step although the memory layout is the same.
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        if self._compile_enabled():
            log.info("compiling the model with torch.compile (the first steps are slow while it compiles)")
            self.train_model = torch.compile(self.train_model)
        self.checkpoints = CheckpointManager(self.run_dir, t.keep_last)
        self.metrics = None
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            add_file_log(self.run_dir)
            write_text_atomic(self.run_dir / "config.yaml", self.cfg.to_yaml())
            for partial in self.checkpoints.remove_partial_writes():
                log.info("removed %s, a checkpoint write cut short", partial.name)
            self.metrics = MetricsLog(self.run_dir, t.tensorboard, start_iteration=self.iteration)
        self._describe_setup()
        if self.resume_state is not None:  # logged here, once train.log is open
            log.info("resumed from %s at iteration %d of %d", self.resume_state["path"], self.iteration, t.iterations)

    # ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``train.iterations``; returns the final evaluation (``miou``, ``pixel_accuracy``, ...)."""
        t = self.cfg.train
        if self.iteration >= t.iterations:
            log.info("nothing to train: the checkpoint is already at iteration %d of %d", self.iteration, t.iterations)
        bar = tqdm(
            total=t.iterations,
            initial=self.iteration,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            disable=not (t.progress and self.ctx.is_main),
        )
        batches = self._batches(self.iteration)
        window_start = time.perf_counter()
        try:
            while self.iteration < t.iterations:
                images, labels = next(batches)
                loss = self._step(images, labels)
                self.iteration += 1
                bar.update(1)
                if loss is not None:
                    self.window_loss += loss
                    self.window_steps += 1
                if self.iteration % t.log_every == 0 or self.iteration == t.iterations:
                    elapsed = time.perf_counter() - window_start
                    steps = max(1, t.log_every if self.iteration % t.log_every == 0 else self.iteration % t.log_every)
                    record = {
                        "loss": self.window_loss / self.window_steps if self.window_steps else math.nan,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": steps * self.cfg.data.batch_size / max(elapsed, 1e-9),
                        "epoch": self.iteration // self.batches_per_epoch,
                        "nonfinite_steps": self.nonfinite_steps,
                    }
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}"
                    )
                    if self.metrics is not None:
                        self.metrics.write("train", self.iteration, record)
                    self.window_loss, self.window_steps, window_start = 0.0, 0, time.perf_counter()
                final = self.iteration == t.iterations
                if final or (t.eval_every and self.iteration % t.eval_every == 0):
                    self._validate()
                if final or (t.checkpoint_every and self.iteration % t.checkpoint_every == 0):
                    self._save()
        except KeyboardInterrupt:
            bar.close()
            if not self.ctx.is_distributed and self.iteration > 0:
                try:
                    path = self._save()
                except NonFiniteWeightsError as err:
                    log.error("interrupted at iteration %d; nothing saved: %s", self.iteration, err)
                else:
                    log.warning(
                        "interrupted at iteration %d; resume with: alignseg train --resume %s", self.iteration, path
                    )
            raise
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if self.last_eval is None or self.last_eval.get("iteration") != self.iteration:
            self._validate()
        log.info("finished %d iterations; run folder %s", self.iteration, self.run_dir)
        return self.last_eval

    def _batches(self, start_iteration: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from ``start_iteration`` on, exactly those an uninterrupted run would see."""
        epoch, offset = divmod(start_iteration, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(offset * self.per_rank_batch)
            yield from self.loader
            epoch, offset = epoch + 1, 0

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """One optimisation step; returns the loss, or None when it was not finite and the step skipped."""
        self.train_model.train()
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        if self._buffers:
            torch._foreach_copy_(self._buffer_backup, self._buffers)
        with autocast:
            outputs = self.train_model(images)
            loss = self.criterion(outputs, labels)
        # Every rank must take the same branch, or DDP's gradient all-reduce would wait forever.
        finite = dist_utils.all_reduce_(torch.isfinite(loss.detach()).to(torch.int32).reshape(1), op="min")
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(finite.item()):
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._buffer_backup)
            self.nonfinite_steps += 1
            self._advance_schedule()
            limit = self.cfg.train.max_nonfinite_steps
            log.warning(
                "iteration %d: the loss is %s; step skipped (%d of at most %d)",
                self.iteration + 1,
                loss.item(),
                self.nonfinite_steps,
                limit,
            )
            if self.nonfinite_steps >= limit:
                raise NonFiniteLossError(
                    f"stopping at iteration {self.iteration + 1}: the loss was not finite (NaN or inf) in "
                    f"{self.nonfinite_steps} steps, the limit train.max_nonfinite_steps={limit}. Try a lower "
                    f"optim.lr, train.amp=none, or check the data for broken images or labels."
                )
            return None
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._advance_schedule()
        return loss.item()

    def _advance_schedule(self) -> None:
        # The schedule follows the iteration whether or not the optimiser stepped (a skipped step,
        # or fp16 GradScaler skipping an overflow), so torch's "step order" warning does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()

    def _check_finite_weights(self) -> None:
        """Raise :class:`NonFiniteWeightsError` when a weight or BatchNorm statistic is NaN or infinite."""
        tensors = [t.detach() for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        if not tensors or bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
            return
        names = [
            n
            for n, t in unwrap_model(self.model).state_dict().items()
            if t.is_floating_point() and not t.isfinite().all()
        ]
        raise NonFiniteWeightsError(
            f"stopping at iteration {self.iteration}: {len(names)} weight tensors hold NaN or infinite values "
            f"(e.g. {', '.join(names[:3])}); no checkpoint of them was saved. The last checkpoints in {self.run_dir} "
            f"are from before; try a lower optim.lr or train.amp=none."
        )

    def _validate(self) -> evaluation.SegmentationMetrics:
        self._check_finite_weights()
        if self.ctx.is_distributed:
            # Without SyncBatchNorm (CPU) the ranks' running statistics drift apart between DDP's
            # broadcasts; every shard must be evaluated with the same model, rank 0's (the one saved).
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        # The eager model: eval inputs vary in size, which would make a compiled model recompile.
        results = evaluate_sharded(self.model, self.val_set, self.cfg, self.ctx, progress=self.cfg.train.progress)
        self.model.train()
        miou = float(results["miou"])
        is_best = math.isfinite(miou) and miou > self.best_miou
        self.best_miou = max(self.best_miou, miou)
        self.last_eval = {"iteration": self.iteration, **results.as_dict()}
        log.info("iteration %d: val %s%s", self.iteration, results.summary(), " - best so far" if is_best else "")
        if self.metrics is not None:
            self.metrics.write("val", self.iteration, results.as_dict())
        if is_best:
            self._save(best=True)
        return results

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _training_state(self) -> dict[str, Any]:
        rng = capture_rng_state()
        if self.ctx.is_distributed:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        return {
            "iteration": self.iteration,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "config": self.cfg.to_dict(),
            "input": self.convention.to_dict(),
            "best_miou": self.best_miou if math.isfinite(self.best_miou) else None,
            "nonfinite_steps": self.nonfinite_steps,
            "data": {
                "world_size": self.ctx.world_size,
                "per_rank_batch": self.per_rank_batch,
                "seed": self.cfg.train.seed,
            },
            "metrics": self.last_eval,
            "log_window": {"loss_sum": self.window_loss, "steps": self.window_steps},
            "torch_version": str(torch.__version__),
        }

    def _save(self, best: bool = False) -> Path | None:
        self._check_finite_weights()  # a broken model is never kept as "latest" or "best"
        state = self._training_state()  # collective under DDP: every rank takes part
        path = None
        if self.ctx.is_main:
            path = self.checkpoints.save_best(state) if best else self.checkpoints.save(state)
            log.info("saved %s", path)
        dist_utils.barrier()
        return path

    def _load_training_state(self, state: dict[str, Any]) -> None:
        path = state["path"]
        load_model_state(self.model, state)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"checkpoint {path}: the optimiser state does not fit this config "
                f"(optim.name={self.cfg.optim.name}): {err}"
            ) from err
        self.iteration = int(state["iteration"])
        self.best_miou = state.get("best_miou") if state.get("best_miou") is not None else -math.inf
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.last_eval = state.get("metrics")
        window = state.get("log_window") or {}
        self.window_loss, self.window_steps = float(window.get("loss_sum", 0.0)), int(window.get("steps", 0))
        saved = state.get("data") or {}
        if saved.get("world_size") != self.ctx.world_size or saved.get("per_rank_batch") != self.per_rank_batch:
            log.warning(
                "resuming with %d processes x batch %d, the checkpoint was made with %s x %s: the data order "
                "continues by iteration but is not the one the original run would have seen",
                self.ctx.world_size,
                self.per_rank_batch,
                saved.get("world_size"),
                saved.get("per_rank_batch"),
            )
        rng_states = state.get("rng") or []
        if rng_states:
            restore_rng_state(rng_states[self.ctx.rank] if len(rng_states) == self.ctx.world_size else rng_states[0])

    # ------------------------------------------------------------------------------------------

    def _resolve_run_dir(self) -> Path:
        if self.cfg.train.run_dir:
            return Path(self.cfg.train.run_dir).expanduser()
        if self.resume_state is not None:
            return Path(self.resume_state["path"]).parent
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        if self.ctx.is_distributed:  # every rank must agree on the name; rank 0's clock decides
            names = [stamp]
            dist.broadcast_object_list(names, src=0)
            stamp = names[0]
        return Path("runs") / f"{self.cfg.name}-{stamp}"

    def _compile_enabled(self) -> bool:
        choice = self.cfg.train.compile
        return choice == "on" or (choice == "auto" and self.device.type == "cuda")

    def _describe_setup(self) -> None:
        t, d = self.cfg.train, self.cfg.data
        log.info(
            "run %s: model %s, %s data (%s), %d iterations, batch %d (%d per process x %d), crop %dx%d",
            self.run_dir,
            self.cfg.model.name,
            d.dataset,
            dataset_root(self.cfg),
            t.iterations,
            d.batch_size,
            self.per_rank_batch,
            self.ctx.world_size,
            *d.crop_size,
        )
        origin = f" (the weights of {self.cfg.model.init})" if self.cfg.model.init else ""
        log.info("input convention: %s%s", self.convention, origin)
        log.info(
            "device %s, alignment ops backend %s, precision %s, channels_last %s, torch.compile %s",
            self.device,
            get_backend(),
            t.amp if t.amp != "none" else "fp32",
            t.channels_last,
            "on" if self._compile_enabled() else f"off ({t.compile})",
        )


def _check_new_run_dir(run_dir: Path) -> None:
    """A new run never writes into a folder that holds another run (its config, logs and checkpoints stay)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir {run_dir} is a file, not a folder")
    if run_dir.is_dir():
        taken = sorted(
            p.name
            for p in run_dir.iterdir()
            if p.name in ("config.yaml", "metrics.jsonl", "best.pt") or p.suffix == ".pt"
        )
        if taken:
            raise ConfigError(
                f"train.run_dir {run_dir} already holds a run ({', '.join(taken[:3])}); continue it with "
                f"`alignseg train --resume {run_dir}` or choose another train.run_dir"
            )


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return the final validation metrics (see :class:`Trainer`)."""
    return Trainer(cfg, resume=resume).fit()


def config_for_resume(path: str | Path, overrides: list[str]) -> Config:
    """The config stored in checkpoint ``path``, with ``overrides`` applied (e.g. more iterations).

    The run continues in the checkpoint's folder (a moved or copied run folder included) unless
    ``train.run_dir`` is overridden.
    """
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], origin=f"checkpoint {state['path']}")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(Path(state["path"]).parent)))
    return apply_overrides(cfg, overrides)
