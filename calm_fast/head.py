"""The CALM and CAM head math: plain PyTorch in log space, and the dispatch to the fused Triton kernels.

Notation (spec CALM.md §1): S = class logits [B, K, H, W], a = location scores [B, 1, H, W] (before the
prior's ReLU or softmax), z ranges over the N = H·W cells.

    log p(y | z, x) = log_softmax_K(S)[:, :, z]
    log p(z | x)    = log relu(a_z) - log sg(Σ relu(a))      prior "relu" (the reference; sg = stop-gradient)
                    = log_softmax_N(a)                         prior "softmax"
    log p(y, z | x) = log p(y | z, x) + log p(z | x)
    log p(y | x)    = logsumexp_z log p(y, z | x)

Everything is computed in fp32 whatever the input dtype, in log space (no product of probabilities), so
nothing overflows for logits of ±1e4 and nothing is NaN. Choices that differ from the reference, on purpose:
- where relu(a) is zero on every cell of an image the reference divides by zero; here that image's prior is
  uniform, 1/N;
- the reference adds 1e-8 to prior entries below 1e-8 before its EM log; here log p(z) is exact (-inf on
  cells with zero prior, which then carry zero posterior and contribute nothing).

Non-finite inputs are never hidden: a NaN or +inf in S or a makes the results of that image NaN or inf
(so the loss is not finite), never a zero-prior cell or a dropped term. (-inf is a logit's limit, a zero
probability, and is computed as such.) Labels must be an integer tensor [B]; a label outside [0, K) is a
ValueError for CPU tensors and makes the loss (or that image's map) NaN on CUDA, where checking it would
cost a host sync on every step (the data layer bounds the labels by the configured class count).

The plain-PyTorch functions are the oracle that the kernels in `calm_fast.kernels` are tested against:
the training loss is one fused op (kernels/calm_loss.py), the all-class marginal for evaluation another
(kernels/calm_head.py). `backend="auto"` uses the kernels for CUDA tensors and PyTorch elsewhere; the
environment variable CALM_FAST_HEAD_BACKEND (torch | triton | auto) changes the default (read once per
process). Mode arguments (method, objective, prior, map kind, backend) are `calm_fast.modes` members or
their string values.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from calm_fast.modes import Backend, MapKind, Method, Objective, Prior, parse

@functools.cache
def default_backend() -> Backend:
    """The backend used when a call names none: CALM_FAST_HEAD_BACKEND (torch | triton | auto, default
    auto), read once per process."""
    return parse(Backend, os.environ.get("CALM_FAST_HEAD_BACKEND", Backend.AUTO), "CALM_FAST_HEAD_BACKEND")


def _check_shapes(class_logits: torch.Tensor, location_scores: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(B, K, H, W) once class_logits [B,K,H,W] and location_scores [B,1,H,W] are checked to agree."""
    if class_logits.dim() != 4:
        raise ValueError(f"class_logits must be [B, K, H, W], got shape {tuple(class_logits.shape)}")
    b, k, h, w = class_logits.shape
    if location_scores is None or tuple(location_scores.shape) != (b, 1, h, w):
        got = None if location_scores is None else tuple(location_scores.shape)
        raise ValueError(f"location_scores must be [B, 1, H, W] = {(b, 1, h, w)}, got {got}")
    return b, k, h, w


def _checked_labels(labels, batch: int, num_classes: int,
                    kernel_checks_range: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int64 labels safe to index with, valid-row mask or None): the shape and type checks are free; the
    range check is a ValueError on CPU, and on CUDA (no host sync) a mask that turns the rows it rejects
    into NaN. kernel_checks_range: the fused op turns an out-of-range label into a NaN loss itself, so on
    CUDA the labels go to it as they are (no clamp, no mask: no launches around the op)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor (class indices), got {got}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"labels must have shape [B] = ({batch},), got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.device.type == "cpu":
        if batch and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"labels must lie in [0, {num_classes}), got {bad}")
        return labels, None
    if kernel_checks_range:
        return labels, None
    valid = (labels >= 0) & (labels < num_classes)
    return labels.clamp(0, num_classes - 1), valid


def _nan_where_invalid(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """values [B, ...] with the rows of invalid labels set to NaN (nothing to do when valid is None)."""
    if valid is None:
        return values
    return torch.where(valid.view(-1, *([1] * (values.dim() - 1))), values, float("nan"))


def _flatten_inputs(class_logits: torch.Tensor, location_scores: torch.Tensor):
    """[B,K,H,W], [B,1,H,W] -> fp32 [B,K,N], [B,N], after checking the shapes agree."""
    b, k, h, w = _check_shapes(class_logits, location_scores)
    return class_logits.float().reshape(b, k, h * w), location_scores.float().reshape(b, h * w)


def log_prior(location_scores_flat: torch.Tensor, prior: str = "relu") -> torch.Tensor:
    """log p(z | x) from fp32 location scores [B, N]; -inf on cells whose relu prior is zero."""
    prior = parse(Prior, prior, "prior")
    if prior == "softmax":
        return torch.log_softmax(location_scores_flat, dim=1)
    r = torch.relu(location_scores_flat)  # NaN stays NaN
    # Masks test "== 0", not "> 0": a NaN cell is not a zero-prior cell, so its NaN reaches the results.
    zero = r == 0
    # log of the substituted 1 keeps the masked branch finite, so its (zero) gradient is not NaN.
    log_r = torch.where(zero, float("-inf"), torch.log(torch.where(zero, torch.ones_like(r), r)))
    log_norm = torch.logsumexp(log_r, dim=1, keepdim=True).detach()
    uniform = torch.full_like(log_r, -math.log(r.shape[1]))
    all_zero = zero.all(dim=1, keepdim=True)
    return torch.where(all_zero, uniform, log_r - log_norm)


def log_joint(class_logits: torch.Tensor, location_scores: torch.Tensor, prior: str = "relu") -> torch.Tensor:
    """log p(y, z | x) as fp32 [B, K, N]."""
    s, a = _flatten_inputs(class_logits, location_scores)
    return torch.log_softmax(s, dim=1) + log_prior(a, prior).unsqueeze(1)


def _use_kernels(tensor: torch.Tensor, backend: Backend | str | None) -> bool:
    backend = default_backend() if backend is None else parse(Backend, backend, "backend")
    if backend == Backend.AUTO:
        return tensor.is_cuda
    return backend == Backend.TRITON


def _fused(class_logits, location_scores, labels, prior):
    # The kernels on use: Triton is slow to import and reads TRITON_INTERPRET when they are first defined.
    from calm_fast.kernels.calm_head import calm_head

    b, k, h, w = _check_shapes(class_logits, location_scores)
    return calm_head(class_logits.reshape(b, k, h * w), location_scores.reshape(b, h * w), prior, labels)


def log_marginal(class_logits, location_scores, prior: str = "relu", backend: str | None = None):
    """log p(y | x) for every class: fp32 [B, K]."""
    prior = parse(Prior, prior, "prior")
    if _use_kernels(class_logits, backend):
        return _fused(class_logits, location_scores, None, prior)[0]
    return torch.logsumexp(log_joint(class_logits, location_scores, prior), dim=2)


def cam_log_probs(class_logits: torch.Tensor) -> torch.Tensor:
    """CAM's log p(y | x) = log_softmax(GAP(S)): fp32 [B, K]."""
    return torch.log_softmax(class_logits.float().mean(dim=(2, 3)), dim=1)


def class_log_probs(class_logits, location_scores, method: str, prior: str = "relu", backend=None):
    """log p(y | x) used for classification by any method: fp32 [B, K]."""
    method = parse(Method, method, "method")
    if method == "cam":
        return cam_log_probs(class_logits)
    return log_marginal(class_logits, location_scores, prior, backend)


def calm_loss(class_logits, location_scores, labels, objective: str = "em", prior: str = "relu", backend=None):
    """Mean training loss over the batch.

    "ml": -log p(y | x). "em": the EM M-step loss -Σ_z q(z) log p(y, z | x) with q = p(z | x, y) detached;
    its value is L_ml + H(q) and its gradient equals that of "ml" (Fisher's identity, CALM.md §1), which is
    how the fused op (calm_fast.kernels.calm_loss) computes it. "cam": cross-entropy of GAP(S)
    (location_scores may be None).
    """
    objective = parse(Objective, objective, "objective")
    if class_logits.dim() != 4:
        raise ValueError(f"class_logits must be [B, K, H, W], got shape {tuple(class_logits.shape)}")
    fused = objective != "cam" and _use_kernels(class_logits, backend)
    labels, valid = _checked_labels(labels, class_logits.shape[0], class_logits.shape[1], kernel_checks_range=fused)
    if objective == "cam":
        per_image = -cam_log_probs(class_logits).gather(1, labels[:, None]).squeeze(1)
    elif fused:
        from calm_fast.kernels.calm_loss import calm_loss as fused_loss  # lazy: Triton picks CPU/GPU at import

        prior = parse(Prior, prior, "prior")  # the op takes plain strings (its schema's type)
        return fused_loss(class_logits, labels, class_logits.shape[1], prior.value, objective.value,
                          location=location_scores)
    else:
        joint = log_joint(class_logits, location_scores, prior)  # [B, K, N]
        joint_y = joint.gather(1, labels[:, None, None].expand(-1, 1, joint.shape[2])).squeeze(1)  # [B, N]
        log_marg_y = torch.logsumexp(joint_y, dim=1)
        per_image = -log_marg_y
        if objective == "em":
            q = (joint_y - log_marg_y[:, None]).exp().detach()
            # Cells with q = 0 (zero prior) contribute nothing; where() keeps 0 * -inf from becoming NaN. The
            # mask is "q == 0", not "q > 0": a NaN q (a NaN or +inf input) must not be dropped.
            per_image = -torch.where(q == 0, torch.zeros_like(joint_y), q * joint_y).sum(dim=1)
    return _nan_where_invalid(per_image, valid).mean()


def merged_loss(head_maps, labels, num_classes: int, objective: str = "em", prior: str = "relu", backend=None):
    """`calm_loss` of the merged head maps [B, C, H, W] of `WSOLModel.forward(merged=True)`: class logits in
    channels 0..K-1, location scores in channel K (CALM), padding after. The fused op takes the tensor
    whole, so the merged conv gets one gradient (zeros in the padding); elsewhere its slices go to
    `calm_loss`. For "cam" the maps are the class logits."""
    objective = parse(Objective, objective, "objective")
    if objective == "cam":
        return calm_loss(head_maps[:, :num_classes], None, labels, objective)
    if _use_kernels(head_maps, backend):  # the op checks its inputs, once per shape
        from calm_fast.kernels.calm_loss import calm_loss as fused_loss  # lazy: Triton picks CPU/GPU at import

        labels, _ = _checked_labels(labels, head_maps.shape[0], num_classes, kernel_checks_range=True)
        prior = parse(Prior, prior, "prior")  # the op takes plain strings (its schema's type)
        return fused_loss(head_maps, labels, num_classes, prior.value, objective.value)
    if head_maps.dim() != 4 or head_maps.shape[1] < num_classes + 1:
        raise ValueError(f"head_maps must be [B, C, H, W] with C >= num_classes + 1 = {num_classes + 1}, got "
                         f"shape {tuple(head_maps.shape)}")
    return calm_loss(head_maps[:, :num_classes], head_maps[:, num_classes:num_classes + 1], labels, objective,
                     prior, backend="torch")


def attribution_map(class_logits, location_scores, labels, kind: str = "joint", prior: str = "relu"):
    """Map of class `labels[i]` for each image: fp32 [B, H, W].

    joint = p(y, z | x) (the CALM map), posterior = p(z | x, y), prior = p(z | x) (class-agnostic),
    class = S[y] (raw class logits, the CAM map). location_scores may be None for kind "class".
    """
    kind = parse(MapKind, kind, "kind")
    if class_logits.dim() != 4:
        raise ValueError(f"class_logits must be [B, K, H, W], got shape {tuple(class_logits.shape)}")
    b, k, h, w = class_logits.shape
    labels, valid = _checked_labels(labels, b, k)
    if kind == "class":
        maps = class_logits.float()[torch.arange(b, device=labels.device), labels]
    elif kind == "prior":  # class-agnostic: S is not needed, so not copied to fp32 either
        _check_shapes(class_logits, location_scores)
        maps = log_prior(location_scores.float().reshape(b, h * w), prior).exp().reshape(b, h, w)
    else:
        joint_y = log_joint(class_logits, location_scores, prior)[torch.arange(b, device=labels.device), labels]
        maps = _joint_to_map(joint_y, kind).exp().reshape(b, h, w)
    return _nan_where_invalid(maps, valid)


def all_class_maps(class_logits, location_scores, kind: str = "joint", prior: str = "relu"):
    """The maps of every class at once: fp32 [B, K, H, W] (kinds as in `attribution_map`).

    One forward pass gives every class's map; the cue-localization benchmark compares them in pairs. The
    prior map is the same for every class, so it has no per-class form here.
    """
    kind = parse(MapKind, kind, "kind")
    if kind == "prior":
        raise ValueError("kind='prior': p(z | x) is the same for every class; there is no per-class map")
    b, k, h, w = class_logits.shape
    if kind == "class":
        return class_logits.float()
    return _joint_to_map(log_joint(class_logits, location_scores, prior), kind).exp().reshape(b, k, h, w)


def _joint_to_map(log_joint_maps: torch.Tensor, kind: str) -> torch.Tensor:
    """log p(y, z | x) [..., N] -> the log of the map of `kind`: itself (joint) or log p(z | x, y) (posterior)."""
    if kind == "posterior":
        return log_joint_maps - torch.logsumexp(log_joint_maps, dim=-1, keepdim=True)
    return log_joint_maps


def method_objective(method: Method | str) -> Objective:
    """The training objective of a method: cam -> cam, calm-em -> em, calm-ml -> ml."""
    return parse(Method, method, "method").objective
