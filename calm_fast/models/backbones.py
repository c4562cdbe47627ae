"""WSOL backbones (CALM.md §2), small CPU backbones, and ImageNet weight loading.

Every backbone maps images ``[B, 3, h, w]`` to features ``[B, out_channels, H, W]`` and names the modules
that train at the base learning rate (``base_lr_modules``, CALM.md §3) and the layers that no ImageNet
checkpoint covers (``new_layers``).

Feature-map sizes at a 224×224 input (``large_feature_map`` True / False):

============  =========  =========  ============
backbone      True       False      out_channels
============  =========  =========  ============
resnet50      28×28      14×14      2048
vgg16         28×28      14×14      1024
inception_v3  28×28      14×14      1024
============  =========  =========  ============

Inception's extra max-pool (small map only) is 3×3, stride 2, no padding, ceil_mode, as in the reference
and wsolevaluation: it maps 28 to ceil((28 − 3) / 2) + 1 = 14.

Initialisation: trunk layers start from Kaiming-normal (fan-out, as torchvision does) with zero bias and
BatchNorm at (1, 0). The layers that no ImageNet checkpoint covers (VGG ``conv6``, Inception
``extra_convs``) are Kaiming-normal too (He, fan-out, zero bias: CALM.md §2, the reference's VGG rule);
the 1×1 heads of :mod:`calm_fast.models.wsol` are Xavier-uniform. (The reference's InceptionV3, which
cannot be built as published, and wsolevaluation's initialise their extra convs Xavier-uniform; calm-fast
follows CALM.md and uses He for both new-layer kinds.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_weight
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionC
from torchvision.models.resnet import BasicBlock, Bottleneck

from calm_fast.config import ConfigError
from calm_fast.errors import WeightsMismatchError
from calm_fast.models.weights import read_state_dict

BACKBONES = ("resnet50", "vgg16", "inception_v3", "tiny_resnet", "tiny_vgg")

# torchvision's ImageNet checkpoint architectures that load_pretrained understands, with their weight enums.
TORCHVISION_WEIGHTS = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "vgg16": "VGG16_Weights.IMAGENET1K_V1",
    "vgg16_bn": "VGG16_BN_Weights.IMAGENET1K_V1",
    "inception_v3": "Inception_V3_Weights.IMAGENET1K_V1",
}


class Backbone(nn.Module):
    """A feature extractor: ``forward(images [B,3,h,w]) -> features [B, out_channels, H, W]``."""

    out_channels: int
    # Child modules that no ImageNet checkpoint covers; load_pretrained leaves them as initialised.
    new_layers: tuple[str, ...] = ()

    def base_lr_modules(self) -> list[nn.Module]:
        """The modules trained at the base learning rate (CALM.md §3); the rest of the model gets ×10."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------------


def _init_layers(module: nn.Module, init_conv_weight) -> None:
    """`init_conv_weight` for every conv weight in ``module``, zero conv biases, BatchNorm at (1, 0)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            init_conv_weight(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def init_he(module: nn.Module) -> None:
    """He init: Kaiming-normal (fan-out, ReLU gain) convs with zero bias, BatchNorm at (1, 0). The trunk gets
    it before pretrained weights, if any, replace it; the new layers (VGG conv6, Inception's extra convs)
    keep it (CALM.md §2)."""
    _init_layers(module, lambda weight: nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu"))


def init_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero bias for every conv in ``module`` (the 1×1 heads); BatchNorm at (1, 0)."""
    _init_layers(module, nn.init.xavier_uniform_)


def _conv_block(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """3×3 conv (pad 1, with bias) [+ BatchNorm] + ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------------
# ResNet50
# ---------------------------------------------------------------------------------------------------------


def _residual_stage(block: type[nn.Module], in_channels: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` residual blocks; the first one changes stride/width through a 1×1 conv + BN shortcut."""
    out_channels = planes * block.expansion
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [block(in_channels, planes, stride=stride, downsample=shortcut)]
    layers += [block(out_channels, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WSOLResNet50(Backbone):
    """ResNet50 (torchvision layout and parameter names) with ``layer4`` at stride 1.

    ``layer3`` also runs at stride 1 when ``large_feature_map`` (stride 8 overall: 28×28 at 224), else at
    stride 2 (stride 16: 14×14). The strides move, the parameters do not: torchvision's ResNet50 v1
    checkpoint loads unchanged.
    """

    out_channels = 2048

    def __init__(self, large_feature_map: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _residual_stage(Bottleneck, 64, 64, blocks=3, stride=1)
        self.layer2 = _residual_stage(Bottleneck, 256, 128, blocks=4, stride=2)
        self.layer3 = _residual_stage(Bottleneck, 512, 256, blocks=6, stride=1 if large_feature_map else 2)
        self.layer4 = _residual_stage(Bottleneck, 1024, 512, blocks=3, stride=1)
        init_he(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def base_lr_modules(self) -> list[nn.Module]:
        # CALM.md §3: layer4 is re-purposed (stride 1) and trains at ×10 like the heads.
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]


# ---------------------------------------------------------------------------------------------------------
# VGG16
# ---------------------------------------------------------------------------------------------------------

# torchvision's VGG16 ("D") layout: numbers are 3×3 conv widths, "M" a 2×2/2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class WSOLVGG16(Backbone):
    """VGG16 (optionally with BatchNorm) without its last max-pools, plus ``conv6`` 3×3 512→1024 + ReLU.

    The 5th max-pool is dropped (stride 16: 14×14 at 224), and the 4th too when ``large_feature_map``
    (stride 8: 28×28). ``features`` keeps torchvision's layer order; ``torchvision_index`` maps each
    torchvision ``features.<i>`` index to ours, which differs after a dropped pool.
    """

    out_channels = 1024
    new_layers = ("conv6",)

    def __init__(self, large_feature_map: bool = True, batch_norm: bool = False):
        super().__init__()
        self.batch_norm = batch_norm
        dropped_pools = {4, 5} if large_feature_map else {5}
        layers: list[nn.Module] = []
        self.torchvision_index: dict[int, int] = {}
        torchvision_position = 0
        pool_number = 0
        in_channels = 3
        for entry in VGG16_LAYOUT:
            if entry == "M":
                pool_number += 1
                if pool_number not in dropped_pools:
                    self.torchvision_index[torchvision_position] = len(layers)
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                torchvision_position += 1
                continue
            for layer in _conv_block(in_channels, int(entry), batch_norm):
                self.torchvision_index[torchvision_position] = len(layers)
                layers.append(layer)
                torchvision_position += 1
            in_channels = int(entry)
        self.features = nn.Sequential(*layers)
        self.conv6 = _conv_block(512, 1024, batch_norm)
        init_he(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv6(self.features(images))

    def base_lr_modules(self) -> list[nn.Module]:
        return [self.features]


# ---------------------------------------------------------------------------------------------------------
# InceptionV3
# ---------------------------------------------------------------------------------------------------------


class GridKeepingInceptionB(nn.Module):
    """Inception's grid-reduction block (``Mixed_6a``) at stride 1, pad 1: it keeps the map size.

    Parameter names match torchvision's ``InceptionB`` so the ImageNet weights load.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=1, padding=1)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=1, padding=1)
        self.branch_pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, self.branch_pool(x)], dim=1)


def _ceil_pool(padding: int = 1) -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=padding, ceil_mode=True)


class WSOLInceptionV3(Backbone):
    """InceptionV3 up to ``Mixed_6e``, the WSOL variant, plus two 3×3 convs 768→1024→1024 (+BN) + ReLU.

    Changes from torchvision's Inception3: ``Conv2d_1a`` pad 1 (``Conv2d_2b`` keeps its pad 1), max-pools
    3×3/2 pad 1 with ceil_mode, ``Mixed_6a`` at stride 1 pad 1, and one more max-pool after ``Mixed_5d``
    unless ``large_feature_map``: 3×3/2 with ceil_mode and **no** padding, as in the reference and
    wsolevaluation. Map sides at 224: 112 → 110 → 110 → pool 56 → 56 → 54 → pool 28 → [pool 14] → kept
    by Mixed_6a-e and the extra convs. No ``transform_input``: inputs use the ImageNet mean/std like every
    backbone here (as the reference does).

    ``dropout`` (default 0.5, wsolevaluation's InceptionV3 baseline): during training, dropout on the
    Mixed_6e output, between the two extra convs and on the features the heads read; 0 disables it (the
    CALM reference's InceptionV3 has none).
    """

    out_channels = 1024
    new_layers = ("extra_convs",)

    def __init__(self, large_feature_map: bool = True, batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must lie in [0, 1), got {dropout}")
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2, padding=1)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.pool1 = _ceil_pool()
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.pool2 = _ceil_pool()
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.pool3 = nn.Identity() if large_feature_map else _ceil_pool(padding=0)
        self.Mixed_6a = GridKeepingInceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        # Dropout modules hold no parameters: the state dict keys stay extra_convs.{0,1}.* whatever the rate.
        self.extra_convs = nn.Sequential(_conv_block(768, 1024, batch_norm), _conv_block(1024, 1024, batch_norm))
        self.dropout = nn.Dropout(dropout)
        init_he(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(images)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.pool1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.pool2(x))))
        x = self.Mixed_6a(self.pool3(x))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        for block in self.extra_convs:
            x = block(self.dropout(x))
        return self.dropout(x)

    def base_lr_modules(self) -> list[nn.Module]:
        return [
            self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3,
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,
            self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
        ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Small backbones for 2-core CPU training
# ---------------------------------------------------------------------------------------------------------


class TinyResNet(Backbone):
    """A narrow ResNet for CPU runs: stem 3×3/2 (32) → BasicBlocks 64/2 → 128/2 → 128/1 (or /2).

    Stride 8 with ``large_feature_map`` (16×16 at 128×128), else 16 (8×8). Theoretical receptive field of
    one output cell: 71 px (stride 8; about half of a 128 image) or 87 px (stride 16). 0.58 M parameters
    (0.60 M at stride 16), 0.41 GFLOPs forward at 128×128; every width is a multiple of 32, which suits
    bf16 on CPU (a training step under bf16 autocast with channels_last ran about 3× faster than fp32
    NCHW on a 2-core AMX CPU).
    """

    out_channels = 128

    def __init__(self, large_feature_map: bool = True):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
        self.layer1 = _residual_stage(BasicBlock, 32, 64, blocks=1, stride=2)
        self.layer2 = _residual_stage(BasicBlock, 64, 128, blocks=1, stride=2)
        self.layer3 = _residual_stage(BasicBlock, 128, 128, blocks=1, stride=1 if large_feature_map else 2)
        init_he(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(images))))

    def base_lr_modules(self) -> list[nn.Module]:
        return [self]


class TinyVGG(Backbone):
    """A small VGG-style net for CPU runs: 3×3 convs 32, M, 64, M, 128, 128, M, 128, 128 [, M].

    Stride 8 with ``large_feature_map`` (16×16 at 128×128), else the final max-pool stays (stride 16).
    Theoretical receptive field: 62 px (stride 8) or 70 px (stride 16). 0.54 M parameters, 0.80 GFLOPs
    forward at 128×128 (about twice tiny_resnet: its first conv runs at full resolution).
    """

    out_channels = 128

    def __init__(self, large_feature_map: bool = True, batch_norm: bool = False):
        super().__init__()
        layout: list[int | str] = [32, "M", 64, "M", 128, 128, "M", 128, 128]
        if not large_feature_map:
            layout.append("M")
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in layout:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.extend(_conv_block(in_channels, int(entry), batch_norm))
                in_channels = int(entry)
        self.features = nn.Sequential(*layers)
        init_he(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def base_lr_modules(self) -> list[nn.Module]:
        return [self]


def build_backbone(name: str, large_feature_map: bool = True, batch_norm: bool = False) -> Backbone:
    """Build the backbone ``name`` (one of ``BACKBONES``).

    ``batch_norm`` adds BatchNorm after VGG's convs (VGG16-BN, and ``conv6``), Inception's two extra convs
    and tiny_vgg's convs; the ResNets always use BatchNorm, so it changes nothing there.
    """
    if name == "resnet50":
        return WSOLResNet50(large_feature_map)
    if name == "vgg16":
        return WSOLVGG16(large_feature_map, batch_norm)
    if name == "inception_v3":
        return WSOLInceptionV3(large_feature_map, batch_norm)
    if name == "tiny_resnet":
        return TinyResNet(large_feature_map)
    if name == "tiny_vgg":
        return TinyVGG(large_feature_map, batch_norm)
    raise ConfigError(f"backbone: unknown name {name!r}; choose one of {', '.join(BACKBONES)}")


def checkpoint_arch(backbone: str, batch_norm: bool) -> str:
    """The torchvision checkpoint architecture that fits ``backbone`` (e.g. "vgg16_bn")."""
    if backbone == "vgg16" and batch_norm:
        return "vgg16_bn"
    if backbone in TORCHVISION_WEIGHTS:
        return backbone
    raise ConfigError(f"model.pretrained: no ImageNet checkpoint format for backbone {backbone!r}; "
                     f"ImageNet weights exist for {', '.join(TORCHVISION_WEIGHTS)}")


# ---------------------------------------------------------------------------------------------------------
# ImageNet weights
# ---------------------------------------------------------------------------------------------------------

# Checkpoint keys that the WSOL backbones do not use: classifiers, and Inception's stages after Mixed_6e.
_UNUSED_PREFIXES = {
    "resnet50": ("fc.",),
    "vgg16": ("classifier.",),
    "vgg16_bn": ("classifier.",),
    "inception_v3": ("fc.", "AuxLogits.", "Mixed_7a.", "Mixed_7b.", "Mixed_7c."),
}

_EXPECTED_TYPE = {
    "resnet50": WSOLResNet50,
    "vgg16": WSOLVGG16,
    "vgg16_bn": WSOLVGG16,
    "inception_v3": WSOLInceptionV3,
}


def torchvision_checkpoint(arch: str) -> Path:
    """The local file of torchvision's ImageNet weights for ``arch``, downloaded once into torch hub's cache.

    The file is looked up where torchvision caches it (``<torch hub dir>/checkpoints/<file>``), so weights
    fetched earlier by torchvision itself are reused without network access.
    """
    if arch not in TORCHVISION_WEIGHTS:
        raise ValueError(f"pretrained: unknown checkpoint arch {arch!r}; choose one of {', '.join(TORCHVISION_WEIGHTS)}")
    url = get_weight(TORCHVISION_WEIGHTS[arch]).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(cached.name + ".partial")
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        os.replace(partial, cached)
    return cached


def _rename_vgg_key(key: str, backbone: WSOLVGG16) -> str:
    """``features.<torchvision index>.*`` -> ``features.<our index>.*``; other keys unchanged."""
    if not key.startswith("features."):
        return key
    _, index, rest = key.split(".", 2)
    our_index = backbone.torchvision_index.get(int(index)) if index.isdigit() else None
    return key if our_index is None else f"features.{our_index}.{rest}"


def _mismatch_report(path: Path, arch: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            parts.append(f"{title} keys ({len(keys)}): {shown}")
    return f"{path}: checkpoint does not fit the {arch} WSOL backbone: " + "; ".join(parts)


def load_pretrained(backbone_module: Backbone, path: str | os.PathLike, arch: str) -> None:
    """Load a torchvision-format ImageNet state dict from ``path`` into ``backbone_module`` in place.

    ``arch`` names the checkpoint: "resnet50" (v1), "vgg16", "vgg16_bn" or "inception_v3". Classifier keys
    (``fc.*``, ``classifier.*``, ``AuxLogits.*``) and Inception's ``Mixed_7*`` are dropped, VGG feature
    indices are shifted past the dropped max-pools, and every other key must match a parameter or buffer
    of the same shape (BatchNorm's ``num_batches_tracked`` may be absent, as in older checkpoints); the
    backbone's ``new_layers`` (VGG ``conv6``, Inception ``extra_convs``) keep their initialisation. A
    mismatch raises WeightsMismatchError naming the file and the missing, unexpected and mis-shaped keys
    on one line; the file is read with ``calm_fast.safe_load`` (weights only).
    """
    path = Path(path)
    if arch not in _EXPECTED_TYPE:
        raise ValueError(f"pretrained: unknown checkpoint arch {arch!r}; choose one of {', '.join(_EXPECTED_TYPE)}")
    if not isinstance(backbone_module, _EXPECTED_TYPE[arch]):
        raise WeightsMismatchError(f"pretrained: a {arch} checkpoint does not fit a {type(backbone_module).__name__} "
                                   "backbone")
    if isinstance(backbone_module, WSOLVGG16) and backbone_module.batch_norm != (arch == "vgg16_bn"):
        built = "with" if backbone_module.batch_norm else "without"
        raise WeightsMismatchError(f"pretrained: a {arch} checkpoint does not fit a VGG16 built {built} batch_norm")

    source = read_state_dict(path)
    state = {}
    for key, tensor in source.items():
        if key.startswith(_UNUSED_PREFIXES[arch]):
            continue
        if isinstance(backbone_module, WSOLVGG16):
            key = _rename_vgg_key(key, backbone_module)
        state[key] = tensor

    new_prefixes = tuple(f"{name}." for name in backbone_module.new_layers)
    target = {k: v for k, v in backbone_module.state_dict().items() if not k.startswith(new_prefixes)}
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    misshaped = [
        f"{k} (file {list(state[k].shape)}, model {list(target[k].shape)})"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(_mismatch_report(path, arch, missing, unexpected, misshaped))
    for key in target:
        state.setdefault(key, target[key])  # only num_batches_tracked can be absent here
    not_loaded = backbone_module.load_state_dict(state, strict=False)
    assert not not_loaded.unexpected_keys and all(k.startswith(new_prefixes) for k in not_loaded.missing_keys)
