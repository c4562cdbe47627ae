"""The WSOL model: a backbone with a 1×1 class head and, for CALM, a 1×1 location head (CALM.md §1)."""

from __future__ import annotations

import os

import torch
from torch import nn

from calm_fast.config import Config
from calm_fast.models.backbones import (
    Backbone,
    build_backbone,
    checkpoint_arch,
    init_xavier,
    load_pretrained,
    torchvision_checkpoint,
)
from calm_fast.modes import Method, choices

# build_model(pretrained=TORCHVISION) takes torchvision's ImageNet weights (from torch hub's cache).
TORCHVISION = "torchvision"


def check_method(method: str) -> None:
    if method not in tuple(Method):
        raise ValueError(f"method: unknown {method!r}; choose one of {choices(Method)}")


class WSOLModel(nn.Module):
    """Backbone + class head (K channels) + location head (1 channel; absent for "cam").

    Both heads are 1×1 convs with bias, Xavier-uniform weights and zero bias.
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

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B,3,h,w] -> (class_logits [B,K,H,W], location_scores [B,1,H,W] or None for "cam")."""
        features = self.backbone(images)
        location_scores = None if self.location_head is None else self.location_head(features)
        return self.class_head(features), location_scores

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


def build_model_from(cfg: Config, num_classes: int, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The configured architecture with `state_dict` loaded (strict: a mismatch names the keys)."""
    model = build_model(cfg.model.backbone, num_classes, cfg.model.method,
                        large_feature_map=cfg.model.large_feature_map, batch_norm=cfg.model.batch_norm)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit model.backbone={cfg.model.backbone!r} "
                         f"model.method='{cfg.model.method}' with {num_classes} classes: missing "
                         f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    return model
