"""Two-process DDP training and sharded evaluation on CPU (gloo), through the same env:// set-up torchrun uses."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alignseg.builders import build_datasets, build_model, evaluate_sharded
from alignseg.checkpoint import load_checkpoint, load_model_state
from alignseg.config import load_config
from alignseg.distributed import DistributedContext
from alignseg.training.logs import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reference_ops")]


def _config(tmp_path):
    return load_config(
        "synthetic",
        [
            f"data.root={tmp_path / 'data'}",
            "data.synthetic_train=8",
            "data.synthetic_val=3",  # odd: a padded sampler would count one image twice
            "data.synthetic_size=[64,96]",
            "data.crop_size=[64,64]",
            "data.batch_size=4",  # 2 per process
            "data.workers=0",
            "optim.warmup_iters=0",
            "train.iterations=2",
            "train.log_every=1",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.progress=false",
            f"train.run_dir={tmp_path / 'run'}",
        ],
    )


def _worker(rank, world_size, port, tmp_path):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from alignseg import distributed
    from alignseg.ops import set_backend
    from alignseg.training.trainer import Trainer

    set_backend("reference")
    ctx = distributed.init_distributed("cpu")
    try:
        trainer = Trainer(_config(tmp_path), ctx=ctx)
        trainer.sampler.set_epoch(0)
        trainer.sampler.set_start(0)
        first_epoch = [index for index, _ in trainer.sampler]
        results = trainer.fit()
        torch.save(trainer.model.state_dict(), tmp_path / f"rank{rank}.pt")
        report = {
            "results": dict(results),
            "first_epoch": first_epoch,
            "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules()),
            "ddp": isinstance(trainer.train_model, torch.nn.parallel.DistributedDataParallel),
            "world_size": ctx.world_size,
        }
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        distributed.cleanup_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_and_sharded_evaluation(tmp_path):
    cfg = _config(tmp_path)
    build_datasets(cfg, DistributedContext())  # generate the data once, before the ranks start
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["ddp"] for r in reports)
    # PyTorch's SyncBatchNorm has no CPU kernel: it is used on CUDA only
    assert not any(r["sync_bn"] for r in reports)
    # each rank trains on its own half of the shuffled training set
    shards = [set(r["first_epoch"]) for r in reports]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 8

    # gradients were averaged over the ranks: both hold the same weights (the BatchNorm running
    # statistics are per process on CPU; DDP broadcasts rank 0's before each step)
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    parameters = [name for name, _ in build_model(cfg).named_parameters()]
    for key in parameters:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert any(not torch.equal(weights[0][k], build_model(cfg).state_dict()[k]) for k in parameters)  # it trained

    # rank 0 alone wrote the run files: one record per logged iteration, one final checkpoint
    records = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint_0000002.pt")
    assert len(checkpoint["rng"]) == 2  # every rank's random state, for an exact resume
    assert not any(k.startswith("module.") for k in checkpoint["model"])

    # the sharded evaluation (rank::world, matrices summed) equals a single-process one
    model = build_model(cfg)
    load_model_state(model, checkpoint)
    val = build_datasets(cfg, DistributedContext(), splits=("val",))["val"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_sharded(model, val, cfg, DistributedContext(), progress=False)
    finally:
        torch.set_num_threads(threads)
    sharded = reports[0]["results"]
    assert sharded["num_pixels"] == single["num_pixels"]  # every image counted exactly once
    assert sharded["miou"] == pytest.approx(single["miou"], abs=1e-6)
    assert sharded["iou"].keys() == single["iou"].keys()
    for name, iou in single["iou"].items():
        assert (sharded["iou"][name] is None) == (iou is None), name
        assert iou is None or sharded["iou"][name] == pytest.approx(iou, abs=1e-6), name
