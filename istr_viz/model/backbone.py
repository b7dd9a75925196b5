"""ResNet + FPN backbone giving P2-P5 (strides 4, 8, 16, 32), as ISTR uses (no P6).

The ResNet is assembled from torchvision's ``BasicBlock`` / ``Bottleneck`` with torchvision's
parameter names, so a torchvision ImageNet state dict loads into it when ``base_channels == 64``.
A smaller ``base_channels`` gives a narrow variant for CPU training from scratch.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from istr_viz.config import FPN_OUTPUT_CONVS
from istr_viz.errors import CheckpointError, ConfigError

RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}
NORMS = ("frozen_bn", "bn", "gn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


def group_norm(num_channels: int, max_groups: int = 32, min_group_size: int = 4) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= ``max_groups``) that divide the channels into groups of
    at least ``min_group_size`` channels (e.g. 256 -> 32 groups, 16 -> 4 groups, 24 -> 4 groups)."""
    groups = max_groups
    while groups > 1 and (num_channels % groups or num_channels // groups < min_group_size):
        groups //= 2
    return nn.GroupNorm(groups, num_channels)


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    """``"frozen_bn"`` | ``"bn"`` | ``"gn"`` -> a constructor ``f(num_channels) -> nn.Module``."""
    layers: dict[str, Callable[[int], nn.Module]] = {
        "frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": group_norm}
    if norm not in layers:
        raise ConfigError(f"unknown norm {norm!r}; valid: {', '.join(layers)}", entry="model.norm")
    return layers[norm]


def _make_stage(block: type[nn.Module], inplanes: int, planes: int, num_blocks: int, stride: int,
                norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    """One ResNet stage (torchvision's layout): the first block may downsample."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                   norm_layer(out))
    blocks = [block(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
    blocks += [block(out, planes, norm_layer=norm_layer) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools CPU tensors in channels-last memory (same values): torch's
    NCHW CPU kernel is ~10x slower (30 vs 19 ms forward + backward after a batch of 4 stems).
    A module, not a step in ``ResNetBody.forward``, so that torchvision's ``BackboneWithFPN``
    (the Mask R-CNN peer), which calls the body's children one by one, gets it too."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class ResNetBody(nn.Module):
    """ResNet without pooling and classifier; ``forward`` returns [C2, C3, C4, C5].

    ``zero_init_residual``: start the last norm's scale of every residual block at zero, so each
    residual branch starts at zero and a block passes on its shortcut (the identity, or the
    projection of the first block of a stage): Goyal et al. 2017, torchvision's
    ``zero_init_residual``. For training from scratch (ImageNet weights overwrite it).
    """

    def __init__(self, name: str, base_channels: int = 64, norm: str = "frozen_bn",
                 zero_init_residual: bool = False):
        super().__init__()
        if name not in RESNET_LAYOUTS:
            raise ConfigError(f"unknown backbone {name!r}; valid: {', '.join(RESNET_LAYOUTS)}",
                              entry="model.backbone")
        block, layers = RESNET_LAYOUTS[name]
        norm_layer = norm_layer_for(norm)
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = ChannelsLastMaxPool2d(3, stride=2, padding=1)
        inplanes, self.out_channels = base_channels, []
        for i, num_blocks in enumerate(layers):
            planes = base_channels * 2**i
            stage = _make_stage(block, inplanes, planes, num_blocks, 1 if i == 0 else 2, norm_layer)
            self.add_module(f"layer{i + 1}", stage)
            inplanes = planes * block.expansion
            self.out_channels.append(inplanes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised -> [C2 (B, c, H/4, W/4), ..., C5 (B, 8c', H/32, W/32)]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def build_fpn(in_channels: list[int], out_channels: int,
              norm_layer: Callable[[int], nn.Module] | None = None,
              output_conv: str = "3x3") -> FeaturePyramidNetwork:
    """torchvision's FPN; ``output_conv="separable"`` makes its output convs depthwise-separable
    (:func:`separable_output_convs`)."""
    if output_conv not in FPN_OUTPUT_CONVS:
        raise ConfigError(f"unknown FPN output conv {output_conv!r}; valid: "
                          f"{', '.join(FPN_OUTPUT_CONVS)}", entry="model.fpn_output_conv")
    fpn = FeaturePyramidNetwork(in_channels, out_channels, norm_layer=norm_layer)
    return separable_output_convs(fpn) if output_conv == "separable" else fpn


class Backbone(nn.Module):
    """Images in [0, 1] -> FPN features P2..P5, all with ``out_channels`` channels.

    Attributes:
        out_channels: FPN width (must equal the ISTR hidden width D).
        strides: (4, 8, 16, 32), the stride of each returned level.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, body: ResNetBody, out_channels: int = 256, fpn_norm: str | None = None,
                 fpn_output_conv: str = "3x3"):
        super().__init__()
        self.body = body
        norm = None if fpn_norm is None else norm_layer_for(fpn_norm)
        self.fpn = build_fpn(body.out_channels, out_channels, norm, fpn_output_conv)
        self.out_channels = out_channels
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def forward(self, images: Tensor, valid_mask: Tensor | None = None) -> list[Tensor]:
        """Normalise with the ImageNet mean/std, zero the padding, run ResNet + FPN.

        Args:
            images: (B, 3, Hp, Wp) RGB float in [0, 1], zero-padded.
            valid_mask: (B, 1, Hp, Wp) bool, True on real pixels; padding becomes 0 after
                normalisation (as detectron2 pads after normalising). None: no padding.

        Returns:
            [P2, P3, P4, P5], each (B, out_channels, ceil(Hp / s), ceil(Wp / s)).
        """
        x = (images - self.pixel_mean) / self.pixel_std
        if valid_mask is not None:
            x = x * valid_mask
        feats = self.body(x)
        pyramid = self.fpn(OrderedDict((f"c{i + 2}", f) for i, f in enumerate(feats)))
        return list(pyramid.values())


def separable_output_convs(fpn: FeaturePyramidNetwork) -> FeaturePyramidNetwork:
    """Replace each FPN output conv (3x3, D -> D) by a depthwise 3x3 and a pointwise 1x1 conv, in
    place; the norm after it, if any, stays. The same receptive field for ~1/9 of the
    multiply-adds: on the ``shapes-cpu`` maps (D = 128, P2 at 48 x 48) the FPN's forward +
    backward took 204 against 65 ms a batch of 4 on one core, as much as the whole ResNet before.
    """
    for block in fpn.layer_blocks:
        conv = block[0]
        d_in, d_out = conv.in_channels, conv.out_channels
        block[0] = nn.Sequential(
            nn.Conv2d(d_in, d_in, 3, padding=1, groups=d_in, bias=False),
            nn.Conv2d(d_in, d_out, 1, bias=conv.bias is not None))
        for m in block[0]:
            nn.init.kaiming_uniform_(m.weight, a=1)  # torchvision's FPN init
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
    return fpn


def load_pretrained(body: ResNetBody, path: str | Path) -> None:
    """Load a torchvision ImageNet ResNet state dict from a local file (``fc.*`` is ignored)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"cannot read pretrained weights ({err})", file=path) from None
    if not isinstance(state, dict):
        raise CheckpointError("pretrained weights must be a ResNet state dict", file=path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the backbone (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", file=path)


# what freeze_backbone_at(body, at) freezes, by ``at``
FROZEN_PARTS = ("nothing", "the ResNet's stem", "the ResNet's stem and layer1",
                "the ResNet's stem, layer1 and layer2", "the ResNet's stem and layers 1-3",
                "the whole ResNet")
IMAGENET_FREEZE_AT = 2  # ImageNet weights train all but the stem and layer1 (detectron2's default)


def freeze_backbone_at(body: ResNetBody, at: int) -> None:
    """No gradients for the first ``at`` parts of the ResNet, numbered as detectron2's FREEZE_AT:
    0 none, 1 the stem (conv1, bn1), 2 the stem and layer1, ..., 5 the whole ResNet.

    Only the gradients stop (detectron2 also fixes the frozen stages' BatchNorm statistics): in
    training mode a frozen BatchNorm here still normalises with the batch's statistics and
    updates its running ones, so frozen layers still adapt their scale to new images. Autograd
    never runs backward through the frozen prefix (the input needs no gradient), which is where
    the saving is.
    """
    if not 0 <= at < len(FROZEN_PARTS):
        raise ConfigError(f"the freeze point must be 0-{len(FROZEN_PARTS) - 1} (0 nothing, 1 the "
                          f"stem, 2 the stem and layer1, ..., 5 the whole ResNet), got {at}")
    parts = [(body.conv1, body.bn1), body.layer1, body.layer2, body.layer3, body.layer4]
    for part in parts[:at]:
        for module in part if isinstance(part, tuple) else (part,):
            module.requires_grad_(False)


def build_backbone(name: str = "resnet50", out_channels: int = 256, norm: str = "frozen_bn",
                   base_channels: int = 64, pretrained_path: str | Path | None = None,
                   freeze_early: bool | None = None, fpn_output_conv: str = "3x3",
                   zero_init_residual: bool = False) -> Backbone:
    """ResNet-FPN backbone.

    Args:
        name: one of ``RESNET_LAYOUTS`` (resnet18, resnet34, resnet50, resnet101).
        out_channels: FPN width.
        norm: ResNet norm. ``"frozen_bn"`` needs pretrained statistics (it is the identity
            otherwise); from scratch use ``"bn"`` (the FPN then has no norm, as torchvision's) or
            ``"gn"`` (GroupNorm is then also used in the FPN).
        base_channels: stem width; 64 is torchvision's ResNet, e.g. 16 gives a narrow CPU model.
        pretrained_path: local torchvision ImageNet weights (``torch.load(weights_only=True)``);
            never downloaded. Requires ``base_channels == 64``.
        freeze_early: freeze stem and layer1; default: only when ``pretrained_path`` is given.
        fpn_output_conv: ``"3x3"`` (the FPN paper's) or ``"separable"`` (:func:`build_fpn`).
        zero_init_residual: residual blocks start as the identity (:class:`ResNetBody`).
    """
    body = ResNetBody(name, base_channels, norm, zero_init_residual)
    if pretrained_path is not None:
        if base_channels != 64 or norm == "gn":
            raise ConfigError("ImageNet weights need backbone_base_channels = 64 and norm "
                              f"'frozen_bn' or 'bn' (got {base_channels}, {norm!r})",
                              entry="model.pretrained_path")
        load_pretrained(body, pretrained_path)
    if freeze_early if freeze_early is not None else pretrained_path is not None:
        freeze_backbone_at(body, IMAGENET_FREEZE_AT)
    return Backbone(body, out_channels, fpn_norm="gn" if norm == "gn" else None,
                    fpn_output_conv=fpn_output_conv)
