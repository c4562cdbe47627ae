"""Tests of calm_fast.models: WSOL backbones, the model's heads and LR groups, ImageNet weight loading."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.vgg import cfgs as torchvision_vgg_layouts
from torchvision.models.vgg import make_layers as torchvision_vgg_features

from calm_fast.models import BACKBONES, build_backbone, build_model, load_pretrained

PAPER_BACKBONES = ("resnet50", "vgg16", "inception_v3")
SMALL_BACKBONES = ("tiny_resnet", "tiny_vgg")


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0, ceil: bool = False) -> int:
    """Output length of a conv/pool along one axis (PyTorch's formula, ceil_mode included)."""
    span = size + 2 * padding - kernel
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:  # a last window starting in the right padding is dropped
        out -= 1
    return out


def inception_map_size(size: int, large_feature_map: bool) -> int:
    """The WSOL InceptionV3 chain of CALM.md §2, by hand: convs and ceil-mode pools before Mixed_6a."""
    size = conv_out(size, 3, stride=2, padding=1)  # Conv2d_1a
    size = conv_out(size, 3)  # Conv2d_2a
    size = conv_out(size, 3, padding=1)  # Conv2d_2b
    size = conv_out(size, 3, stride=2, padding=1, ceil=True)
    size = conv_out(size, 3)  # Conv2d_4a (3b is 1×1)
    size = conv_out(size, 3, stride=2, padding=1, ceil=True)
    if not large_feature_map:
        size = conv_out(size, 3, stride=2, padding=0, ceil=True)  # the reference's extra pool: no padding
    return size  # Mixed_5*, Mixed_6a (stride 1, pad 1), Mixed_6b-e and the extra convs keep it


def test_inception_map_size_derivation():
    assert inception_map_size(224, large_feature_map=True) == 28
    assert inception_map_size(224, large_feature_map=False) == 14  # like ResNet50 and VGG16 (CALM.md §2)


EXPECTED_AT_224 = {  # backbone -> (map side with large_feature_map, without, feature channels)
    "resnet50": (28, 14, 2048),
    "vgg16": (28, 14, 1024),
    "inception_v3": (28, 14, 1024),  # checked against the derivation above
}


def test_expected_inception_sides_follow_the_derivation():
    assert EXPECTED_AT_224["inception_v3"][:2] == (inception_map_size(224, True), inception_map_size(224, False))


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("large_feature_map", [True, False])
@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_paper_backbone_map_sizes_at_224(backbone, large_feature_map, batch_norm):
    # Shapes only: the meta device runs the real ops' shape rules without computing anything.
    with torch.device("meta"):
        model = build_model(backbone, 7, "calm-em", large_feature_map=large_feature_map, batch_norm=batch_norm)
        features = model.backbone(torch.empty(2, 3, 224, 224))
        class_logits, location_scores = model(torch.empty(2, 3, 224, 224))
    large_side, small_side, channels = EXPECTED_AT_224[backbone]
    side = large_side if large_feature_map else small_side
    assert features.shape == (2, channels, side, side)
    assert class_logits.shape == (2, 7, side, side)
    assert location_scores.shape == (2, 1, side, side)


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_paper_backbone_forward_backward_on_cpu(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, 5, "calm-ml", batch_norm=backbone == "vgg16")
    class_logits, location_scores = model(torch.randn(1, 3, 96, 96))  # smaller than 224 to save CPU time
    side = inception_map_size(96, True) if backbone == "inception_v3" else 96 // 8
    assert class_logits.shape == (1, 5, side, side) and location_scores.shape == (1, 1, side, side)
    assert torch.isfinite(class_logits).all() and torch.isfinite(location_scores).all()
    (class_logits.square().mean() + location_scores.square().mean()).backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert without_grad == []
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


def test_cam_has_no_location_head():
    model = build_model("tiny_resnet", 3, "cam")
    class_logits, location_scores = model(torch.randn(2, 3, 64, 64))
    assert location_scores is None and model.location_head is None
    assert class_logits.shape == (2, 3, 8, 8)


def test_heads_are_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 300, "calm-em")
    fan_in, fan_out = 128, 300
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    weight = model.class_head.weight
    assert weight.shape == (300, 128, 1, 1)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound  # uniform on [-bound, bound]
    assert abs(weight.std().item() - bound / math.sqrt(3.0)) < 0.02 * bound
    assert torch.all(model.class_head.bias == 0) and torch.all(model.location_head.bias == 0)


# The layers that no ImageNet checkpoint covers, by name in the backbone: conv modules.
NEW_CONVS = {"vgg16": ("conv6.0",), "inception_v3": ("extra_convs.0.0", "extra_convs.1.0")}


def moments(weight: torch.Tensor) -> tuple[float, float, float]:
    """(mean, standard deviation, kurtosis E[(w-m)^4] / var^2) of all entries, in float64."""
    w = weight.detach().double().flatten()
    centred = w - w.mean()
    var = centred.square().mean()
    return w.mean().item(), var.sqrt().item(), (centred.pow(4).mean() / var.square()).item()


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("backbone", list(NEW_CONVS))
def test_new_layers_are_he_initialised_and_heads_xavier(backbone, batch_norm):
    """CALM.md §2: conv6 / extra convs Kaiming-normal with fan-out (std sqrt(2 / (out·kh·kw))), zero bias;
    the 1×1 heads Xavier-uniform (std sqrt(2 / (in + out)), bounded by sqrt(3) std)."""
    torch.manual_seed(0)
    model = build_model(backbone, 200, "calm-em", batch_norm=batch_norm)
    for name in NEW_CONVS[backbone]:
        conv = model.backbone.get_submodule(name)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
        fan_out = conv.out_channels * 9
        mean, std, kurtosis = moments(conv.weight)
        count = conv.weight.numel()  # millions: the sampling error of the std is ~1/sqrt(2·count) relative
        expected = math.sqrt(2.0 / fan_out)
        assert abs(std / expected - 1) < 0.01, (name, std, expected)
        assert abs(mean) < 5 * expected / math.sqrt(count)
        assert abs(kurtosis - 3.0) < 0.05  # normal (uniform would give 1.8)
        assert torch.all(conv.bias == 0)
        if batch_norm:  # the BatchNorm after it starts at (1, 0)
            block = model.backbone.get_submodule(name.rsplit(".", 1)[0])
            assert isinstance(block[1], nn.BatchNorm2d)
            assert torch.all(block[1].weight == 1) and torch.all(block[1].bias == 0)
    for head in (model.class_head, model.location_head):
        fan_in, fan_out = head.in_channels, head.out_channels
        _, std, _ = moments(head.weight)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert head.weight.abs().max() <= bound
        assert abs(std / (bound / math.sqrt(3.0)) - 1) < (0.02 if fan_out > 1 else 0.1)  # 1,024 entries only
        assert torch.all(head.bias == 0)


def test_inception_dropout_sits_where_wsolevaluation_has_it():
    """Dropout 0.5 on the Mixed_6e output, between the extra convs and on the features: the forward in
    training mode equals that chain written out with F.dropout under the same RNG state; off in eval."""
    torch.manual_seed(0)
    trunk = build_backbone("inception_v3", large_feature_map=True)
    images = torch.randn(2, 3, 64, 64)
    trunk.eval()  # BatchNorm with running statistics: only the dropout differs between the two modes
    with torch.no_grad():
        evaluated = trunk(images)
        trunk.dropout.train()
        torch.manual_seed(7)
        trained = trunk(images)
        x = trunk.Conv2d_2b_3x3(trunk.Conv2d_2a_3x3(trunk.Conv2d_1a_3x3(images)))
        x = trunk.Conv2d_4a_3x3(trunk.Conv2d_3b_1x1(trunk.pool1(x)))
        x = trunk.Mixed_6a(trunk.Mixed_5d(trunk.Mixed_5c(trunk.Mixed_5b(trunk.pool2(x)))))
        mixed_6e = trunk.Mixed_6e(trunk.Mixed_6d(trunk.Mixed_6c(trunk.Mixed_6b(x))))
        torch.manual_seed(7)
        drop = lambda t: nn.functional.dropout(t, 0.5, training=True)  # noqa: E731
        expected = drop(trunk.extra_convs[1](drop(trunk.extra_convs[0](drop(mixed_6e)))))
        expected_eval = trunk.extra_convs[1](trunk.extra_convs[0](mixed_6e))
    torch.testing.assert_close(trained, expected)
    torch.testing.assert_close(evaluated, expected_eval)
    assert not torch.equal(trained, evaluated)


@pytest.mark.parametrize("num_classes", [5, 7, 10])  # 2, 0 and 5 padding channels
def test_merged_head_conv_equals_the_two_convs(num_classes):
    """The one conv of both heads gives the class and location convs' values and, for any upstream
    gradient, their parameters' and the features' gradients; the padding channels are zero; state-dict
    keys are those of the two nn.Conv2d heads, and a state dict saved before the merge loads as it is."""
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes, "calm-em").double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    features = model.backbone(images).detach().requires_grad_()
    maps = model.head_maps(features)
    channels = maps.shape[1]
    assert channels % 8 == 0 and channels - 8 < num_classes + 1 <= channels
    upstream = torch.randn_like(maps)
    heads = [model.class_head.weight, model.class_head.bias, model.location_head.weight, model.location_head.bias]
    merged_grads = torch.autograd.grad(maps, [*heads, features], upstream)

    class_logits, location_scores = model.class_head(features), model.location_head(features)
    torch.testing.assert_close(maps[:, :num_classes], class_logits)
    torch.testing.assert_close(maps[:, num_classes:num_classes + 1], location_scores)
    assert (maps[:, num_classes + 1:] == 0).all()
    separate_grads = torch.autograd.grad((class_logits, location_scores), [*heads, features],
                                         (upstream[:, :num_classes], upstream[:, num_classes:num_classes + 1]))
    for merged, separate in zip(merged_grads, separate_grads):
        torch.testing.assert_close(merged, separate)

    class_view, location_view = model(images)  # the default forward: the two maps as views of the merged one
    torch.testing.assert_close(class_view, model.class_head(model.backbone(images)))
    torch.testing.assert_close(location_view, model.location_head(model.backbone(images)))
    assert torch.equal(model(images, merged=True)[:, :num_classes], class_view)

    keys = set(model.state_dict())
    assert {"class_head.weight", "class_head.bias", "location_head.weight", "location_head.bias"} <= keys
    assert not any("padding" in key for key in keys)
    assert all(key.startswith(("backbone.", "class_head.", "location_head.")) for key in keys)
    fresh = build_model("tiny_resnet", num_classes, "calm-em").double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh.head_maps(features), maps)


def test_cam_merged_output_is_the_class_logits():
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 3, "cam")
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images, merged=True), model(images)[0])


# --------------------------------------------------------------------------------------------------------
# Small backbones
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("large_feature_map, side", [(True, 16), (False, 8)])
@pytest.mark.parametrize("backbone", SMALL_BACKBONES)
def test_small_backbone_map_size_at_128(backbone, large_feature_map, side):
    model = build_model(backbone, 4, "calm-em", large_feature_map=large_feature_map)
    class_logits, location_scores = model(torch.randn(1, 3, 128, 128))
    assert class_logits.shape == (1, 4, side, side) and location_scores.shape == (1, 1, side, side)


# Receptive fields by the recursion r += (k - 1) * j, j *= s over the conv/pool chain:
# tiny_resnet  stem 3/2 -> 3; block 3/2, 3 -> 7, 15; block 3/2, 3 -> 23, 39; block 3/1, 3 -> 55, 71
#              (3/2, 3 -> 55, 87 without the large map)
# tiny_vgg     3 -> 3; M -> 4; 3 -> 8; M -> 10; 3, 3 -> 18, 26; M -> 30; 3, 3 -> 46, 62 (final M -> 70)
RECEPTIVE_FIELDS = {("tiny_resnet", True): 71, ("tiny_resnet", False): 87, ("tiny_vgg", True): 62, ("tiny_vgg", False): 70}


@pytest.mark.parametrize("backbone, large_feature_map", list(RECEPTIVE_FIELDS))
def test_small_backbone_receptive_field(backbone, large_feature_map):
    """Measure the receptive field as the extent of input pixels that reach one output cell's gradient."""
    trunk = build_backbone(backbone, large_feature_map).eval()
    with torch.no_grad():
        for module in trunk.modules():  # positive weights: no ReLU or cancellation can hide a path
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
    for name, module in list(trunk.named_modules()):  # max-pool routes gradient to one pixel; same window
        if isinstance(module, nn.MaxPool2d):
            parent = trunk.get_submodule(name.rsplit(".", 1)[0]) if "." in name else trunk
            setattr(parent, name.rsplit(".", 1)[-1], nn.AvgPool2d(module.kernel_size, module.stride))
    images = torch.ones(1, 3, 256, 256, requires_grad=True)
    features = trunk(images)
    centre = features.shape[-1] // 2
    features[0, :, centre, centre].sum().backward()
    rows = images.grad[0].abs().sum(dim=(0, 2)).nonzero()
    columns = images.grad[0].abs().sum(dim=(0, 1)).nonzero()
    assert rows.min() > 0 and rows.max() < 255  # the field lies inside the image, unclipped
    assert rows.max() - rows.min() + 1 == RECEPTIVE_FIELDS[(backbone, large_feature_map)]
    assert columns.max() - columns.min() + 1 == RECEPTIVE_FIELDS[(backbone, large_feature_map)]


def nll_of_marginal(class_logits: torch.Tensor, location_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CALM-ML with a spatial-softmax prior, written out here as an independent reference."""
    log_class_given_cell = class_logits.flatten(2).log_softmax(dim=1)  # [B, K, N]
    log_prior = location_scores.flatten(2).log_softmax(dim=2)  # [B, 1, N]
    log_marginal = torch.logsumexp(log_class_given_cell + log_prior, dim=2)  # [B, K]
    return nn.functional.nll_loss(log_marginal, labels)


@pytest.mark.parametrize("backbone", SMALL_BACKBONES)
def test_small_backbone_trains(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, 4, "calm-ml", batch_norm=True)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nll_of_marginal(*model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_small_backbone_runs_under_bf16_autocast():
    model = build_model("tiny_resnet", 4, "calm-em").to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        class_logits, location_scores = model(images)
    assert class_logits.dtype == torch.bfloat16 and torch.isfinite(class_logits.float()).all()
    assert location_scores.shape == (2, 1, 8, 8)


# --------------------------------------------------------------------------------------------------------
# Parameter groups and counts
# --------------------------------------------------------------------------------------------------------

BASE_LR_PREFIXES = {  # CALM.md §3, by parameter name, as an independent expectation
    "resnet50": ("conv1.", "bn1.", "layer1.", "layer2.", "layer3."),
    "vgg16": ("features.",),
    "inception_v3": ("Conv2d_1", "Conv2d_2", "Conv2d_3", "Conv2d_4", "Mixed_"),
    "tiny_resnet": ("",),
    "tiny_vgg": ("",),
}


@pytest.mark.parametrize("method", ["calm-em", "cam"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_parameter_groups(backbone, method):
    with torch.device("meta"):
        model = build_model(backbone, 10, method, batch_norm=True)
    base, boosted = model.parameter_groups()
    base_ids, boosted_ids = {id(p) for p in base}, {id(p) for p in boosted}
    assert len(base_ids) == len(base) and len(boosted_ids) == len(boosted)
    assert not base_ids & boosted_ids
    assert base_ids | boosted_ids == {id(p) for p in model.parameters()}
    expected_base = {
        id(p) for n, p in model.backbone.named_parameters() if n.startswith(BASE_LR_PREFIXES[backbone])
    }
    assert base_ids == expected_base
    heads = [model.class_head] + ([model.location_head] if method != "cam" else [])
    assert all(id(p) in boosted_ids for head in heads for p in head.parameters())
    if backbone in PAPER_BACKBONES:  # the new layers (layer4, conv6, extra convs) and heads train at ×10
        assert len(boosted) > 2 * len(heads)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet50_parameter_count():
    """Strides move, parameters do not: the trunk is torchvision's ResNet50 without fc."""
    with torch.device("meta"):
        reference = torchvision.models.resnet50(weights=None)
        calm_cub = build_model("resnet50", 200, "calm-em")
        calm_imagenet = build_model("resnet50", 1000, "calm-em", large_feature_map=False)
        cam_cub = build_model("resnet50", 200, "cam")
    trunk = count(reference) - count(reference.fc)
    assert count(calm_cub.backbone) == trunk == count(calm_imagenet.backbone)
    heads = lambda k, calm: 2048 * k + k + (2048 + 1 if calm else 0)  # noqa: E731 - 1×1 convs with bias
    assert count(calm_cub) == trunk + heads(200, True)
    assert count(calm_imagenet) == trunk + heads(1000, True)
    assert count(cam_cub) == trunk + heads(200, False)
    # CALM.md's "~23.9 M parameters" is the CUB model (200 classes), not the 1000-class one (~25.6 M).
    assert round(count(calm_cub) / 1e6, 1) == 23.9


def test_resnet50_flops_match_the_spec():
    """CALM.md §2: ~38.8 GFLOPs forward at 28×28 (counted here for the CUB model, 2 FLOPs per MAC)."""
    with torch.device("meta"):
        model = build_model("resnet50", 200, "calm-em")
        images = torch.empty(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    assert round(counter.get_total_flops() / 1e9, 1) == 38.8


def test_vgg16_and_inception_parameter_counts():
    with torch.device("meta"):
        vgg = build_model("vgg16", 200, "cam", batch_norm=True)
        vgg_features = torchvision_vgg_features(torchvision_vgg_layouts["D"], batch_norm=True)
        inception = build_model("inception_v3", 200, "cam")
        reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    conv6 = 512 * 1024 * 9 + 1024 + 2 * 1024  # conv with bias + BatchNorm
    assert count(vgg.backbone) == count(vgg_features) + conv6
    unused = sum(count(getattr(reference, n)) for n in ("fc", "AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c"))
    extra = 768 * 1024 * 9 + 1024 + 1024 * 1024 * 9 + 1024  # two 3×3 convs with bias, no BatchNorm
    assert count(inception.backbone) == count(reference) - unused + extra


# --------------------------------------------------------------------------------------------------------
# ImageNet weights
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    reference = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # BN statistics away from their defaults, so a buffer that fails to load shows
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.eval()


def test_resnet50_loads_torchvision_weights(resnet50_checkpoint):
    path, reference = resnet50_checkpoint
    model = build_model("resnet50", 200, "calm-em", large_feature_map=False, pretrained=path).eval()
    source = reference.state_dict()
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, source[key]), key
    images = torch.randn(2, 3, 64, 64)
    trunk, ours = reference, model.backbone
    with torch.no_grad():  # the unchanged part (stem, layer1-2) computes exactly what torchvision computes
        expected = trunk.layer2(trunk.layer1(trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))))
        got = ours.layer2(ours.layer1(ours.maxpool(ours.relu(ours.bn1(ours.conv1(images))))))
    torch.testing.assert_close(got, expected)


def test_checkpoint_without_num_batches_tracked_loads(resnet50_checkpoint, tmp_path):
    path, reference = resnet50_checkpoint
    older = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(older, tmp_path / "older.pth")
    trunk = build_backbone("resnet50")
    load_pretrained(trunk, tmp_path / "older.pth", "resnet50")
    torch.testing.assert_close(trunk.layer3[5].bn3.running_var, reference.layer3[5].bn3.running_var)


def test_pretrained_torchvision_uses_the_hub_cache(resnet50_checkpoint, tmp_path, monkeypatch):
    path, reference = resnet50_checkpoint
    url = torchvision.models.get_weight("ResNet50_Weights.IMAGENET1K_V1").url
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / url.rsplit("/", 1)[-1]).write_bytes(path.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = build_model("resnet50", 10, "cam", pretrained="torchvision")
    assert torch.equal(model.backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)


def vgg16_checkpoint(path, batch_norm: bool) -> nn.Sequential:
    """Write a torchvision-format VGG16 state dict whose features come from torchvision's own builder.

    The classifier tensors are small stand-ins under the real key names (the loader drops them unread).
    """
    torch.manual_seed(2)
    features = torchvision_vgg_features(torchvision_vgg_layouts["D"], batch_norm=batch_norm)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    for index in (0, 3, 6):
        state[f"classifier.{index}.weight"] = torch.zeros(4, 4)
        state[f"classifier.{index}.bias"] = torch.zeros(4)
    torch.save(state, path)
    return features.eval()


# torchvision features index -> ours, by hand. Plain: conv, relu (2 per conv); pools at 4, 9, 16, 23, 30.
# BN: conv, bn, relu (3 per conv); pools at 6, 13, 23, 33, 43. Indices after a dropped pool move down by one.
VGG_RENUMBERING = {
    (False, True): {0: 0, 21: 21, 24: 23, 26: 25, 28: 27},
    (False, False): {0: 0, 24: 24, 28: 28},
    (True, True): {0: 0, 31: 31, 34: 33, 35: 34, 41: 40},
    (True, False): {34: 34, 41: 41},
}


@pytest.mark.parametrize("batch_norm, large_feature_map", list(VGG_RENUMBERING))
def test_vgg16_loads_and_renumbers_torchvision_weights(tmp_path, batch_norm, large_feature_map):
    source = vgg16_checkpoint(tmp_path / "vgg16.pth", batch_norm)
    model = build_model("vgg16", 3, "calm-em", large_feature_map=large_feature_map, batch_norm=batch_norm,
                        pretrained=tmp_path / "vgg16.pth").eval()
    for torchvision_index, our_index in VGG_RENUMBERING[(batch_norm, large_feature_map)].items():
        assert torch.equal(model.backbone.features[our_index].weight, source[torchvision_index].weight)
    # The same computation as torchvision's features without the dropped pools.
    pools = [i for i, m in enumerate(source) if isinstance(m, nn.MaxPool2d)]
    dropped = set(pools[3:] if large_feature_map else pools[4:])
    expected_net = nn.Sequential(*[m for i, m in enumerate(source) if i not in dropped])
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.features(images), expected_net(images))


def test_vgg16_checkpoint_kind_must_match_batch_norm(tmp_path):
    vgg16_checkpoint(tmp_path / "vgg16_bn.pth", batch_norm=True)
    with pytest.raises(ValueError, match="vgg16_bn.*batch_norm"):
        load_pretrained(build_backbone("vgg16", batch_norm=False), tmp_path / "vgg16_bn.pth", "vgg16_bn")
    vgg16_checkpoint(tmp_path / "vgg16.pth", batch_norm=True)  # a BN file under the plain name
    with pytest.raises(ValueError, match="(?s)vgg16.pth.*unexpected keys.*features.1.weight"):
        load_pretrained(build_backbone("vgg16", batch_norm=False), tmp_path / "vgg16.pth", "vgg16")


def test_inception_v3_loads_torchvision_weights(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    model = build_model("inception_v3", 3, "calm-em", batch_norm=True, pretrained=tmp_path / "inception.pth")
    source = reference.state_dict()
    ours = model.backbone.state_dict()
    loaded = [k for k in ours if not k.startswith("extra_convs.")]
    assert len(loaded) == len([k for k in source if not k.startswith(("fc.", "AuxLogits.", "Mixed_7"))])
    for key in loaded:
        assert torch.equal(ours[key], source[key]), key
    # Mixed_6a is re-strided, not re-shaped: the grid-reduction weights are reused as they are.
    assert torch.equal(model.backbone.Mixed_6a.branch3x3.conv.weight, reference.Mixed_6a.branch3x3.conv.weight)


def test_mismatched_checkpoint_names_file_and_keys(resnet50_checkpoint, tmp_path):
    _, reference = resnet50_checkpoint
    state = reference.state_dict()
    del state["layer2.1.conv2.weight"]
    state["layer3.0.conv1.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "broken_resnet.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError) as raised:
        load_pretrained(build_backbone("resnet50"), bad, "resnet50")
    message = str(raised.value)
    assert "broken_resnet.pth" in message
    assert "missing keys (1): layer2.1.conv2.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "layer3.0.conv1.weight (file [3, 3], model [256, 512, 1, 1])" in message


def test_pretrained_input_errors(resnet50_checkpoint, tmp_path):
    path, _ = resnet50_checkpoint
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("resnet50", 3, "cam", pretrained=tmp_path / "nowhere.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained(build_backbone("resnet50"), tmp_path / "garbage.pth", "resnet50")
    with pytest.raises(ValueError, match="resnet50 checkpoint does not fit"):
        load_pretrained(build_backbone("tiny_resnet"), path, "resnet50")
    with pytest.raises(ValueError, match="tiny_resnet"):
        build_model("tiny_resnet", 3, "cam", pretrained=path)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(backbone="resnet18", num_classes=3, method="cam"), "backbone"),
        (dict(backbone="tiny_resnet", num_classes=3, method="calm"), "method"),
        (dict(backbone="tiny_resnet", num_classes=0, method="cam"), "num_classes"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        build_model(**kwargs)
