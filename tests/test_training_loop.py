"""The training loop on a tiny synthetic set: exact resume, non-finite loss handling, logs and checkpoints."""

import math

import pytest
import torch

from alignseg.checkpoint import load_checkpoint
from alignseg.config import load_config
from alignseg.training import trainer as trainer_module
from alignseg.training.logs import read_metrics
from alignseg.training.schedule import poly_lr
from alignseg.training.trainer import NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("reference_ops")


def tiny_config(tmp_path, run, *extra):
    """The synthetic demo shrunk to seconds: 4 training images of 64x96, 64x64 crops, batch 2."""
    return load_config(
        "synthetic",
        [
            f"data.root={tmp_path / 'data'}",
            "data.synthetic_train=4",
            "data.synthetic_val=2",
            "data.synthetic_size=[64,96]",
            "data.crop_size=[64,64]",
            "data.batch_size=2",
            "data.workers=0",
            "optim.warmup_iters=2",
            "train.log_every=2",
            "train.eval_every=0",
            "train.progress=false",
            f"train.run_dir={tmp_path / run}",
            *extra,
        ],
    )


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_resume_gives_bit_identical_weights(tmp_path):
    # 3 iterations over 2 batches per epoch: the resume point (1) is mid-epoch, and the run crosses
    # into the next epoch, so the data order and augmentation seeds must be restored too.
    cfg = tiny_config(
        tmp_path, "full", "train.iterations=3", "train.checkpoint_every=1", "train.log_every=1", "train.keep_last=3"
    )
    Trainer(cfg).fit()
    resumed_cfg = tiny_config(tmp_path, "resumed", "train.iterations=3", "train.checkpoint_every=1")
    Trainer(resumed_cfg, resume=tmp_path / "full" / "checkpoint_0000001.pt").fit()

    middle = load_checkpoint(tmp_path / "full" / "checkpoint_0000001.pt")
    full = load_checkpoint(tmp_path / "full" / "checkpoint_0000003.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint_0000003.pt")
    assert resumed["iteration"] == full["iteration"] == 3
    assert any(not torch.equal(middle["model"][k], full["model"][k]) for k in full["model"])  # it trained
    _assert_same_tensors(full["model"], resumed["model"], "model weights")
    for key, state in full["optimizer"]["state"].items():
        _assert_same_tensors(state, resumed["optimizer"]["state"][key], "optimizer state")
    assert full["scheduler"] == resumed["scheduler"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in full["model"])
    # The run folder holds what a user looks at.
    assert {"config.yaml", "metrics.jsonl", "train.log", "best.pt"} <= {p.name for p in (tmp_path / "full").iterdir()}
    records = read_metrics(tmp_path / "full")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train_records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train_records)
    # the logged lr is the one the next step uses: poly decay after a 2-iteration warmup
    expected = [cfg.optim.lr * poly_lr(r["iteration"], 3, 0.9, 2, cfg.optim.warmup_start_factor) for r in train_records]
    assert [r["lr"] for r in train_records] == pytest.approx(expected)
    assert [r["kind"] for r in records].count("val") == 1 and 0 <= records[-1]["miou"] <= 1


class _PoisonedCriterion(torch.nn.Module):
    """The real criterion, returning NaN at the calls listed."""

    def __init__(self, inner, poisoned_calls):
        super().__init__()
        self.inner, self.poisoned_calls, self.calls = inner, set(poisoned_calls), 0

    def forward(self, outputs, target):
        self.calls += 1
        loss = self.inner(outputs, target)
        return loss * float("nan") if self.calls in self.poisoned_calls else loss


def _poison(trainer, calls):
    """Poison the loss at ``calls``; returns the list of model states (weights and BatchNorm
    statistics) seen at the start of every forward pass."""
    trainer.criterion = _PoisonedCriterion(trainer.criterion, calls)
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda module, args: seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        if module.training
        else None
    )
    return seen


def test_non_finite_loss_skips_the_step_and_counts_it(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "nan", "train.iterations=3", "train.max_nonfinite_steps=3"))
    seen = _poison(trainer, calls={2})
    trainer.fit()
    # The third step starts from the state the second (skipped) step started from: no weight update,
    # and the BatchNorm statistics its forward pass moved were put back.
    assert len(seen) == 3
    _assert_same_tensors(seen[1], seen[2], "state across the skipped step")
    assert any(not torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # the first step did update
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert trainer.nonfinite_steps == 1
    assert read_metrics(tmp_path / "nan")[0]["nonfinite_steps"] == 1
    assert load_checkpoint(tmp_path / "nan" / "checkpoint_0000003.pt")["nonfinite_steps"] == 1


def test_training_stops_after_too_many_non_finite_losses(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "diverged", "train.iterations=5", "train.max_nonfinite_steps=2"))
    _poison(trainer, calls={1, 2, 3, 4, 5})
    with pytest.raises(
        NonFiniteLossError, match=r"iteration 2: the loss was not finite .* train.max_nonfinite_steps=2"
    ):
        trainer.fit()


def test_dataset_and_config_errors_are_clear(tmp_path):
    cfg = tiny_config(tmp_path, "x", "data.dataset=cityscapes", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Trainer(cfg)
    with pytest.raises(Exception, match="data.batch_size=2 .* must be divisible"):
        trainer_module.Trainer(
            cfg, ctx=trainer_module.DistributedContext(rank=0, world_size=4)
        )


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step_and_scaler_state(tmp_path, amp):
    trainer = Trainer(tiny_config(tmp_path, amp, "train.iterations=2", f"train.amp={amp}", "data.synthetic_val=1"))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())  # weights stay fp32 under autocast
    updated = any(not torch.equal(before[name], p) for name, p in after.items())
    assert trainer.nonfinite_steps == 0
    scaler = load_checkpoint(tmp_path / amp / "checkpoint_0000002.pt")["scaler"]
    if amp == "fp16":
        # The GradScaler's state is saved for resuming. Its first steps may overflow at the initial
        # scale 2**16 and be skipped while it backs off: then the scale must have come down.
        assert updated or scaler["scale"] < 2.0**16
    else:
        assert updated and not scaler  # bf16 needs no scaler


def test_interrupt_saves_a_checkpoint_to_resume_from(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "stopped", "train.iterations=4", "train.checkpoint_every=0"))

    class _CtrlC(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, outputs, target):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.inner(outputs, target)

    trainer.criterion = _CtrlC(trainer.criterion)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "stopped")  # the folder's latest checkpoint
    assert saved["iteration"] == 2
    _assert_same_tensors(saved["model"], trainer.model.state_dict(), "saved weights")
