"""Adapters from a WSOL model to the two functions the attribution benchmarks call, and their precision.

- a classifier `images -> class scores [N, K]` whose argmax is the model's prediction (the marginal
  log p(y|x) for CALM, log softmax of GAP(S) for CAM: `calm_fast.head.class_log_probs`);
- a score `(images, labels) -> s_y [N]`, differentiable in the images: GAP(S_y), the class score before
  the softmax, for CAM (as the reference); log p(y|x) for CALM (which the reference cannot do).

The engines take these as plain callables, so the tests can hand them models with known answers.
`autocast_context` runs the model body in bf16/fp16 when asked; the engines keep their inputs, gradients
and accumulators in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from calm_fast.head import class_log_probs
from calm_fast.models.wsol import check_method

# images [N, 3, H, W] -> class scores [N, K]; prediction = argmax over K
ClassifyFn = Callable[[torch.Tensor], torch.Tensor]
# (images [N, 3, H, W], labels [N]) -> score of each image's label [N], differentiable in the images
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on the device's type, or nothing for dtype None / float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype: expected bfloat16, float16, float32 or None, got {dtype}")
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def model_classifier(model: torch.nn.Module, method: str, prior: str = "relu") -> ClassifyFn:
    """The model's class log-probabilities, under no_grad (the model should be in eval mode)."""
    check_method(method)

    @torch.no_grad()
    def classify(images: torch.Tensor) -> torch.Tensor:
        class_logits, location_scores = model(images)
        return class_log_probs(class_logits, location_scores, method, prior)

    return classify


def model_score(model: torch.nn.Module, method: str, prior: str = "relu") -> ScoreFn:
    """s_y for each image: GAP(S_y) for "cam", log p(y|x) for the CALM methods; fp32 [N]."""
    check_method(method)

    def score(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        class_logits, location_scores = model(images)
        if method == "cam":
            scores = class_logits.float().mean(dim=(2, 3))
        else:
            scores = class_log_probs(class_logits, location_scores, method, prior)
        return scores.gather(1, labels.long()[:, None]).squeeze(1)

    return score
