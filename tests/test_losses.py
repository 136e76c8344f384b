"""Losses against NumPy references written from the definitions, plus the all-ignored and argument cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignseg.losses import CRITERIA, build_criterion, cross_entropy, lovasz_softmax, ohem_cross_entropy

pytestmark = pytest.mark.usefixtures("reference_ops")


def np_log_softmax(logits):  # [N, C, H, W] -> same
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def np_cross_entropy(logits, target, keep=None):
    logp = np_log_softmax(logits.astype(np.float64))
    valid = target != 255 if keep is None else keep
    n, h, w = np.nonzero(valid)
    return -logp[n, target[n, h, w], h, w].mean()


def np_ohem(logits, target, thresh, min_kept):
    prob = np.exp(np_log_softmax(logits.astype(np.float64)))
    valid = target != 255
    n, h, w = np.nonzero(valid)
    true_prob = prob[n, target[n, h, w], h, w]
    keep = valid.copy()
    if len(true_prob) > min_kept:
        threshold = max(thresh, np.sort(true_prob)[min_kept - 1]) if min_kept > 0 else thresh
        keep[n, h, w] = true_prob <= threshold
    return np_cross_entropy(logits, target, keep), int(keep.sum())


def np_lovasz_softmax(logits, target):
    """From the set-function definition: Lovasz extension of Jaccard loss J(M) = |M| / |fg ∪ M|."""
    prob = np.exp(np_log_softmax(logits.astype(np.float64))).transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    prob, labels = prob[labels != 255], labels[labels != 255]
    losses = []
    for c in np.unique(labels):
        fg = labels == c
        errors = np.abs(fg - prob[:, c])
        order = np.argsort(-errors, kind="stable")
        loss, previous, chosen = 0.0, 0.0, np.zeros(len(labels), bool)
        for i in order:
            chosen[i] = True
            jaccard = chosen.sum() / (fg | chosen).sum()
            loss += errors[i] * (jaccard - previous)
            previous = jaccard
        losses.append(loss)
    return float(np.mean(losses))


def _batch(seed=0, n=2, c=5, h=6, w=7, ignore=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore] = 255
    return logits, target


def test_cross_entropy_matches_numpy():
    logits, target = _batch()
    expected = np_cross_entropy(logits.numpy(), target.numpy())
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("min_kept", [0, 10, 60, 1000])
def test_ohem_matches_numpy(min_kept):
    logits, target = _batch(seed=1, h=8, w=9)
    logits[:, :, :4] *= 4  # a mix of confident and unsure pixels
    expected, kept = np_ohem(logits.numpy(), target.numpy(), 0.7, min_kept)
    valid = int((target != 255).sum())
    assert 0 < kept <= valid
    assert ohem_cross_entropy(logits, target, 0.7, min_kept).item() == pytest.approx(expected, rel=1e-10)
    if min_kept >= valid:
        assert expected == pytest.approx(np_cross_entropy(logits.numpy(), target.numpy()))


def test_lovasz_softmax_matches_the_set_function_definition():
    logits, target = _batch(seed=2, c=4, h=5, w=6)
    expected = np_lovasz_softmax(logits.numpy(), target.numpy())
    assert lovasz_softmax(logits, target).item() == pytest.approx(expected, rel=1e-9)


def test_lovasz_softmax_of_hard_predictions_is_one_minus_iou():
    _, target = _batch(seed=3, c=4, h=8, w=8)
    pred = torch.randint(0, 4, target.shape, generator=torch.Generator().manual_seed(9))
    pred = torch.where(torch.rand(target.shape) < 0.6, target.clamp(max=3), pred)
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).double() * 60  # probabilities 0/1 to ~1e-26
    valid = target != 255
    ious = []
    for c in target[valid].unique().tolist():
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        ious.append(inter.double() / union)
    assert lovasz_softmax(logits, target).item() == pytest.approx(1 - torch.stack(ious).mean().item(), abs=1e-9)


def test_criterion_upsamples_and_adds_the_auxiliary_term():
    main, target = _batch(seed=4, h=4, w=5, c=3)
    aux = torch.randn_like(main)
    target = torch.randint(0, 3, (2, 13, 17))  # labels at 4x the logits' size (minus the align_corners edge)
    target[:, :2] = 255
    up = lambda x: F.interpolate(x, size=(13, 17), mode="bilinear", align_corners=True).numpy()  # noqa: E731
    ce = lambda x: np_cross_entropy(up(x), target.numpy())  # noqa: E731
    for name, aux_weight, expected in [
        ("ce", 0.1, ce(main) + 0.1 * ce(aux)),
        ("ce", 0.0, ce(main)),
        ("ce_lovasz", 0.4, ce(main) + 0.8 * np_lovasz_softmax(up(main), target.numpy()) + 0.4 * ce(aux)),
        ("ohem", 0.1, np_ohem(up(main), target.numpy(), 0.6, 50)[0] + 0.1 * ce(aux)),
    ]:
        options = {"thresh": 0.6, "min_kept": 50} if name == "ohem" else {}
        criterion = build_criterion(name, 3, aux_weight=aux_weight, **options)
        assert criterion((main, aux), target).item() == pytest.approx(expected, rel=1e-5)
    # Eval-mode output (main logits alone) is accepted too.
    assert build_criterion("ce", 3)(main, target).item() == pytest.approx(ce(main), rel=1e-5)


@pytest.mark.parametrize("name", CRITERIA)
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(name):
    main = torch.randn(2, 3, 4, 4, requires_grad=True)
    aux = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 16, 16), 255)
    loss = build_criterion(name, 3)((main, aux), target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(main.grad, torch.zeros_like(main)) and torch.equal(aux.grad, torch.zeros_like(aux))


@pytest.mark.parametrize("name", CRITERIA)
def test_gradients_are_finite_and_bf16_logits_accepted(name):
    main = torch.randn(2, 3, 4, 4).bfloat16().requires_grad_()
    target = torch.randint(0, 3, (2, 16, 16))
    options = {"min_kept": 10} if name == "ohem" else {}
    loss = build_criterion(name, 3, **options)((main, main * 0.5), target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    assert torch.isfinite(main.grad.float()).all() and main.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="loss name must be one of"):
        build_criterion("dice", 3)
    with pytest.raises(TypeError, match="min_kept"):
        build_criterion("ce", 3, min_kept=5)
    with pytest.raises(ValueError, match="thresh"):
        build_criterion("ohem", 3, thresh=1.5)
    criterion = build_criterion("ce", 3)
    with pytest.raises(ValueError, match=r"main logits must be Tensor\[N, 3, h, w\]"):
        criterion((torch.randn(1, 4, 2, 2), torch.randn(1, 3, 2, 2)), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be an int64"):
        criterion((torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)), torch.zeros(1, 8, 8))
