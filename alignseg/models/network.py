"""The AlignSeg network (Huang et al., TPAMI 2021): deep-stem ResNet, bottom-up aligned decoder, two heads.

Decoder at stride 4, as in the authors' released code (``lateral*`` and ``refine*`` are RRBs)::

    d1 = lateral1(layer1)
    d2 = refine1(align_fa1(d1, lateral2(layer2)))
    d3 = refine2(align_fa2(d2, lateral3(layer3)))        -> aux_head
    d4 = refine3(align_fa3(d3, lateral4(layer4)))
    d5 = refine4(align_fa4(d4, lateral5(align_cm(layer4)))) -> head

Training mode returns ``(main_logits, aux_logits)`` at stride 4 (the size of the layer1 map); eval mode
returns the main logits, upsampled to the input size (bilinear, ``align_corners=True``) unless the
model was built with ``upsample_eval_output=False``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .modules import ALIGN_FA_FORMS, RRB, AlignCM, AlignFA, SegHead, activation_layer, upsample
from .resnet import NormLayer, ResNetBackbone

OFFSET_NAMES = ("align_fa1", "align_fa2", "align_fa3", "align_fa4", "align_cm")


class AlignSeg(nn.Module):
    """Feature-aligned segmentation network.

    Args:
        num_classes: number of output classes.
        depth: backbone ResNet depth (18, 34, 50, 101, 152); the paper uses 101.
        backbone_width: channels of the first backbone stage (64 for standard ResNets).
        decoder_channels: width of the decoder (256 in the paper).
        context_pool_size: size of AlignCM's pooled context (3 in the paper).
        align_fa_form: ``"exact"`` (default): every AlignFA computes the authors' function (warp the
            bilinearly upsampled coarse map), fused without building the upsampled map; ``"one_step"``:
            a variant that samples the coarse map directly, which differs from the authors' network
            once the offsets are non-zero. See :class:`~alignseg.models.modules.AlignFA`.
        upsample_high_first: run the authors' code literally (upsample the coarse map, concatenate
            for the offset heads, warp at full size): the same function as ``align_fa_form="exact"``,
            at the cost of the upsampled maps. All forms have the same weights.
        upsample_eval_output: in eval mode, resize the logits to the input size.
        offset_convention: unit of the offset heads, ``"pixels"`` (default) or ``"authors"`` (the released
            checkpoints' normalised units, converted before each op; see
            :class:`~alignseg.models.modules.AlignFA` and :func:`~alignseg.models.from_authors_checkpoint`).
        dropout: Dropout2d probability in both heads.
        act: decoder activation, ``"leaky_relu"`` (slope 0.01, as the authors' InPlaceABN) or ``"relu"``.
        norm_layer: called with a channel count, returns the normalisation module (BatchNorm2d by
            default; see :func:`convert_sync_batchnorm` for distributed training).
        in_channels: image channels.

    Input: images Tensor[N, in_channels, H, W], any H, W.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 101,
        backbone_width: int = 64,
        decoder_channels: int = 256,
        context_pool_size: int = 3,
        upsample_high_first: bool = False,
        align_fa_form: str = "exact",
        upsample_eval_output: bool = True,
        dropout: float = 0.1,
        act: str = "leaky_relu",
        norm_layer: NormLayer = nn.BatchNorm2d,
        in_channels: int = 3,
        offset_convention: str = "pixels",
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(decoder_channels, int) or decoder_channels < 4:
            raise ValueError(f"decoder_channels must be an int >= 4, got {decoder_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if align_fa_form not in ALIGN_FA_FORMS:
            raise ValueError(f"align_fa_form must be one of {ALIGN_FA_FORMS}, got {align_fa_form!r}")
        if upsample_high_first and align_fa_form != "exact":
            raise ValueError("upsample_high_first=True runs the authors' code, which is align_fa_form='exact'; "
                             f"it cannot be combined with align_fa_form={align_fa_form!r}")
        # Kept so that helpers (e.g. complexity counting) can rebuild the same network elsewhere.
        self.config: dict[str, Any] = dict(
            num_classes=num_classes, depth=depth, backbone_width=backbone_width,
            decoder_channels=decoder_channels, context_pool_size=context_pool_size,
            upsample_high_first=upsample_high_first, align_fa_form=align_fa_form,
            upsample_eval_output=upsample_eval_output,
            dropout=dropout, act=act, norm_layer=norm_layer, in_channels=in_channels,
            offset_convention=offset_convention,
        )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.upsample_eval_output = upsample_eval_output
        act_layer = activation_layer(act)
        width = decoder_channels

        self.backbone = ResNetBackbone(depth, backbone_width, in_channels, norm_layer)
        c1, c2, c3, c4 = self.backbone.stage_channels

        def rrb(in_ch: int) -> RRB:
            return RRB(in_ch, width, norm_layer, act_layer)

        def align(hidden: int = width) -> AlignFA:
            return AlignFA(width, norm_layer, act_layer, hidden, upsample_high_first=upsample_high_first,
                           form=align_fa_form, offset_convention=offset_convention)

        self.lateral1, self.lateral2, self.lateral3, self.lateral4 = rrb(c1), rrb(c2), rrb(c3), rrb(c4)
        self.align_cm = AlignCM(c4, width, norm_layer, act_layer, context_pool_size, concat=upsample_high_first,
                                offset_convention=offset_convention)
        self.lateral5 = rrb(width)
        self.align_fa1, self.align_fa2, self.align_fa3, self.align_fa4 = align(), align(), align(), align()
        self.refine1, self.refine2, self.refine3, self.refine4 = rrb(width), rrb(width), rrb(width), rrb(width)
        self.head = SegHead(width, num_classes, norm_layer, act_layer, dropout)
        self.aux_head = SegHead(width, num_classes, norm_layer, act_layer, dropout)

    def _check_images(self, images: object) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape [N, {self.in_channels}, H, W], got {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised pixels), got {images.dtype}")

    def _decode(self, images: Tensor, offsets: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Backbone and decoder: returns (d3, d5); fills ``offsets`` when a dict is given."""
        want = offsets is not None
        c1, c2, c3, c4 = self.backbone(images)

        context = self.align_cm(c4, return_offsets=want)
        if want:
            context, offsets["align_cm"] = context

        d = self.lateral1(c1)
        stages = (
            (self.align_fa1, self.lateral2, c2, self.refine1),
            (self.align_fa2, self.lateral3, c3, self.refine2),
            (self.align_fa3, self.lateral4, c4, self.refine3),
            (self.align_fa4, self.lateral5, context, self.refine4),
        )
        d3 = d
        for index, (align_fa, lateral, coarse, refine) in enumerate(stages, start=1):
            fused = align_fa(d, lateral(coarse), return_offsets=want)
            if want:
                fused, offsets[f"align_fa{index}"] = fused
            d = refine(fused)
            if index == 2:
                d3 = d
        return d3, d

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Train mode: ``(main_logits, aux_logits)``, Tensor[N, K, H/4, W/4] each (the layer1 size).

        Eval mode: the main logits, Tensor[N, K, H, W] (or at stride 4 when ``upsample_eval_output``
        is off).
        """
        self._check_images(images)
        d3, d5 = self._decode(images)
        logits = self.head(d5)
        if self.training:
            return logits, self.aux_head(d3)
        if self.upsample_eval_output:
            logits = upsample(logits, images.shape[-2:])
        return logits

    def forward_offsets(self, images: Tensor) -> dict[str, Tensor]:
        """The predicted offset fields, for visualisation and analysis.

        Returns ``{"align_fa1": Tensor[N, 4, h, w], ..., "align_fa4": ..., "align_cm": Tensor[N, 2, h, w]}``
        in pixels of each module's output grid (h, w = the stride-4 decoder size for AlignFA, the layer4
        size for AlignCM). AlignFA channels 0, 1 = (dx, dy) of the coarse map, 2, 3 = (dx, dy) of the fine
        map. Runs in the model's current mode; wrap in ``torch.no_grad()`` when no gradient is needed.
        """
        self._check_images(images)
        offsets: dict[str, Tensor] = {}
        self._decode(images, offsets)
        return {name: offsets[name] for name in OFFSET_NAMES}


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm with SyncBatchNorm for distributed training (torch's own, no CUDA extension)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
