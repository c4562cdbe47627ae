"""Gradient baselines against hand-computed gradients, a plain one-input-at-a-time loop, and fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calm_fast.evaluate.attribution.controls import blurred_maps, control_maps, gaussian_blur, random_maps
from calm_fast.evaluate.attribution.gradients import (
    GRADIENT_METHODS,
    GradientSettings,
    class_gradient_maps,
    gradient_maps,
    integrated_gradients,
    samples_per_image,
    smoothgrad_noise,
)
from calm_fast.evaluate.attribution.model_fns import model_score
from calm_fast.evaluate.baselines import centre_gaussian_map
from calm_fast.models import build_model

SIDE = 6


class LinearScores(nn.Module):
    """s_k(x) = <W_k, x> + b_k: ∂s_k/∂x = W_k everywhere."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weights.flatten(1))  # [K, 3·H·W]
        self.bias = nn.Parameter(torch.arange(len(weights), dtype=torch.float32))

    def forward(self, images):
        return F.linear(images.flatten(1), self.weight, self.bias)


class QuadraticScores(nn.Module):
    """s_k(x) = ½ Σ a_k ⊙ x²: ∂s_k/∂x = a_k ⊙ x, and s_k(0) = 0."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a

    def forward(self, images):
        return 0.5 * (self.a[None] * images[:, None] ** 2).flatten(2).sum(dim=2)


class SmoothNet(nn.Module):
    """A small smooth CNN (tanh, softplus) with a GAP head, for completeness and loop comparisons."""

    def __init__(self, classes: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, classes, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, images):
        return F.softplus(self.head(torch.tanh(self.conv(images)))).mean(dim=(2, 3))


def label_score(model):
    return lambda images, labels: model(images).gather(1, labels[:, None]).squeeze(1)


def _images(count=2, side=SIDE, seed=0):
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_samples_per_image_follow_the_reference_defaults():
    assert samples_per_image(["vanilla"]) == 1
    assert samples_per_image(["ig-reference"]) == 51  # α = 0, 1/50, …, 1
    assert samples_per_image(["ig-reference", "vanilla", "integrated-gradients"]) == 51  # shared path
    assert samples_per_image(["integrated-gradients"], GradientSettings(ig_rule="riemann")) == 50
    assert samples_per_image(["smoothgrad", "vargrad", "smoothgrad-squared"]) == 50  # shared samples
    assert samples_per_image(GRADIENT_METHODS) == 101
    with pytest.raises(ValueError, match="gradient method"):
        samples_per_image(["gradcam"])
    with pytest.raises(ValueError, match="ig_rule"):
        GradientSettings(ig_rule="simpson")


def test_linear_model_maps_equal_the_analytic_gradient():
    weights = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    model = LinearScores(weights)
    images, labels = _images(), torch.tensor([2, 0])
    maps = gradient_maps(label_score(model), images, labels, [0, 1], GRADIENT_METHODS,
                         GradientSettings(smooth_samples=7, max_batch=16))
    expected = weights[labels].abs().amax(dim=1)  # max over RGB of |W_y|
    for method in ("vanilla", "ig-reference", "smoothgrad"):  # the gradient is the same at every input
        torch.testing.assert_close(maps[method], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(maps["smoothgrad-squared"], expected**2, rtol=1e-6, atol=0)
    torch.testing.assert_close(maps["vargrad"], torch.zeros_like(expected), rtol=0, atol=1e-12)
    # True IG with a zero baseline: x ⊙ W_y (the trapezoid weights sum to one).
    torch.testing.assert_close(maps["integrated-gradients"], (images * weights[labels]).abs().amax(dim=1),
                               rtol=1e-6, atol=0)


def test_reference_ig_and_true_ig_of_a_quadratic_by_hand():
    a = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3)) + 0.1
    score = label_score(QuadraticScores(a))
    images, labels = _images(), torch.tensor([1, 0])
    ay_x = a[labels] * images
    maps = gradient_maps(score, images, labels, [0, 1], ["ig-reference", "vanilla"], GradientSettings(max_batch=13))
    # The reference's IG: mean over α_j = j/50 (j = 0..50) of max_c |α_j a x| = mean(α) · max_c |a x| = 0.5 ·.
    torch.testing.assert_close(maps["ig-reference"], 0.5 * ay_x.abs().amax(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(maps["vanilla"], ay_x.abs().amax(dim=1), rtol=1e-6, atol=0)
    # True IG: ∫ α a x dα · x = ½ a x² = s(x) − s(0) exactly for the trapezoid rule (a linear integrand);
    # the right Riemann sum over 10 steps gives Σ_j (j/10)/10 = 0.55 instead of 0.5.
    trapezoid = integrated_gradients(score, images, labels, GradientSettings(ig_steps=10))
    torch.testing.assert_close(trapezoid, 0.5 * a[labels] * images**2, rtol=1e-5, atol=1e-7)
    riemann = integrated_gradients(score, images, labels, GradientSettings(ig_steps=10, ig_rule="riemann"))
    torch.testing.assert_close(riemann, 0.55 * a[labels] * images**2, rtol=1e-5, atol=1e-7)


def test_true_ig_satisfies_completeness_on_a_smooth_model():
    model = SmoothNet()
    score = label_score(model)
    images, labels = _images(3, 8, seed=4), torch.tensor([0, 1, 2])
    attribution = integrated_gradients(score, images, labels, GradientSettings(max_batch=40))
    with torch.no_grad():
        gap = score(images, labels) - score(torch.zeros_like(images), labels)
    # 50 trapezoid steps on a smooth path: the quadrature error is O(1/50²) of the curvature.
    torch.testing.assert_close(attribution.sum(dim=(1, 2, 3)), gap, rtol=1e-3, atol=1e-5)
    coarse = integrated_gradients(score, images, labels, GradientSettings(ig_steps=2))
    assert (coarse.sum(dim=(1, 2, 3)) - gap).abs().max() > (attribution.sum(dim=(1, 2, 3)) - gap).abs().max()


def _loop_reference(score, image, label, index, settings: GradientSettings) -> dict[str, torch.Tensor]:
    """One image, one input at a time, straight from the definitions (fp64 statistics)."""

    def base_map(x):
        x = x.detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(score(x[None], label[None])[0], x)
        return gradient.abs().amax(dim=0).double()

    steps, samples = settings.ig_steps, settings.smooth_samples
    path = torch.stack([base_map(j / steps * image) for j in range(steps + 1)])
    sigma = settings.noise_fraction * (image.max() - image.min())
    noise = smoothgrad_noise(settings.seed, index, samples, image.shape)
    noisy = torch.stack([base_map(image + sigma * noise[s]) for s in range(samples)])
    return {"vanilla": base_map(image), "ig-reference": path.mean(dim=0), "smoothgrad": noisy.mean(dim=0),
            "vargrad": noisy.var(dim=0, unbiased=False), "smoothgrad-squared": (noisy**2).mean(dim=0)}


@pytest.mark.parametrize("max_batch", [1, 7, 1000])
def test_batched_maps_equal_a_plain_loop(max_batch):
    model = SmoothNet()
    score = label_score(model)
    images, labels, indices = _images(3, 8, seed=5), torch.tensor([2, 0, 1]), [11, 3, 42]
    settings = GradientSettings(ig_steps=6, smooth_samples=9, seed=13, max_batch=max_batch)
    methods = ("vanilla", "ig-reference", "smoothgrad", "vargrad", "smoothgrad-squared")
    maps = gradient_maps(score, images, labels, indices, methods, settings)
    for i in range(3):
        expected = _loop_reference(score, images[i], labels[i], indices[i], settings)
        for method in methods:
            # The batched forward may sum in another order than one input at a time: last-bit differences.
            torch.testing.assert_close(maps[method][i].double(), expected[method], rtol=2e-5, atol=1e-9,
                                       msg=f"{method} image {i}")


@pytest.mark.parametrize("max_batch", [5, 1000])
def test_maps_of_chosen_classes_equal_one_label_at_a_time(max_batch):
    """Targets (image, class) of any classes in one run: each map is gradient_maps' with that class as the
    label (the classes of an image share its noise), and only the chosen targets are run through the model."""
    model = SmoothNet(classes=4)
    inputs_seen = []

    def score(images, labels):
        inputs_seen.append(len(images))
        return label_score(model)(images, labels)

    images, indices = _images(3, 8, seed=7), [5, 0, 9]
    classes = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    settings = GradientSettings(ig_steps=3, smooth_samples=4, seed=2, max_batch=max_batch)
    methods = ("vanilla", "ig-reference", "integrated-gradients", "smoothgrad", "vargrad")
    target_image, target_class, maps = class_gradient_maps(score, images, classes, indices, methods, settings)
    assert target_image.tolist() == [0, 0, 0, 1, 2, 2, 2] and target_class.tolist() == [0, 2, 3, 1, 0, 1, 3]
    assert sum(inputs_seen) == 7 * samples_per_image(methods, settings)
    for c in range(4):
        alone = gradient_maps(label_score(model), images, torch.full((3,), c), indices, methods,
                              GradientSettings(ig_steps=3, smooth_samples=4, seed=2, max_batch=1000))
        for t in (target_class == c).nonzero().flatten().tolist():
            for method in methods:
                torch.testing.assert_close(maps[method][t], alone[method][int(target_image[t])], rtol=1e-5,
                                           atol=1e-8, msg=f"{method} target {t}")
    with pytest.raises(ValueError, match="bool"):
        class_gradient_maps(score, images, classes[:2], indices, methods, settings)


def test_smoothgrad_noise_is_keyed_on_seed_and_image_index():
    model = SmoothNet()
    score = label_score(model)
    images, labels = _images(3, 8, seed=6), torch.tensor([0, 1, 2])
    settings = GradientSettings(smooth_samples=5, max_batch=4)
    methods = ("smoothgrad", "vargrad")
    together = gradient_maps(score, images, labels, [7, 8, 9], methods, settings)
    alone = gradient_maps(score, images[2:], labels[2:], [9], methods, settings)
    for method in methods:
        # Same noise; the convolutions of a batch of 3 and of 1 may differ in the last bits (rtol 1e-5),
        # whereas other noise would change the map by tens of percent (the reseeded check below).
        torch.testing.assert_close(alone[method][0], together[method][2], rtol=1e-5, atol=0)
    noise = smoothgrad_noise(0, 9, 5, (3, 8, 8))
    assert torch.equal(noise, smoothgrad_noise(0, 9, 5, (3, 8, 8)))
    assert not torch.equal(noise, smoothgrad_noise(1, 9, 5, (3, 8, 8)))
    assert not torch.equal(noise, smoothgrad_noise(0, 8, 5, (3, 8, 8)))
    reseeded = gradient_maps(score, images, labels, [7, 8, 9], methods, GradientSettings(smooth_samples=5, seed=1))
    assert not torch.allclose(reseeded["smoothgrad"], together["smoothgrad"])


@pytest.mark.parametrize("method", ["cam", "calm-em"])
@pytest.mark.parametrize("dtype, max_error, min_correlation", [(torch.bfloat16, 0.15, 0.97),
                                                               (torch.float16, 0.04, 0.995)])
def test_half_precision_autocast_maps_agree_with_fp32(method, dtype, max_error, min_correlation):
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 4, method).eval()
    score = model_score(model, method)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    methods = ("vanilla", "smoothgrad")
    fp32 = gradient_maps(score, images, labels, [0, 1], methods, GradientSettings(smooth_samples=4))
    half = gradient_maps(score, images, labels, [0, 1], methods,
                         GradientSettings(smooth_samples=4, autocast_dtype=dtype))
    for name in methods:
        assert half[name].dtype == torch.float32 and torch.isfinite(half[name]).all()
        # Loose on purpose. bf16 keeps 8 significant bits (rounding up to 2^-9 ≈ 0.2 % per value), fp16 11
        # (0.05 %); an input gradient is a long sum of signed terms through ~10 layers forward and back,
        # whose cancellations amplify that rounding (a random-init net has no dominant path: the worst
        # case). Measured on this seed: bf16 ≤ 8 % mean relative difference, correlation ≥ 0.987; fp16
        # ≤ 1.3 %, ≥ 0.999. The maps must agree on average and rank pixels alike.
        error = (half[name] - fp32[name]).abs().mean() / fp32[name].abs().mean()
        assert error < max_error, f"{name}: mean relative difference {error:.3f}"
        correlation = torch.corrcoef(torch.stack([half[name].flatten(), fp32[name].flatten()]))[0, 1]
        assert correlation > min_correlation, f"{name}: correlation {correlation:.4f}"


def test_fp16_scaled_backward_falls_back_when_it_overflows():
    # Weights of 60 are exact in fp16; scaled by 2^12 the input gradient (2.5e5) overflows fp16's 65504,
    # so the chunk must be redone unscaled and still give exactly |W| = 60.
    weights = torch.full((2, 3, SIDE, SIDE), 60.0)
    maps = gradient_maps(label_score(LinearScores(weights)), _images(), torch.tensor([0, 1]), [0, 1], ["vanilla"],
                         GradientSettings(autocast_dtype=torch.float16))
    torch.testing.assert_close(maps["vanilla"], torch.full((2, SIDE, SIDE), 60.0), rtol=0, atol=0)


def test_calm_score_is_the_log_marginal_and_cam_score_the_gap_logit():
    torch.manual_seed(1)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for method in ("cam", "calm-ml"):
        model = build_model("tiny_resnet", 3, method).eval()
        with torch.no_grad():
            class_logits, location_scores = model(images)
            if method == "cam":
                expected = class_logits.mean(dim=(2, 3))[torch.arange(2), labels]
            else:  # log Σ_z p(y|z) p(z), straight from the definitions in probability space
                prior = torch.relu(location_scores.flatten(1))
                prior = prior / prior.sum(dim=1, keepdim=True)
                per_cell = torch.softmax(class_logits.flatten(2), dim=1)
                expected = torch.log((per_cell * prior[:, None]).sum(dim=2))[torch.arange(2), labels]
            torch.testing.assert_close(model_score(model, method)(images, labels), expected, rtol=1e-5, atol=1e-6)


def test_controls():
    size = (8, 10)
    gaussian = control_maps(["centre-gaussian"], [0, 1], size)["centre-gaussian"]
    assert gaussian.shape == (2, 8, 10)
    assert torch.equal(gaussian[1], torch.from_numpy(centre_gaussian_map(8, 10)))
    noise = random_maps([3, 4], size, seed=2)
    assert torch.equal(random_maps([4], size, seed=2)[0], noise[1])  # keyed on the image, not the batch
    assert not torch.equal(noise[0], noise[1]) and 0 <= noise.min() and noise.max() < 1
    # A blurred point keeps its mass and spreads as the sampled Gaussian of the stated σ (in pixels),
    # cut at radius ceil(3σ) = 6.
    point = torch.zeros(1, 41, 41)
    point[0, 20, 20] = 1.0
    blurred = gaussian_blur(point, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert blurred[0, 20, 26] > 0 and blurred[0, 20, 27] == 0 and blurred[0, 13, 20] == 0
    taps = [math.exp(-k * k / 8) for k in range(-6, 7)]
    expected_variance = sum(k * k * t for k, t in zip(range(-6, 7), taps)) / sum(taps)
    ys = torch.arange(41, dtype=torch.float32) - 20
    variance = (blurred[0].sum(dim=1) * ys**2).sum()
    assert variance.item() == pytest.approx(expected_variance, rel=1e-5)
    # blurred-cam: σ = 0.1 × the mean side; a constant map stays constant (replicated edges).
    flat = blurred_maps(torch.full((2, 3, 3), 5.0), (20, 20))
    torch.testing.assert_close(flat, torch.full((2, 20, 20), 5.0))
    with pytest.raises(ValueError, match="cam_maps"):
        control_maps(["blurred-cam"], [0], size)
