"""Gradient attribution baselines (CALM.md §4), batched on the device: every step or noise sample of several
images goes through the model in one forward and one backward, in chunks of `max_batch` inputs.

The base map of an input x' is m(x') = max over RGB of |∂s_y/∂x'|, with s_y the score of the label
(`model_fns.model_score`: GAP(S_y) before the softmax for CAM, log p(y|x) for CALM). Methods:
- "vanilla": m(x).
- "ig-reference": the reference's "IG", the published row: the mean of m(α_j·x) over the `ig_steps` + 1
  points α_j = j / ig_steps, j = 0 … ig_steps (51 by default; zero baseline), with no (x − x') product.
- "integrated-gradients": true IG, (x − 0) ⊙ the path average of ∇s_y, by the trapezoid rule over the
  same points (default) or the right Riemann sum (j = 1 … ig_steps); the map is max over RGB of |·| like
  the others (`integrated_gradients` returns the signed attribution, which satisfies completeness:
  its sum ≈ s_y(x) − s_y(0)).
- "smoothgrad": the mean of m(x + ε_s) over `smooth_samples` samples (50), ε ~ N(0, σ²),
  σ = noise_fraction (1/4) × (max − min) of the normalised image; "vargrad": E[m²] − E[m]² over the same
  samples; "smoothgrad-squared": E[m²] (in the reference code, not in the paper's table).
Methods that need the same inputs share them: the path points serve "ig-reference", "integrated-gradients"
and "vanilla" (α = 1 is x itself), one set of noisy samples serves the three SmoothGrad variants.

`gradient_maps` takes the map of each image's label. `class_gradient_maps` takes the maps of any (image,
class) targets, e.g. an image's own class and its cue-localization partners: every target's inputs are
rows of the same batches (image × class × sample in one forward and one backward), and the classes of one
image share its noise samples, so its own-class map is the one `gradient_maps` gives.

Noise is drawn per image from a generator keyed on (seed, image index) (`keyed_random`), so a map does not
depend on the batch it came in or the rank that computed it (up to the last bits of the model's own
floating-point arithmetic at another batch size). Precision: the inputs, their gradients and every
accumulator are fp32 or fp64 whatever `autocast_dtype` the model body runs in; under fp16 the score is
scaled by 2^12 before the backward pass (small input gradients would underflow fp16's range otherwise)
and the chunk is redone unscaled if that overflows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from calm_fast.evaluate.attribution.keyed_random import SMOOTHGRAD_NOISE, key64, keyed_generator
from calm_fast.evaluate.attribution.model_fns import ScoreFn, autocast_context

GRADIENT_METHODS = ("vanilla", "ig-reference", "integrated-gradients", "smoothgrad", "vargrad",
                    "smoothgrad-squared")
IG_RULES = ("trapezoid", "riemann")
_NOISE_METHODS = ("smoothgrad", "vargrad", "smoothgrad-squared")
FP16_SCORE_SCALE = 2.0**12


@dataclass(frozen=True)
class GradientSettings:
    """ig_steps: intervals of the α path (points α = j / ig_steps); ig_rule: true IG's quadrature;
    smooth_samples and noise_fraction: SmoothGrad's samples and σ / (max − min); seed: keys the noise;
    max_batch: model inputs per forward/backward; autocast_dtype: bf16/fp16 for the model body, or None."""

    ig_steps: int = 50
    ig_rule: str = "trapezoid"
    smooth_samples: int = 50
    noise_fraction: float = 0.25
    seed: int = 0
    max_batch: int = 64
    autocast_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.ig_steps < 1 or self.smooth_samples < 1 or self.max_batch < 1:
            raise ValueError(f"ig_steps, smooth_samples and max_batch must be >= 1, got {self.ig_steps}, "
                             f"{self.smooth_samples}, {self.max_batch}")
        if self.ig_rule not in IG_RULES:
            raise ValueError(f"ig_rule={self.ig_rule!r}: expected one of {', '.join(IG_RULES)}")
        if not self.noise_fraction >= 0:
            raise ValueError(f"noise_fraction must be >= 0, got {self.noise_fraction}")


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    methods = tuple(methods)
    if not methods:
        raise ValueError("no gradient method asked for")
    for method in methods:
        if method not in GRADIENT_METHODS:
            raise ValueError(f"gradient method {method!r}: expected one of {', '.join(GRADIENT_METHODS)}")
    return methods


@dataclass(frozen=True)
class _Plan:
    """Which inputs each image needs: path points α_j (first), then noise samples."""

    alphas: torch.Tensor  # fp32 [A], the path points in row order
    ig_weights: torch.Tensor  # fp64 [A], true IG's quadrature weights
    vanilla_row: int  # the row with α = 1, or -1
    samples: int

    @property
    def rows_per_image(self) -> int:
        return len(self.alphas) + self.samples


def _plan(methods: tuple[str, ...], settings: GradientSettings) -> _Plan:
    steps = settings.ig_steps
    if "ig-reference" in methods or ("integrated-gradients" in methods and settings.ig_rule == "trapezoid"):
        points = list(range(steps + 1))
    elif "integrated-gradients" in methods:  # right Riemann sum only: α = 0 carries no weight
        points = list(range(1, steps + 1))
    elif "vanilla" in methods:
        points = [steps]
    else:
        points = []
    weights = [1.0 / steps for _ in points]
    if settings.ig_rule == "trapezoid" and points:
        weights = [w / 2 if j in (0, steps) else w for j, w in zip(points, weights)]
    else:
        weights = [0.0 if j == 0 else w for j, w in zip(points, weights)]
    samples = settings.smooth_samples if any(m in methods for m in _NOISE_METHODS) else 0
    return _Plan(alphas=torch.tensor([j / steps for j in points], dtype=torch.float32),
                 ig_weights=torch.tensor(weights, dtype=torch.float64),
                 vanilla_row=points.index(steps) if points else -1, samples=samples)


def samples_per_image(methods: Sequence[str], settings: GradientSettings = GradientSettings()) -> int:
    """Model inputs (forward + backward passes) per image for `methods` computed together."""
    return _plan(check_methods(methods), settings).rows_per_image


def smoothgrad_noise(seed: int, index: int, samples: int, shape: Sequence[int],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The standard normal noise ε of image `index`: fp32 [samples, *shape], keyed on (seed, index)."""
    generator = keyed_generator(key64(SMOOTHGRAD_NOISE, seed, index), device)
    return torch.randn((samples, *shape), generator=generator, device=device, dtype=torch.float32)


def input_gradients(score: ScoreFn, inputs: torch.Tensor, labels: torch.Tensor,
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """∂s_y/∂x of each input, fp32 [N, 3, H, W]; one forward and one backward of the whole batch.

    The inputs are independent rows (the model must be in eval mode), so the gradient of the summed
    scores gives every row's own gradient.
    """
    scale = FP16_SCORE_SCALE if autocast_dtype == torch.float16 else 1.0
    while True:
        leaf = inputs.detach().float().requires_grad_(True)
        with autocast_context(leaf.device, autocast_dtype):
            scores = score(leaf, labels)
        if scores.shape != (leaf.shape[0],):
            raise ValueError(f"score function returned shape {tuple(scores.shape)}, expected ({leaf.shape[0]},)")
        (gradient,) = torch.autograd.grad(scores.float().sum() * scale, leaf)
        if scale == 1.0:
            return gradient
        if torch.isfinite(gradient).all():
            return gradient / scale
        scale = 1.0  # the scaled backward overflowed fp16: redo this chunk unscaled


class _Accumulators:
    """Per-target weighted sums in fp64: map sums for each method, squared-map sums, true IG's gradient sum."""

    def __init__(self, methods, targets: int, shape: tuple[int, int, int], device):
        def zeros(*size):
            return torch.zeros(targets, *size, dtype=torch.float64, device=device)

        height, width = shape[1:]
        self.maps = {m: zeros(height, width) for m in methods
                     if m not in ("integrated-gradients", "smoothgrad-squared", "vargrad")}
        self.squares = None
        if "vargrad" in methods or "smoothgrad-squared" in methods:
            self.maps.setdefault("smoothgrad", zeros(height, width))
            self.squares = zeros(height, width)
        self.ig_gradient = zeros(*shape) if "integrated-gradients" in methods else None


def _weighted_add(target: torch.Tensor, image: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> None:
    """target[image[r]] += weights[r] · values[r] for each row r, in fp64."""
    target.index_add_(0, image, values.double() * weights.view((-1,) + (1,) * (values.dim() - 1)))


def _run(score: ScoreFn, images: torch.Tensor, target_image: torch.Tensor, target_class: torch.Tensor, indices,
         methods: tuple[str, ...], settings: GradientSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The engine over targets t = (image target_image[t], class target_class[t]), ordered by image: (maps
    name -> fp32 [T, H, W], true IG's signed attribution fp32 [T, 3, H, W] or None)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    device = images.device
    images = images.float()
    batch = images.shape[0]
    indices = [int(i) for i in torch.as_tensor(indices).tolist()]
    if len(indices) != batch:
        raise ValueError(f"expected {batch} indices, got {len(indices)}")
    target_image = torch.as_tensor(target_image, device=device).long()
    target_class = torch.as_tensor(target_class, device=device).long()
    if target_image.dim() != 1 or target_class.shape != target_image.shape:
        raise ValueError(f"expected one class per target, got {tuple(target_image.shape)} images and "
                         f"{tuple(target_class.shape)} classes")
    if len(target_image) and (int(target_image.min()) < 0 or int(target_image.max()) >= batch):
        raise IndexError(f"target images must index the {batch} images")
    targets = len(target_image)
    plan = _plan(methods, settings)
    alphas, ig_weights = plan.alphas.to(device), plan.ig_weights.to(device)
    num_path, per_target = len(alphas), plan.rows_per_image
    sigma = settings.noise_fraction * (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3)))
    sums = _Accumulators(methods, targets, tuple(images.shape[1:]), device)
    noise_of: dict[int, torch.Tensor] = {}  # image -> its noise, kept while its rows are being processed

    for start in range(0, targets * per_target, settings.max_batch):
        rows = torch.arange(start, min(start + settings.max_batch, targets * per_target), device=device)
        target, local = rows // per_target, rows % per_target
        image = target_image[target]
        on_path = local < num_path
        inputs = torch.empty((len(rows), *images.shape[1:]), dtype=torch.float32, device=device)
        inputs[on_path] = alphas[local[on_path]].view(-1, 1, 1, 1) * images[image[on_path]]
        for i in torch.unique(image[~on_path]).tolist():
            if i not in noise_of:
                noise_of = {i: smoothgrad_noise(settings.seed, indices[i], plan.samples, images.shape[1:], device)}
            chosen = (image == i) & ~on_path
            inputs[chosen] = images[i] + sigma[i] * noise_of[i][local[chosen] - num_path]
        gradient = input_gradients(score, inputs, target_class[target], settings.autocast_dtype)
        base = gradient.abs().amax(dim=1)  # m(x') = max over RGB of |∇|, fp32 [R, H, W]

        path_rows = on_path.nonzero().squeeze(1)
        path_target, path_local = target[path_rows], local[path_rows]
        if "vanilla" in methods:
            is_vanilla = path_local == plan.vanilla_row
            _weighted_add(sums.maps["vanilla"], path_target[is_vanilla], base[path_rows[is_vanilla]],
                          torch.ones(int(is_vanilla.sum()), dtype=torch.float64, device=device))
        if "ig-reference" in methods:
            _weighted_add(sums.maps["ig-reference"], path_target, base[path_rows],
                          torch.full((len(path_rows),), 1.0 / num_path, dtype=torch.float64, device=device))
        if sums.ig_gradient is not None:
            _weighted_add(sums.ig_gradient, path_target, gradient[path_rows], ig_weights[path_local])
        noise_rows = (~on_path).nonzero().squeeze(1)
        if plan.samples and len(noise_rows):
            weight = torch.full((len(noise_rows),), 1.0 / plan.samples, dtype=torch.float64, device=device)
            _weighted_add(sums.maps["smoothgrad"], target[noise_rows], base[noise_rows], weight)
            if sums.squares is not None:
                _weighted_add(sums.squares, target[noise_rows], base[noise_rows].double().square(), weight)

    maps = {}
    attribution = None
    for method in methods:
        if method == "integrated-gradients":
            # (x − 0) ⊙ path-averaged gradient
            attribution = (images.double()[target_image] * sums.ig_gradient).float()
            maps[method] = attribution.abs().amax(dim=1)
        elif method == "vargrad":
            # fp64 keeps the cancellation small; clamp the last-bit negatives of a zero variance.
            maps[method] = (sums.squares - sums.maps["smoothgrad"].square()).clamp_min(0).float()
        elif method == "smoothgrad-squared":
            maps[method] = sums.squares.float()
        else:
            maps[method] = sums.maps[method].float()
    return maps, attribution


def gradient_maps(score: ScoreFn, images: torch.Tensor, labels, indices, methods: Sequence[str],
                  settings: GradientSettings = GradientSettings()) -> dict[str, torch.Tensor]:
    """Gradient maps of each image's label: method -> fp32 [B, H, W] at the input size, not normalised.

    images: normalised [B, 3, H, W] on the model's device; labels [B]; indices [B], the images' indices in
    the split (they key the SmoothGrad noise); methods: any of GRADIENT_METHODS (shared inputs computed once).
    """
    labels = torch.as_tensor(labels, device=images.device).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
    own = torch.arange(images.shape[0], device=images.device)
    return _run(score, images, own, labels, indices, check_methods(methods), settings)[0]


def class_gradient_maps(score: ScoreFn, images: torch.Tensor, classes, indices, methods: Sequence[str],
                        settings: GradientSettings = GradientSettings()
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Gradient maps of chosen classes of each image: (target images [T], target classes [T], method -> fp32
    [T, H, W]), the targets being the True cells of `classes` (bool [B, K]) in row-major order.

    The map of target (i, c) is the one `gradient_maps` gives for image i with label c (the same noise
    samples: they are keyed on the image, not the class); all targets' inputs share the batches.
    """
    needed = torch.as_tensor(classes, device=images.device)
    if needed.dim() != 2 or needed.shape[0] != images.shape[0]:
        raise ValueError(f"classes must be bool [B={images.shape[0]}, K], got shape {tuple(needed.shape)}")
    target_image, target_class = needed.bool().nonzero(as_tuple=True)  # row-major: ordered by image
    maps = _run(score, images, target_image, target_class, indices, check_methods(methods), settings)[0]
    return target_image, target_class, maps


def integrated_gradients(score: ScoreFn, images: torch.Tensor, labels, settings: GradientSettings = GradientSettings()
                         ) -> torch.Tensor:
    """True IG's signed attribution x ⊙ path-average of ∇s_y (zero baseline), fp32 [B, 3, H, W]."""
    labels = torch.as_tensor(labels, device=images.device).long()
    indices = list(range(images.shape[0]))  # no noise on the path: the indices key nothing here
    own = torch.arange(images.shape[0], device=images.device)
    return _run(score, images, own, labels, indices, ("integrated-gradients",), settings)[1]
