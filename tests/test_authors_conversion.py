"""Converting the authors' checkpoints: a converted model computes what their network computes.

The oracle is tests/authors_reference.py, a port of their networks/alignseg.py (their key names, InPlaceABN's
``|weight| + eps`` scale, their pre-issue-#7 warp with ``align_corners=True``), with random weights: about half
of the norm weights negative, head biases, running statistics, and offset heads moving 1-3 pixels. A tiny
ResNet-50 layout (width 4, decoder 8) keeps it fast; float64 throughout.
"""

import pytest
import torch
import torch.nn.functional as F
from authors_reference import (
    CAB,
    CAM,
    AuthorsAlignSeg,
    authors_evaluate_whole,
    authors_warp,
    calibrate_offsets_,
    randomize_,
)
from torch import nn

from alignseg.cli import main
from alignseg.models import (
    AlignCM,
    AlignFA,
    AuthorsCheckpointError,
    from_authors_checkpoint,
)
from alignseg.models.modules import upsample
from alignseg.ops import use_backend

TOLERANCE = 1e-6  # max |ours - theirs| / max |theirs|, float64
# The kernels run on CUDA when there is a GPU, else in Triton's interpreter on the CPU (conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def leaky_relu() -> nn.Module:
    return nn.LeakyReLU(0.01)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def tiny_authors_net(num_classes: int = 5, seed: int = 0) -> AuthorsAlignSeg:
    generator = torch.Generator().manual_seed(seed)
    net = randomize_(AuthorsAlignSeg(num_classes, layers=(3, 4, 6, 3), width=4, decoder=8), generator).double().eval()
    calibrate_offsets_(net, torch.randn(2, 3, 65, 97, generator=generator, dtype=torch.float64))
    return net


@pytest.fixture(scope="module")
def authors_net() -> AuthorsAlignSeg:
    return tiny_authors_net().to(DEVICE)


def stride4_outputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main, aux) at stride 4: train-mode outputs with every norm and dropout in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.Dropout2d)):
            module.eval()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.eval()


def count_kernel_launches(monkeypatch) -> dict[str, int]:
    """Count calls of the Triton launchers (so a 'triton' test proves the kernels ran)."""
    import alignseg.kernels.align_cm as cm_kernels
    import alignseg.kernels.align_fa as fa_kernels

    counts: dict[str, int] = {}
    def counting(launch, name):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return launch(*args, **kwargs)

        return counted

    for module, name in ((fa_kernels, "align_fa_forward"), (cm_kernels, "align_cm_forward")):
        monkeypatch.setattr(module, name, counting(getattr(module, name), name))
    return counts


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(1, 3, 65, 65), (2, 3, 65, 97), (1, 3, 90, 70)])
def test_converted_model_equals_the_authors_network(authors_net, backend, shape, monkeypatch):
    launches = count_kernel_launches(monkeypatch)
    model = from_authors_checkpoint(authors_net.state_dict()).to(DEVICE)
    assert next(model.parameters()).dtype == torch.float64 and not model.training
    images = torch.randn(*shape, dtype=torch.float64).to(DEVICE)
    with torch.no_grad():
        their_main, their_dsn = authors_net(images)
        their_full = authors_evaluate_whole(authors_net, images)
    with use_backend(backend):
        with torch.no_grad():
            full = model(images)
        main_logits, aux_logits = stride4_outputs(model, images)
        offsets = model.forward_offsets(images)
    assert full.shape == their_full.shape == (shape[0], 5, *shape[2:])
    # 4 AlignFA + 1 AlignCM per forward; full, stride-4 and offsets: three forwards
    assert launches == ({"align_fa_forward": 12, "align_cm_forward": 3} if backend == "triton" else {})
    assert relative_error(full, their_full) < TOLERANCE
    assert relative_error(main_logits, their_main) < TOLERANCE
    assert relative_error(aux_logits, their_dsn) < TOLERANCE
    # the offsets really move things (in pixels: 0.5-5 RMS), so the warp convention is exercised
    for name, field in offsets.items():
        assert 0.3 < field.pow(2).mean().sqrt().item() < 6, name


def test_the_comparison_is_sensitive(authors_net):
    """Controls: read as pixels, or with the raw norm weight, the same weights give clearly different logits."""
    images = torch.randn(1, 3, 65, 97, dtype=torch.float64).to(DEVICE)
    with torch.no_grad():
        theirs = authors_evaluate_whole(authors_net, images)
        model = from_authors_checkpoint(authors_net.state_dict()).to(DEVICE)
        for module in model.modules():
            if isinstance(module, (AlignFA, AlignCM)):
                module.offset_convention = "pixels"
        assert relative_error(model(images), theirs) > 1e-3
        raw = {k: v for k, v in authors_net.state_dict().items()}
        model = from_authors_checkpoint(raw).to(DEVICE)
        model.backbone.bn1.weight.copy_(authors_net.bn1.weight)  # gamma instead of |gamma| + eps, one layer
        assert relative_error(model(images), theirs) > 1e-3


def test_num_classes_is_read_from_the_head_or_checked(authors_net):
    state = authors_net.state_dict()
    assert from_authors_checkpoint(state).num_classes == 5
    assert from_authors_checkpoint(state, num_classes=5).num_classes == 5
    with pytest.raises(AuthorsCheckpointError, match=r"num_classes=19 does not match .*head\.3\.weight"):
        from_authors_checkpoint(state, num_classes=19)


def test_prefix_wrappers_and_num_batches_tracked_are_accepted(authors_net, tmp_path):
    state = authors_net.state_dict()
    expected = from_authors_checkpoint(state).state_dict()
    assert all(not v.any() for k, v in expected.items() if k.endswith("num_batches_tracked"))
    with_counts = dict(state)
    for key in state:
        if key.endswith("running_var"):
            with_counts[key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    prefixed = {f"module.{k}": v for k, v in with_counts.items()}
    path = tmp_path / "CS_scenes_120000.pth"
    torch.save({"state_dict": prefixed}, path)
    for source, count in ((with_counts, 7), ({"model": state}, 0), (prefixed, 7), (path, 7)):
        converted = from_authors_checkpoint(source).state_dict()
        assert converted.keys() == expected.keys()
        for key, value in converted.items():
            want = torch.tensor(count) if key.endswith("num_batches_tracked") else expected[key]
            assert torch.equal(value, want), key


def test_unknown_missing_and_misshaped_keys_are_named(authors_net, tmp_path):
    state = authors_net.state_dict()
    with pytest.raises(AuthorsCheckpointError, match=r"unknown key 'CAB6\.delta_gen1\.0\.weight'"):
        from_authors_checkpoint({**state, "CAB6.delta_gen1.0.weight": torch.zeros(1)})
    with pytest.raises(AuthorsCheckpointError, match=r"unknown key 'criterion\.weight'"):
        from_authors_checkpoint({**state, "criterion.weight": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "CAB3.delta_gen2.1.running_var"}
    with pytest.raises(
        AuthorsCheckpointError, match=r"'CAB3\.delta_gen2\.1\.running_var' \(our 'align_fa2\.offset_low"
    ):
        from_authors_checkpoint(missing)
    no_bias = {k: v for k, v in state.items() if k != "head.0.bias"}
    with pytest.raises(AuthorsCheckpointError, match=r"missing key 'head\.0\.bias'"):
        from_authors_checkpoint(no_bias)
    wrong = {**state, "RRB4b.norm.weight": torch.ones(7, dtype=torch.float64)}
    with pytest.raises(AuthorsCheckpointError, match=r"key 'RRB4b\.norm\.weight' has shape \[7\].*\[8\]"):
        from_authors_checkpoint(wrong)
    with pytest.raises(AuthorsCheckpointError, match=r"missing key 'head\.3\.weight'"):
        from_authors_checkpoint({k: v for k, v in state.items() if not k.startswith("head.3")})
    with pytest.raises(AuthorsCheckpointError, match="an alignseg checkpoint, which needs no conversion"):
        from_authors_checkpoint({f"backbone.{k}": v for k, v in state.items()})
    pickled = tmp_path / "objects.pth"
    torch.save({"state_dict": state, "args": object()}, pickled)
    with pytest.raises(AuthorsCheckpointError, match="weights_only=True"):
        from_authors_checkpoint(pickled)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        from_authors_checkpoint(tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------------------
# the offset convention, module by module, against F.grid_sample written the authors' way


def _abn_to_bn(abn: nn.Module, bn: nn.BatchNorm2d) -> None:
    bn.weight.copy_(abn.weight.abs() + abn.eps)
    bn.bias.copy_(abn.bias)
    bn.running_mean.copy_(abn.running_mean)
    bn.running_var.copy_(abn.running_var)


def _load_offset_head(delta_gen: nn.Sequential, head: nn.Module) -> None:
    head.reduce.weight.copy_(delta_gen[0].weight)
    _abn_to_bn(delta_gen[1], head.norm)
    head.predict.weight.copy_(delta_gen[2].weight)


def _random_(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("low_size", "high_size"), [((13, 21), (7, 11)), ((16, 16), (8, 8)), ((9, 14), (9, 14))])
def test_align_fa_authors_convention(backend, low_size, high_size, monkeypatch):
    """Every AlignFA form with offset_convention='authors' against their CAB: the default (fused exact) form and
    the literal upsample-first code equal it; the one-step form equals grid_sample of the coarse map on their
    grid (same normalised coordinates)."""
    launches = count_kernel_launches(monkeypatch)
    generator = torch.Generator().manual_seed(1)
    channels = 6
    cab = CAB(channels).double().eval()
    _random_(cab, generator)
    cab.to(DEVICE)
    low = torch.randn(2, channels, *low_size, generator=generator, dtype=torch.float64).to(DEVICE)
    high = torch.randn(2, channels, *high_size, generator=generator, dtype=torch.float64).to(DEVICE)
    forms = {}
    for name, options in {
        "exact": {}, "literal": {"upsample_high_first": True}, "one_step": {"form": "one_step"}
    }.items():
        module = AlignFA(channels, nn.BatchNorm2d, leaky_relu, offset_convention="authors", **options)
        module = module.double().eval().to(DEVICE)
        with torch.no_grad():
            _load_offset_head(cab.delta_gen1, module.offset_high)
            _load_offset_head(cab.delta_gen2, module.offset_low)
        with use_backend(backend), torch.no_grad():
            forms[name] = module(low, high, return_offsets=True)
    with torch.no_grad():
        theirs = cab(low, high)
        high_up = upsample(high, low_size)
        concat = torch.cat([low, high_up], 1)
        delta1, delta2 = cab.delta_gen1(concat), cab.delta_gen2(concat)
        # their grid with norm from the upsampled H x W map, sampling the coarse map directly
        n, _, h, w = low.shape
        norm = torch.tensor([h, w], dtype=torch.float64, device=DEVICE).view(1, 1, 1, 2)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64, device=DEVICE),
                                torch.linspace(-1, 1, w, dtype=torch.float64, device=DEVICE), indexing="ij")
        grid = torch.stack([xs, ys], -1).expand(n, h, w, 2)
        one_step = (F.grid_sample(high, grid + delta1.permute(0, 2, 3, 1) / norm, align_corners=True)
                    + F.grid_sample(low, grid + delta2.permute(0, 2, 3, 1) / norm, align_corners=True))
    assert torch.abs(delta1).mean() > 0.5  # offsets of several pixels
    assert launches == ({"align_fa_forward": 3} if backend == "triton" else {})
    assert relative_error(forms["exact"][0], theirs) < 1e-12
    assert relative_error(forms["literal"][0], theirs) < 1e-12
    assert relative_error(forms["one_step"][0], one_step) < 1e-12
    scale = torch.tensor([(w - 1) / (2 * h), (h - 1) / (2 * w)], dtype=torch.float64, device=DEVICE).view(1, 2, 1, 1)
    for out, offsets in forms.values():
        assert relative_error(offsets, torch.cat([delta1 * scale, delta2 * scale], 1)) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("size", [(5, 7), (2, 9), (6, 6)])
def test_align_cm_authors_convention(backend, size, monkeypatch):
    """AlignCM with offset_convention='authors' against their CAM (3x3 context, offsets / [3, 3])."""
    launches = count_kernel_launches(monkeypatch)
    generator = torch.Generator().manual_seed(2)
    cam = CAM(10, 6).double().eval()
    _random_(cam, generator)
    module = AlignCM(
        10, 6, nn.BatchNorm2d, leaky_relu, pool_size=3, concat=True, offset_convention="authors"
    ).double().eval()
    with torch.no_grad():
        for ours, theirs in ((module.context, cam.pool[1:]), (module.local, cam.adapt)):
            for block, (conv, abn) in zip(ours, ((theirs[0], theirs[1]), (theirs[2], theirs[3]))):
                block[0].weight.copy_(conv.weight)
                _abn_to_bn(abn, block[1])
        _load_offset_head(cam.delta_gen, module.offset)
    cam.to(DEVICE), module.to(DEVICE)
    x = torch.randn(2, 10, *size, generator=generator, dtype=torch.float64).to(DEVICE)
    with use_backend(backend), torch.no_grad():
        out, offsets = module(x, return_offsets=True)
        theirs = cam(x)
    assert offsets.abs().mean() > 0.3
    assert launches == ({"align_cm_forward": 1} if backend == "triton" else {})
    assert relative_error(out, theirs) < 1e-12


def test_authors_convention_needs_two_pixels_in_align_cm():
    module = AlignCM(4, 4, nn.BatchNorm2d, leaky_relu, offset_convention="authors").eval()
    with pytest.raises(ValueError, match="at least 2 x 2"):
        module(torch.randn(1, 4, 1, 5))
    with pytest.raises(ValueError, match="offset_convention must be one of"):
        AlignFA(4, nn.BatchNorm2d, leaky_relu, offset_convention="normalised")


def test_authors_warp_is_their_pre_fix_normaliser():
    """The oracle's warp: on an H x W map, a unit offset in channel 0 moves x by (W - 1) / (2 H) pixels."""
    source = torch.arange(4 * 6, dtype=torch.float64).view(1, 1, 4, 6)  # value = 6 y + x: linear in both
    delta = torch.zeros(1, 2, 4, 6, dtype=torch.float64)
    delta[:, 0] = 0.4
    delta[:, 1] = -0.3
    moved = authors_warp(source, (4, 6), delta)
    dx, dy = 0.4 * 5 / (2 * 4), -0.3 * 3 / (2 * 6)
    inside = moved[0, 0, 1:, :-1]
    assert torch.allclose(inside - source[0, 0, 1:, :-1], torch.full_like(inside, 6 * dy + dx))


# ---------------------------------------------------------------------------------------------
# the command line: convert, then evaluate the converted file


@pytest.mark.usefixtures("reference_ops")
def test_convert_command_writes_a_checkpoint_that_eval_loads(tmp_path, capsys, caplog):
    from alignseg.builders import build_model
    from alignseg.checkpoint import load_checkpoint, load_model_state
    from alignseg.config import config_from_dict

    net = tiny_authors_net(num_classes=19, seed=3).float()
    src, dst = tmp_path / "CS_scenes_120000.pth", tmp_path / "converted.pt"
    torch.save(net.state_dict(), src)
    assert main(["convert", str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    state = load_checkpoint(dst)
    assert state["input"]["channel_order"] == "BGR" and state["input"]["mean"][0] == pytest.approx(104.00698793)
    cfg = config_from_dict(state["config"])
    assert cfg.model.options["offset_convention"] == "authors"
    assert cfg.model.options.get("align_fa_form", "exact") == "exact"  # the default AlignFA form is the authors'

    model = build_model(cfg, load_pretrained=False)
    load_model_state(model, state)
    images = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        assert relative_error(
            model.eval().double()(images.double()), authors_evaluate_whole(net.double(), images.double())
        ) < 1e-5

    capsys.readouterr()
    assert main(["convert", str(src), str(dst)]) == 2  # never overwrites
    assert "exists; choose another destination" in capsys.readouterr().out + caplog.text
    assert main(["eval", "--checkpoint", str(dst), "data.dataset=synthetic", f"data.root={tmp_path / 'data'}",
                 "data.synthetic_train=1", "data.synthetic_val=1", "data.synthetic_size=[64,96]", "data.workers=0",
                 "train.device=cpu", "--mode", "whole"]) == 0
    assert "mIoU" in capsys.readouterr().out
