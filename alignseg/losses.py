"""Segmentation losses: cross-entropy, OHEM cross-entropy, Lovasz-softmax, and the deep-supervision wrapper.

The network's training output is ``(main_logits, aux_logits)`` at a stride of the label (4 for AlignSeg);
:class:`SegmentationLoss` upsamples each to the label size (bilinear, ``align_corners=True``) and returns
``main_loss(main) + aux_weight * cross_entropy(aux)``. Pixels labelled ``ignore_index`` never count, and a
batch whose pixels are all ignored gives a loss of exactly 0 with zero gradients (never NaN).

* OHEM (online hard example mining, as in the CCNet/AlignSeg code): keep the pixels whose predicted
  probability of the true class is below ``thresh`` (0.7); when fewer than ``min_kept`` pixels would be
  kept, raise the threshold to the ``min_kept``-th smallest probability so at least that many count.
* Lovasz-softmax (Berman et al., CVPR 2018): the convex Lovasz extension of the Jaccard loss, on the
  softmax probabilities, averaged over the classes present in the batch (all pixels of the batch pooled).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.metainfo import IGNORE_INDEX


def _at_least_fp32(t: Tensor) -> Tensor:
    """Losses are computed in float32 (float64 stays float64), whatever the autocast dtype of the logits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _valid_count(target: Tensor, ignore_index: int) -> Tensor:
    return (target != ignore_index).sum().clamp(min=1)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the pixels not ignored; 0 (with zero gradient) when all are ignored.

    Args:
        logits (Tensor[N, C, H, W]): class scores.
        target (Tensor[N, H, W]): int64 class ids, ``ignore_index`` for ignored pixels.
    """
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / _valid_count(target, ignore_index)


def ohem_cross_entropy(
    logits: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 100_000, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Cross-entropy over the hard pixels only (see the module docstring); arguments as :func:`cross_entropy`.

    ``thresh`` is a probability of the true class; ``min_kept`` the least number of pixels kept (over
    the whole batch). When the batch has at most ``min_kept`` valid pixels, all of them are kept.
    """
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if num_valid > max(min_kept, 0):
        with torch.no_grad():
            prob = _at_least_fp32(logits.detach()).softmax(1)
            true_prob = prob.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)[valid]
            threshold = torch.tensor(thresh, dtype=true_prob.dtype, device=true_prob.device)
            if min_kept > 0:
                kth = true_prob.kthvalue(min(min_kept, num_valid)).values
                threshold = torch.maximum(threshold, kth)
            hard = torch.zeros_like(valid)
            hard[valid] = true_prob <= threshold
            target = target.masked_fill(~hard, ignore_index)
    return cross_entropy(logits, target, ignore_index)


def _lovasz_gradient(sorted_foreground: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing order.

    With ``p`` foreground pixels and the first ``i`` sorted pixels predicted as foreground, the Jaccard
    loss is ``1 - |fg ∩ top_i| / |fg ∪ top_i|``; the gradient is its increment at each ``i``.
    """
    total = sorted_foreground.sum()
    intersection = total - sorted_foreground.cumsum(0)
    union = total + (1 - sorted_foreground).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Lovasz-softmax loss over the classes present in ``target``; arguments as :func:`cross_entropy`."""
    num_classes = logits.shape[1]
    prob = _at_least_fp32(logits).softmax(1).permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    valid = labels != ignore_index
    prob, labels = prob[valid], labels[valid]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    losses = []
    for c in labels.unique().tolist():
        foreground = (labels == c).to(prob.dtype)
        errors = (foreground - prob[:, c]).abs()
        errors_sorted, order = errors.sort(descending=True)
        losses.append(errors_sorted @ _lovasz_gradient(foreground[order]))
    return torch.stack(losses).mean()


class SegmentationLoss(nn.Module):
    """``main_loss(main) + aux_weight * cross_entropy(aux)`` on logits upsampled to the label size.

    Called as ``criterion(outputs, target)``: ``outputs`` is ``(main_logits, aux_logits)`` (or the main
    logits alone, e.g. from a model in eval mode), each ``Tensor[N, num_classes, h, w]``; ``target`` is
    ``Tensor[N, H, W]`` int64. Returns the scalar loss (float32).
    """

    def __init__(self, name: str, num_classes: int, aux_weight: float, ignore_index: int, main_terms):
        super().__init__()
        self.name, self.num_classes, self.aux_weight, self.ignore_index = name, num_classes, aux_weight, ignore_index
        self.main_terms = main_terms  # [(weight, fn(logits, target, ignore_index=...))]

    def _upsampled(self, logits: Tensor, target: Tensor, which: str) -> Tensor:
        if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[1] != self.num_classes:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"{which} logits must be Tensor[N, {self.num_classes}, h, w], got {got}")
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"{which} logits have batch size {logits.shape[0]} but target has {target.shape[0]}")
        logits = _at_least_fp32(logits)
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
        return logits

    def forward(self, outputs: Tensor | tuple[Tensor, ...], target: Tensor) -> Tensor:
        if not isinstance(target, Tensor) or target.dim() != 3 or target.dtype != torch.int64:
            got = f"{tuple(target.shape)} {target.dtype}" if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"target must be an int64 Tensor[N, H, W], got {got}")
        main, aux = (
            (outputs, None) if isinstance(outputs, Tensor) else (outputs[0], outputs[1] if len(outputs) > 1 else None)
        )
        main = self._upsampled(main, target, "main")
        loss = sum(weight * fn(main, target, ignore_index=self.ignore_index) for weight, fn in self.main_terms)
        if aux is not None and self.aux_weight:
            loss = loss + self.aux_weight * cross_entropy(
                self._upsampled(aux, target, "aux"), target, self.ignore_index
            )
        return loss

    def extra_repr(self) -> str:
        return (
            f"{self.name!r}, num_classes={self.num_classes}, aux_weight={self.aux_weight}, "
            f"ignore_index={self.ignore_index}"
        )


CRITERIA = ("ce", "ohem", "lovasz", "ce_lovasz")


def build_criterion(
    name: str, num_classes: int, aux_weight: float = 0.1, ignore_index: int = IGNORE_INDEX, **kw
) -> SegmentationLoss:
    """The training loss by name; the auxiliary head always gets plain cross-entropy.

    * ``"ce"``: cross-entropy.
    * ``"ohem"``: OHEM cross-entropy; keywords ``thresh=0.7``, ``min_kept=100000``.
    * ``"lovasz"``: Lovasz-softmax alone.
    * ``"ce_lovasz"``: cross-entropy + ``lovasz_weight`` (0.8) x Lovasz-softmax: the combination the
      authors' training script runs under the name "ohem"; named here for what it computes.
    """
    key = name.strip().lower()
    allowed = {"ohem": {"thresh", "min_kept"}, "ce_lovasz": {"lovasz_weight"}}.get(key, set())
    if key not in CRITERIA:
        raise ValueError(f"loss name must be one of {CRITERIA}, got {name!r}")
    if set(kw) - allowed:
        raise TypeError(
            f"loss {name!r} does not take {sorted(set(kw) - allowed)}; it takes {sorted(allowed) or 'no options'}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if aux_weight < 0:
        raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
    if key == "ce":
        terms = [(1.0, cross_entropy)]
    elif key == "ohem":
        thresh, min_kept = float(kw.get("thresh", 0.7)), int(kw.get("min_kept", 100_000))
        if not 0 < thresh <= 1 or min_kept < 0:
            raise ValueError(f"ohem needs 0 < thresh <= 1 and min_kept >= 0, got thresh={thresh}, min_kept={min_kept}")
        terms = [(1.0, functools.partial(ohem_cross_entropy, thresh=thresh, min_kept=min_kept))]
    elif key == "lovasz":
        terms = [(1.0, lovasz_softmax)]
    else:
        terms = [(1.0, cross_entropy), (float(kw.get("lovasz_weight", 0.8)), lovasz_softmax)]
    return SegmentationLoss(key, num_classes, float(aux_weight), ignore_index, terms)
