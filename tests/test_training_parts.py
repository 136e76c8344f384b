"""Training building blocks: poly LR, checkpoints (atomic, keep-last-k, errors), RNG capture, data order."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from alignseg.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from alignseg.config import OptimConfig
from alignseg.distributed import shard_indices
from alignseg.training.data_order import ResumableDistributedSampler, SeededSamples
from alignseg.training.schedule import build_optimizer, build_scheduler, poly_lr


def test_poly_lr_matches_the_formula_with_and_without_warmup():
    total, power = 37, 0.9
    for it in range(total + 1):
        assert poly_lr(it, total, power) == pytest.approx((1 - it / total) ** power)
    # warmup: linear ramp from the start factor, multiplied into the decay
    assert poly_lr(0, 100, 0.9, warmup_iters=10, warmup_start_factor=0.1) == pytest.approx(0.1)
    assert poly_lr(5, 100, 0.9, 10, 0.1) == pytest.approx((0.1 + 0.9 * 0.5) * 0.95**0.9)
    assert poly_lr(10, 100, 0.9, 10, 0.1) == pytest.approx(0.9**0.9)


def test_scheduler_steps_the_optimiser_lr_per_iteration():
    model = nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.02, poly_power=0.9, warmup_iters=0)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_iters=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.02 * (1 - i / 10) ** 0.9 for i in range(10)])
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)


def _state(model, iteration=3):
    return {
        "iteration": iteration,
        "model": model.state_dict(),
        "config": {"model": {"name": "net"}, "data": {"num_classes": 2}},
    }


def test_checkpoint_round_trip_and_unwrapped_keys(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    compiled_like = nn.Module()
    compiled_like._orig_mod = model  # what torch.compile wraps the model in
    path = save_checkpoint(tmp_path / "a.pt", _state(unwrap_model(compiled_like)))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind
    state = load_checkpoint(path)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    fresh = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    load_model_state(fresh, state)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "c.pt", _state(model, 1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(model, 2))
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # and no temporary file remains


def test_bad_checkpoints_fail_with_the_file_named(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _state(nn.Linear(2, 2)))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, message in [
        (truncated, "cannot read checkpoint .*truncated.pt"),
        (garbage, "cannot read checkpoint .*garbage.pt"),
        (foreign, "foreign.pt is not an alignseg checkpoint"),
        (tmp_path / "absent.pt", "absent.pt does not exist"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    with pytest.raises(
        CheckpointError, match=r"good.pt does not match the model .*net with 2 classes.*wrong shape: weight"
    ):
        load_model_state(nn.Linear(2, 3), load_checkpoint(good))


def test_checkpoint_refuses_arbitrary_python_objects(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": "alignseg-checkpoint", "payload": OptimConfig()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def test_keep_last_k_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = nn.Linear(2, 2)
    for it in (10, 20, 30):
        manager.save(_state(model, it))
    manager.save_best(_state(model, 20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint_0000020.pt", "checkpoint_0000030.pt"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_0000030.pt"
    assert load_checkpoint(tmp_path)["iteration"] == 30  # a folder means its latest checkpoint


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "r.pt", {"iteration": 0, "model": {}, "config": {}, "rng": capture_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


class _Draws(torch.utils.data.Dataset):
    """Item i = (i, a draw from the torch RNG): shows which seed made each sample."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index, torch.rand(()).item()


def test_sampler_resumes_mid_epoch_and_shards_without_overlap():
    dataset = _Draws()
    full = list(ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=5))
    assert sorted(i for i, _ in full) == list(range(10))
    resumed = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=5)
    resumed.set_start(4)
    assert list(resumed) == full[4:]
    # two ranks: disjoint shares of the same permutation, and the same per-sample seeds
    shards = [list(ResumableDistributedSampler(dataset, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(full)
    later = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=5)
    later.set_epoch(1)
    assert [i for i, _ in later] != [i for i, _ in full]  # reshuffled each epoch


def test_seeded_samples_are_reproducible_and_leave_the_global_rng_alone():
    samples = SeededSamples(_Draws())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = samples[(3, 1234)]
    assert torch.equal(torch.get_rng_state(), before)
    assert samples[(3, 1234)] == first and samples[(3, 999)] != first


def test_shard_indices_cover_every_item_once():
    shards = [list(shard_indices(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
