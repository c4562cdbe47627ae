"""The WSOL model: a backbone with a 1×1 class head and, for CALM, a 1×1 location head (CALM.md §1)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from calm_fast.config import Config
from calm_fast.errors import WeightsMismatchError
from calm_fast.models.backbones import (
    Backbone,
    build_backbone,
    checkpoint_arch,
    init_xavier,
    load_pretrained,
    torchvision_checkpoint,
)
from calm_fast.models.weights import describe_mismatch
from calm_fast.modes import Method, choices

# build_model(pretrained=TORCHVISION) takes torchvision's ImageNet weights (from torch hub's cache).
TORCHVISION = "torchvision"


def check_method(method: str) -> None:
    if method not in tuple(Method):
        raise ValueError(f"method: unknown {method!r}; choose one of {choices(Method)}")


# The merged head output has its channels padded to a multiple of this: with 8 channels a 16-byte vector
# of bf16, every cell of a channels-last map starts 16-byte aligned (the fused loss reads it with vectors).
HEAD_CHANNEL_MULTIPLE = 8


class WSOLModel(nn.Module):
    """Backbone + class head (K channels) + location head (1 channel; absent for "cam").

    Both heads are 1×1 convs with bias, Xavier-uniform weights and zero bias. For CALM they run as one
    conv (the backbone's features are read once, forward and backward): its weight is the two heads'
    weights and zero rows stacked, giving the merged head maps [B, C, H, W] with the class logits in
    channels 0..K-1, the location scores in channel K and zeros up to C, a multiple of
    HEAD_CHANNEL_MULTIPLE. The two nn.Conv2d modules stay the parameters' owners, so state-dict keys,
    initialisation and old checkpoints are unchanged.
    """

    def __init__(self, backbone: Backbone, num_classes: int, method: str):
        super().__init__()
        check_method(method)
        if num_classes < 1:
            raise ValueError(f"num_classes: must be at least 1, got {num_classes}")
        self.method = method
        self.num_classes = num_classes
        self.backbone = backbone
        self.class_head = nn.Conv2d(backbone.out_channels, num_classes, kernel_size=1)
        self.location_head = None if method == "cam" else nn.Conv2d(backbone.out_channels, 1, kernel_size=1)
        init_xavier(self.class_head)
        if self.location_head is not None:
            init_xavier(self.location_head)
            padding = -(num_classes + 1) % HEAD_CHANNEL_MULTIPLE
            # zero weight rows and biases of the padding channels (not parameters, not in the state dict)
            self.register_buffer("head_padding", torch.zeros(padding, backbone.out_channels + 1), persistent=False)

    def head_maps(self, features: torch.Tensor) -> torch.Tensor:
        """The merged 1×1 conv of both heads (CALM): features [B,D,H,W] -> [B, C, H, W] (see the class)."""
        padding = self.head_padding.to(self.class_head.weight.dtype)
        weight = torch.cat([self.class_head.weight, self.location_head.weight, padding[:, :-1, None, None]])
        bias = torch.cat([self.class_head.bias, self.location_head.bias, padding[:, -1]])
        return F.conv2d(features, weight, bias)

    def forward(self, images: torch.Tensor, merged: bool = False):
        """images [B,3,h,w] -> (class_logits [B,K,H,W], location_scores [B,1,H,W] or None for "cam").

        merged=True returns the merged head maps [B, C, H, W] instead (CALM; for "cam" the class logits),
        which `calm_fast.head.merged_loss` takes whole, giving the conv one gradient.
        """
        features = self.backbone(images)
        if self.location_head is None:
            class_logits = self.class_head(features)
            return class_logits if merged else (class_logits, None)
        maps = self.head_maps(features)
        if merged:
            return maps
        return maps[:, : self.num_classes], maps[:, self.num_classes: self.num_classes + 1]

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(base-LR parameters: the backbone's ``base_lr_modules``, CALM.md §3; all the others: ×10 LR).

        The split follows module objects (``Backbone.base_lr_modules``), not parameter names. Each
        parameter lands in exactly one group, in registration order.
        """
        base_ids = {
            id(parameter)
            for module in self.backbone.base_lr_modules()
            for parameter in module.parameters()
        }
        base, boosted = [], []
        for parameter in self.parameters():
            (base if id(parameter) in base_ids else boosted).append(parameter)
        return base, boosted


def build_model(
    backbone: str,
    num_classes: int,
    method: str,
    large_feature_map: bool = True,
    pretrained: str | os.PathLike | None = None,
    batch_norm: bool = False,
) -> WSOLModel:
    """Build a WSOL model.

    backbone: one of ``backbones.BACKBONES`` ("resnet50", "vgg16", "inception_v3", "tiny_resnet", "tiny_vgg").
    method: "cam", "calm-em" or "calm-ml" (the two CALM methods share one architecture).
    large_feature_map: 28×28 maps at 224 for the paper backbones (else 14×14).
    pretrained: a local torchvision-format ImageNet checkpoint, or "torchvision" for torchvision's own
        weights (cached by torch hub, downloaded once where the network allows); None trains from scratch.
    batch_norm: VGG16-BN and BatchNorm in the new convs (see ``build_backbone``).
    """
    check_method(method)  # before building (and maybe loading) a backbone
    trunk = build_backbone(backbone, large_feature_map, batch_norm)
    if pretrained is not None:
        arch = checkpoint_arch(backbone, batch_norm)
        path = torchvision_checkpoint(arch) if pretrained == TORCHVISION else pretrained
        load_pretrained(trunk, path, arch)
    return WSOLModel(trunk, num_classes, method)


def build_model_from(cfg: Config, num_classes: int, state_dict: dict[str, torch.Tensor],
                     source: str | os.PathLike | None = None) -> torch.nn.Module:
    """The configured architecture with `state_dict` loaded strictly; weights that do not fit raise a
    WeightsMismatchError listing what differs, on one line (naming `source`, the file, when given)."""
    model = build_model(cfg.model.backbone, num_classes, cfg.model.method,
                        large_feature_map=cfg.model.large_feature_map, batch_norm=cfg.model.batch_norm)
    mismatch = describe_mismatch(state_dict, model.state_dict())
    if mismatch:
        where = f"{source}: " if source is not None else ""
        raise WeightsMismatchError(f"{where}the checkpoint does not fit model.backbone={cfg.model.backbone!r} "
                                   f"model.method='{cfg.model.method}' with {num_classes} classes: {mismatch}")
    model.load_state_dict(state_dict)
    return model
