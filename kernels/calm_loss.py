"""The CALM training loss as one fused op: `calm_loss` (CALM-EM and CALM-ML, relu and softmax priors).

Inputs: class logits S [B, K, H, W] (N = H·W cells) and location scores a [B, 1, H, W], either as two
tensors or merged into one tensor [B, C, H, W] (C >= K + 1: the K class channels, the location channel K,
then zero padding channels; the head of calm_fast.models computes both 1×1 convs as one conv and hands
over that output). Output: the mean loss over the batch, a scalar. With t the label of an image:

    lse_z     = logsumexp_k S[k, z]                        per cell, one online pass over the classes
    log p(z)  = x_z - logsumexp_z' x_z'                    x = log relu(a) (relu prior; the normaliser carries
                                                           no gradient; p = 1/N where relu(a) = 0 on every
                                                           cell) or x = a (softmax prior)
    J_z       = S[t, z] - lse_z + log p(z)                 log p(y=t, z | x)
    M         = logsumexp_z J_z                            log p(y=t | x)
    log q_z   = J_z - M                                    the posterior p(z | x, y=t)
    loss_b    = -M                                         CALM-ML
              = -M + H(q),  H(q) = -Σ_z q_z log q_z        CALM-EM: -Σ_z q_z J_z with q detached

CALM-EM and CALM-ML have the same gradient (Fisher's identity, spec CALM.md §1). With g the upstream
gradient of the mean loss (read from device memory by the backward kernel) and w_z = (g / B) q_z:

    dL/dS[k, z] = w_z (P[k, z] - [k = t])                 P[k, z] = exp(S[k, z] - lse_z)
    dL/da_z     = -w_z / a_z where a_z > 0, else 0         relu prior
                = (g / B) p(z) - w_z                       softmax prior

Kernels. Forward: one program per (image, block of cells) streams its [K, BLOCK_N] tile of S once
(online logsumexp: one exponential per logit) and writes lse_z and S[t, z] - lse_z for its cells. The last
program of an image to finish (atomic counter per image) reads the image's N values and location scores
and writes log q_z, the prior's log normaliser and the image's loss; the last image to finish (a second
counter) averages the B losses. Every sum runs in an order fixed by the shape, whichever program finishes
last: results are bitwise identical from call to call. The counters are zeroed by one memset per call.
Backward: one program per (image, block of cells) reads its tile once, recomputes P from the saved lse_z
(one exponential per logit) and writes dS; on merged maps also da (location channel) and zeros (padding).

Memory traffic (e = element size of S; saved values fp32): forward reads B·K·N·e and writes 8·B·N (lse_z,
log q_z), the finishing programs re-read those and a; backward reads B·K·N·e + 12·B·N, writes B·K·N·e +
B·N·e. That is the minimum 3·B·K·N·e plus 1 + 6/(K·e) (+1.5 % at K = 200, bf16); merged maps add their
location and padding channels (C/K, +4 % at K = 200). What it saves: the plain-PyTorch loss materialises
about ten fp32 [B, K, N] tensors (~45 bytes per logit against 6 here in bf16); the older fused head
(calm_head.py) wrote partials of all K marginals (+12 % at K = 1000), made two class passes per direction
with five exponentials per logit, and needed some twenty launches of loss glue around its three kernels.
Saved for backward: S itself and 2·B·N + 2·B values.

Layouts: any strides whose H·W cells flatten (stride_h = W·stride_w: contiguous and channels-last maps and
their channel slices). Classes-contiguous (channels-last) and cells-contiguous (NCHW) are specialised: the
launcher divides the sizes and strides of the index math by ALIGN, the largest power of two up to 16
bytes of elements dividing them, and the kernel multiplies them back by the constexpr ALIGN, so Triton
proves 16-byte alignment and emits vector accesses whatever K (200, 1000) or N (784, 196) is. Checks and
blocks are worked out once per shape (`_plan`, cached).

torch.library: `calm_fast::calm_loss` (forward: the loss and the saved values) and
`calm_fast::calm_loss_backward` are triton_ops with fake implementations and an autograd formula (one
node; no gradient materialised for the saved values): torch.compile(fullgraph=True) keeps the op, CUDA
graphs capture it (no host synchronisation anywhere).

Arithmetic is fp32 after loading (fp64 for fp64 inputs, for gradcheck). An out-of-range label gives a NaN
loss (checking it on the host would need a device synchronisation). This file imports nothing from
calm_fast: the caller passes the number of classes, the prior and the objective.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .calm_head import PRIORS, SUPPORTED_DTYPES, _lse_finish, _lse_update, _prior_logits

OBJECTIVES = ("em", "ml")
VECTOR_BYTES = 16  # the widest global load or store of one thread


# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _layout(channels_arg, cells_arg, stride_b_arg, stride_k_arg, stride_n_arg,
            CLASSES_CONTIGUOUS: tl.constexpr, ALIGN: tl.constexpr):
    """(C, N, stride_b, stride_k, stride_n) from the launcher's values, the aligned ones divided by ALIGN:
    multiplying them back by a constexpr tells Triton they are multiples of ALIGN (vector accesses)."""
    if CLASSES_CONTIGUOUS:
        return channels_arg * ALIGN, cells_arg, stride_b_arg * ALIGN, 1, stride_n_arg * ALIGN
    else:
        return channels_arg, cells_arg * ALIGN, stride_b_arg * ALIGN, stride_k_arg * ALIGN, stride_n_arg


@triton.jit
def _log_prior(a, log_norm, uniform, N, IS_RELU: tl.constexpr):
    """log p(z|x) of location scores a, given the image's log normaliser; 1/N where relu(a) = 0 everywhere."""
    uniform_value = -tl.log(tl.zeros_like(a) + N)  # N may arrive as a constexpr (Triton specialises N == 1)
    return tl.where(uniform, uniform_value, _prior_logits(a, IS_RELU) - tl.where(uniform, 0.0, log_norm))


@triton.jit
def _target_joint(a_image, stride_an, target_row, cells, N, log_norm, uniform, IS_RELU: tl.constexpr,
                  COMPUTE: tl.constexpr):
    """J_z = (S[t, z] - lse_z) + log p(z|x) on `cells`, -inf past N. The target row was written by other
    programs of the image: .cg reads it from L2, not from a possibly stale L1."""
    in_n = cells < N
    a = tl.load(a_image + cells * stride_an, mask=in_n, other=0.0).to(COMPUTE)
    target_log_softmax = tl.load(target_row + cells, mask=in_n, other=float("-inf"), cache_modifier=".cg")
    return tl.where(in_n, target_log_softmax + _log_prior(a, log_norm, uniform, N, IS_RELU), float("-inf"))


@triton.jit
def _finish_image(a_image, stride_an, saved_ptr, counters_ptr, loss_ptr, b, B, N,
                  IS_RELU: tl.constexpr, IS_EM: tl.constexpr, COMPUTE: tl.constexpr,
                  BLOCK_CELLS: tl.constexpr, BLOCK_BATCH: tl.constexpr):
    """Run by the last program of image b: its log q, log normaliser and loss; then, by the last image,
    the batch mean. Every loop runs in a fixed order over fixed blocks: the result does not depend on
    which program gets here."""
    offs = tl.arange(0, BLOCK_CELLS)
    target_row = saved_ptr + B * N + b * N  # S[t, z] - lse_z, replaced by log q_z below
    running_max = tl.full([1], float("-inf"), COMPUTE)
    running_sum = tl.zeros([1], COMPUTE)
    for start in range(0, N, BLOCK_CELLS):
        cells = start + offs
        a = tl.load(a_image + cells * stride_an, mask=cells < N, other=float("-inf")).to(COMPUTE)
        running_max, running_sum = _lse_update(running_max, running_sum, _prior_logits(a, IS_RELU)[None, :], 1)
    log_norm = tl.max(_lse_finish(running_max, running_sum), axis=0)  # -inf when relu(a) = 0 everywhere
    uniform = log_norm == float("-inf")

    running_max = tl.full([1], float("-inf"), COMPUTE)
    running_sum = tl.zeros([1], COMPUTE)
    for start in range(0, N, BLOCK_CELLS):
        joint = _target_joint(a_image, stride_an, target_row, start + offs, N, log_norm, uniform, IS_RELU, COMPUTE)
        running_max, running_sum = _lse_update(running_max, running_sum, joint[None, :], 1)
    log_marginal = tl.max(_lse_finish(running_max, running_sum), axis=0)  # log p(y=t | x)

    q_log_q = tl.zeros([BLOCK_CELLS], COMPUTE)
    for start in range(0, N, BLOCK_CELLS):
        cells = start + offs
        joint = _target_joint(a_image, stride_an, target_row, cells, N, log_norm, uniform, IS_RELU, COMPUTE)
        log_q = joint - log_marginal
        q = tl.exp(log_q)
        q_log_q += q * tl.where(q > 0, log_q, 0.0)  # 0 log 0 = 0, without forming 0 · -inf
        tl.store(target_row + cells, log_q, mask=cells < N)
    loss = -log_marginal
    if IS_EM:
        loss -= tl.sum(q_log_q, axis=0)
    image_values = saved_ptr + 2 * B * N
    tl.store(image_values + b, log_norm)
    tl.store(image_values + B + b, loss)

    tl.debug_barrier()  # every thread's stores issued before the counter says this image is done
    images_done = tl.atomic_add(counters_ptr + B, 1, sem="acq_rel", scope="gpu")
    if images_done == B - 1:
        offs_b = tl.arange(0, BLOCK_BATCH)
        total = tl.zeros([BLOCK_BATCH], COMPUTE)
        for start in range(0, B, BLOCK_BATCH):
            images = start + offs_b
            total += tl.load(image_values + B + images, mask=images < B, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(total, axis=0) / B)


@triton.jit
def _calm_loss_forward_kernel(
    s_ptr, a_ptr, labels_ptr, saved_ptr, counters_ptr, loss_ptr,
    B, NUM_CLASSES, channels_arg, cells_arg, NUM_BLOCKS,
    stride_sb_arg, stride_sk_arg, stride_sn_arg, a_offset, stride_ab, stride_an,
    IS_RELU: tl.constexpr, IS_EM: tl.constexpr, CLASSES_CONTIGUOUS: tl.constexpr, ALIGN: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CELLS: tl.constexpr,
    BLOCK_BATCH: tl.constexpr,
):
    """One program per (image b, BLOCK_N cells): lse_z and S[t, z] - lse_z in one pass over the tile."""
    C, N, stride_sb, stride_sk, stride_sn = _layout(channels_arg, cells_arg, stride_sb_arg, stride_sk_arg,
                                                    stride_sn_arg, CLASSES_CONTIGUOUS, ALIGN)
    pid = tl.program_id(0)
    b = pid // NUM_BLOCKS
    offs_n = (pid % NUM_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    s_image = s_ptr + b.to(tl.int64) * stride_sb

    running_max = tl.full([BLOCK_N], float("-inf"), COMPUTE)
    running_sum = tl.zeros([BLOCK_N], COMPUTE)
    for k_start in range(0, NUM_CLASSES, BLOCK_K):
        classes = k_start + offs_k
        # the load is masked by the channel count C (a multiple of ALIGN: vector loads), the classes after
        tile = tl.load(s_image + classes[:, None] * stride_sk + offs_n[None, :] * stride_sn,
                       mask=(classes < C)[:, None] & in_n[None, :], other=float("-inf")).to(COMPUTE)
        tile = tl.where((classes < NUM_CLASSES)[:, None], tile, float("-inf"))
        running_max, running_sum = _lse_update(running_max, running_sum, tile, 0)
    cell_lse = _lse_finish(running_max, running_sum)

    target = tl.load(labels_ptr + b)
    known = (target >= 0) & (target < NUM_CLASSES)  # an unknown label gives NaN, never a stray read
    target_logits = tl.load(s_image + target * stride_sk + offs_n * stride_sn, mask=in_n & known,
                            other=float("nan")).to(COMPUTE)
    cells = b.to(tl.int64) * N + offs_n
    tl.store(saved_ptr + cells, cell_lse, mask=in_n)
    tl.store(saved_ptr + B * N + cells, target_logits - cell_lse, mask=in_n)

    tl.debug_barrier()  # every thread's stores issued before the counter says this block is done
    blocks_done = tl.atomic_add(counters_ptr + b, 1, sem="acq_rel", scope="gpu")
    if blocks_done == NUM_BLOCKS - 1:
        _finish_image(a_ptr + a_offset + b.to(tl.int64) * stride_ab, stride_an, saved_ptr, counters_ptr, loss_ptr,
                      b.to(tl.int64), B, N, IS_RELU, IS_EM, COMPUTE, BLOCK_CELLS, BLOCK_BATCH)


@triton.jit
def _calm_loss_backward_kernel(
    s_ptr, a_ptr, labels_ptr, saved_ptr, grad_loss_ptr, grad_s_ptr, grad_a_ptr,
    B, NUM_CLASSES, channels_arg, cells_arg, NUM_BLOCKS,
    stride_sb_arg, stride_sk_arg, stride_sn_arg, stride_gb_arg, stride_gk_arg, stride_gn_arg,
    a_offset, stride_ab, stride_an, stride_dab, stride_dan,
    IS_RELU: tl.constexpr, MERGED: tl.constexpr, CLASSES_CONTIGUOUS: tl.constexpr, ALIGN: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (image b, BLOCK_N cells): dS (and da) from one pass over the tile of S."""
    C, N, stride_sb, stride_sk, stride_sn = _layout(channels_arg, cells_arg, stride_sb_arg, stride_sk_arg,
                                                    stride_sn_arg, CLASSES_CONTIGUOUS, ALIGN)
    _, _, stride_gb, stride_gk, stride_gn = _layout(channels_arg, cells_arg, stride_gb_arg, stride_gk_arg,
                                                    stride_gn_arg, CLASSES_CONTIGUOUS, ALIGN)
    pid = tl.program_id(0)
    b = pid // NUM_BLOCKS
    offs_n = (pid % NUM_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    s_image = s_ptr + b.to(tl.int64) * stride_sb
    grad_image = grad_s_ptr + b.to(tl.int64) * stride_gb

    scale = tl.load(grad_loss_ptr).to(COMPUTE) / B  # dL/d(loss_b) for every image
    cells = b.to(tl.int64) * N + offs_n
    cell_lse = tl.load(saved_ptr + cells, mask=in_n, other=0.0)
    weight = scale * tl.exp(tl.load(saved_ptr + B * N + cells, mask=in_n, other=float("-inf")))  # (g/B) q_z
    a = tl.load(a_ptr + a_offset + b.to(tl.int64) * stride_ab + offs_n * stride_an, mask=in_n,
                other=0.0).to(COMPUTE)
    if IS_RELU:
        on = a > 0
        grad_a = tl.where(on, -weight / tl.where(on, a, 1.0), 0.0)
    else:
        log_norm = tl.load(saved_ptr + 2 * B * N + b)
        grad_a = scale * tl.exp(a - log_norm) - weight
    target = tl.load(labels_ptr + b)

    # over all C channels: on merged input that includes the location and padding channels
    for k_start in range(0, C, BLOCK_K):
        classes = k_start + offs_k
        mask = (classes < C)[:, None] & in_n[None, :]
        tile = tl.load(s_image + classes[:, None] * stride_sk + offs_n[None, :] * stride_sn, mask=mask,
                       other=0.0).to(COMPUTE)
        class_prob = tl.exp(tile - cell_lse[None, :])
        grad = weight[None, :] * (class_prob - tl.where(classes == target, 1.0, 0.0)[:, None])
        if MERGED:
            not_class = tl.where((classes == NUM_CLASSES)[:, None], grad_a[None, :], 0.0)
            grad = tl.where((classes < NUM_CLASSES)[:, None], grad, not_class)
        tl.store(grad_image + classes[:, None] * stride_gk + offs_n[None, :] * stride_gn,
                 grad.to(grad_s_ptr.dtype.element_ty), mask=mask)
    if not MERGED:
        tl.store(grad_a_ptr + b.to(tl.int64) * stride_dab + offs_n * stride_dan,
                 grad_a.to(grad_a_ptr.dtype.element_ty), mask=in_n)


# ----------------------------------------------------------------------------------------------------------
# The per-shape plan: checks, layout, alignment and blocks, worked out once per shape


@dataclass(frozen=True)
class Plan:
    """How one shape is launched: sizes, layout, ALIGN, blocks and the kernels' size and stride arguments."""

    batch: int
    channels: int
    cells: int
    compute: torch.dtype
    classes_contiguous: bool
    align: int
    block_k: int
    block_n: int
    num_warps: int
    block_cells: int
    block_batch: int
    num_blocks: int  # programs per image
    scores_args: tuple[int, ...]  # (C, N, stride_b, stride_k, stride_n) of S as `_layout` takes them
    location_args: tuple[int, int, int]  # (offset, stride_b, stride_n) of a, from its tensor's start
    grad_args: tuple[int, ...] | None  # (stride_b, stride_k, stride_n) of dS as `_layout` takes them
    grad_location_args: tuple[int, int] | None  # (stride_b, stride_n) of da (backward, separate a only)

    def constexprs(self) -> dict:
        return {"CLASSES_CONTIGUOUS": self.classes_contiguous, "ALIGN": self.align,
                "COMPUTE": tl.float64 if self.compute == torch.float64 else tl.float32,
                "BLOCK_K": self.block_k, "BLOCK_N": self.block_n, "num_warps": self.num_warps}


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


def _alignment(sizes_and_strides: list[int], element_size: int) -> int:
    """The largest power of two up to VECTOR_BYTES of elements dividing every value."""
    align = VECTOR_BYTES // element_size
    while align > 1 and any(value % align for value in sizes_and_strides):
        align //= 2
    return max(align, 1)


def _cells_strides(shape: tuple, strides: tuple, name: str) -> tuple[int, int, int]:
    """(stride_b, stride_k, stride_n) of a [B, C, H, W] map read as [B, C, N]."""
    _, _, height, width = shape
    if height > 1 and width > 1 and strides[2] != width * strides[3]:
        raise ValueError(f"{name}: the H·W cells must be flattenable (stride over H = W · stride over W), "
                         f"got shape {shape} and strides {strides}")
    return strides[0], strides[1], strides[3] if width > 1 else strides[2]


def _layout_and_alignment(shape, strides_list, element_size):
    """(classes contiguous?, ALIGN) shared by every [B, C, N] view in strides_list (S, and dS in backward)."""
    batch, channels, cells = shape
    if channels > 1 and all(s[1] == 1 for s in strides_list):
        values = [channels] + [v for s in strides_list for v in (s[0], s[2])]
        return True, _alignment(values, element_size)
    if all(s[2] == 1 or cells == 1 for s in strides_list):
        values = [cells] + [v for s in strides_list for v in (s[0], s[1])]
        return False, _alignment(values, element_size)
    return False, 1


@functools.lru_cache(maxsize=512)
def _plan(scores_meta, location_meta, labels_meta, num_classes, prior, objective, block_n, block_k,
          num_warps, grad_strides=None, grad_location_strides=None) -> Plan:
    """Every check of the inputs and every launch choice for one shape; cached, so a training step pays
    them once. *_meta = (shape, strides, dtype, device type) of each tensor; location_meta None = merged."""
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r}: expected one of {', '.join(PRIORS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    shape, strides, dtype, device = scores_meta
    if len(shape) != 4:
        raise ValueError(f"scores must be a [B, C, H, W] map, got shape {shape}")
    batch, channels, height, width = shape
    merged = location_meta is None
    needed = num_classes + 1 if merged else num_classes
    if num_classes < 1 or (channels < needed if merged else channels != needed):
        what = "at least K + 1 channels (merged class and location maps)" if merged else "K channels"
        raise ValueError(f"scores has {channels} channels for num_classes={num_classes}: expected {what}")
    if height * width < 1:
        raise ValueError(f"scores shape {shape}: the map needs at least one cell")
    if channels * height * width >= 2**31:
        raise ValueError(f"scores shape {shape}: C·H·W must stay below 2**31")
    dtypes = [("scores", dtype)]
    if not merged:
        location_shape, _, location_dtype, location_device = location_meta
        if location_shape != (batch, 1, height, width):
            raise ValueError(f"location must be [B, 1, H, W] = {(batch, 1, height, width)}, got {location_shape}")
        if location_device != device:
            raise ValueError(f"location is on {location_device}, scores on {device}")
        dtypes.append(("location", location_dtype))
    for name, tensor_dtype in dtypes:
        if tensor_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {tensor_dtype}: expected float32, bfloat16, float16 or float64")
    labels_shape, _, labels_dtype, labels_device = labels_meta
    if labels_shape != (batch,) or labels_dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor of shape [B] = ({batch},), got {labels_shape} "
                         f"{labels_dtype}")
    if labels_device != device:
        raise ValueError(f"labels is on {labels_device}, scores on {device}")
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"calm_loss needs CUDA tensors (got {device}); CPU tensors run only under the Triton "
                           "interpreter, TRITON_INTERPRET=1 set before calm_fast.kernels is imported")

    cells = height * width
    views = [_cells_strides(shape, strides, "scores")]
    if grad_strides is not None:
        views.append(_cells_strides(shape, grad_strides, "grad_scores"))
    element_size = dtype.itemsize
    classes_contiguous, align = _layout_and_alignment((batch, channels, cells), views, element_size)
    compute = torch.float64 if torch.float64 in (d for _, d in dtypes) else torch.float32
    # A tile of about 2048 values, 16 a thread with 4 warps, the contiguous axis as long as the data allows;
    # 512 without vector accesses, where every value needs its own address registers (chosen without a GPU
    # at hand; `calm-fast bench head --configs` times others)
    tile = 2048 if align > 1 else 512
    if classes_contiguous:
        default_k = _pow2_between(num_classes, 16, min(128, tile // 16))
        default_n = _pow2_between(cells, 16, tile // default_k)
    else:
        default_n = _pow2_between(cells, 16, 64)
        default_k = _pow2_between(num_classes, 16, tile // default_n)
    block_n, block_k = block_n or default_n, block_k or default_k
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value}: expected a power of two >= 16")

    def scaled(stride_b, stride_k, stride_n):  # what `_layout` multiplies back by ALIGN
        if classes_contiguous:
            return channels // align, cells, stride_b // align, stride_k, stride_n // align
        return channels, cells // align, stride_b // align, stride_k // align, stride_n

    if merged:  # the location channel K of the scores
        location_args = (num_classes * views[0][1], views[0][0], views[0][2])
    else:
        stride_b, _, stride_n = _cells_strides(location_meta[0], location_meta[1], "location")
        location_args = (0, stride_b, stride_n)
    grad_location_args = None
    if grad_location_strides is not None:
        stride_b, _, stride_n = _cells_strides(location_meta[0], grad_location_strides, "grad_location")
        grad_location_args = (stride_b, stride_n)
    return Plan(batch=batch, channels=channels, cells=cells, compute=compute,
                classes_contiguous=classes_contiguous, align=align, block_k=block_k, block_n=block_n,
                num_warps=num_warps or 4, block_cells=_pow2_between(cells, 16, 1024),
                block_batch=_pow2_between(batch, 16, 1024), num_blocks=triton.cdiv(cells, block_n),
                scores_args=scaled(*views[0]), location_args=location_args,
                grad_args=scaled(*views[1])[2:] if grad_strides is not None else None,
                grad_location_args=grad_location_args)


def _meta(tensor: torch.Tensor | None):
    """The plan's key for one tensor; int() fixes symbolic sizes (traced with dynamic shapes) to their value."""
    if tensor is None:
        return None
    return (tuple(int(n) for n in tensor.shape), tuple(int(n) for n in tensor.stride()), tensor.dtype,
            tensor.device.type)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops


@triton_op("calm_fast::calm_loss", mutates_args=())
def _calm_loss_forward(scores: torch.Tensor, location: torch.Tensor | None, labels: torch.Tensor, num_classes: int,
                       prior: str, objective: str, block_n: int, block_k: int,
                       num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss [], saved [2·B·N + 2·B]: lse_z, log q_z, log normaliser and loss of each image)."""
    plan = _plan(_meta(scores), _meta(location), _meta(labels), num_classes, prior, objective, block_n, block_k,
                 num_warps)
    batch, cells = plan.batch, plan.cells
    saved = scores.new_empty(2 * batch * cells + 2 * batch, dtype=plan.compute)
    if batch == 0:
        return torch.full((), math.nan, dtype=plan.compute, device=scores.device), saved
    loss = scores.new_empty((), dtype=plan.compute)
    counters = torch.zeros(batch + 1, dtype=torch.int32, device=scores.device)
    wrap_triton(_calm_loss_forward_kernel)[(batch * plan.num_blocks,)](
        scores, scores if location is None else location, labels, saved, counters, loss,
        batch, num_classes, *plan.scores_args[:2], plan.num_blocks, *plan.scores_args[2:], *plan.location_args,
        IS_RELU=prior == "relu", IS_EM=objective == "em", BLOCK_CELLS=plan.block_cells,
        BLOCK_BATCH=plan.block_batch, **plan.constexprs(),
    )
    return loss, saved


@triton_op("calm_fast::calm_loss_backward", mutates_args=())
def _calm_loss_backward(grad_loss: torch.Tensor, scores: torch.Tensor, location: torch.Tensor | None,
                        labels: torch.Tensor, saved: torch.Tensor, num_classes: int, prior: str, block_n: int,
                        block_k: int, num_warps: int) -> list[torch.Tensor]:
    """[dL/dscores] for merged scores (class, location and padding channels), else [dL/dS, dL/dlocation]."""
    grad_scores = torch.empty_like(scores)
    grads = [grad_scores] if location is None else [grad_scores, torch.empty_like(location)]
    plan = _plan(_meta(scores), _meta(location), _meta(labels), num_classes, prior, "ml", block_n, block_k,
                 num_warps, grad_strides=_meta(grad_scores)[1],
                 grad_location_strides=None if location is None else _meta(grads[1])[1])
    if plan.batch == 0:
        return grads
    wrap_triton(_calm_loss_backward_kernel)[(plan.batch * plan.num_blocks,)](
        scores, scores if location is None else location, labels, saved, grad_loss, grad_scores, grads[-1],
        plan.batch, num_classes, *plan.scores_args[:2], plan.num_blocks, *plan.scores_args[2:], *plan.grad_args,
        *plan.location_args, *(plan.grad_location_args or (0, 0)),  # da: into grad_scores when merged
        IS_RELU=prior == "relu", MERGED=location is None, **plan.constexprs(),
    )
    return grads


@_calm_loss_forward.register_fake
def _calm_loss_forward_fake(scores, location, labels, num_classes, prior, objective, block_n, block_k, num_warps):
    compute = torch.float64 if torch.float64 in (scores.dtype, getattr(location, "dtype", None)) else torch.float32
    batch, cells = scores.shape[0], scores.shape[2] * scores.shape[3]
    return scores.new_empty((), dtype=compute), scores.new_empty(2 * batch * cells + 2 * batch, dtype=compute)


@_calm_loss_backward.register_fake
def _calm_loss_backward_fake(grad_loss, scores, location, labels, saved, num_classes, prior, block_n, block_k,
                             num_warps):
    return [torch.empty_like(scores)] if location is None else [torch.empty_like(scores), torch.empty_like(location)]


def _setup_context(ctx, inputs, output):
    scores, location, labels, num_classes, prior, _, block_n, block_k, num_warps = inputs
    _, saved = output
    ctx.save_for_backward(scores, location, labels, saved)
    ctx.launch = (num_classes, prior, block_n, block_k, num_warps)
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no zeros for the saved values' (absent) gradient


def _backward(ctx, grad_loss, _grad_saved):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None
    scores, location, labels, saved = ctx.saved_tensors
    grads = torch.ops.calm_fast.calm_loss_backward(grad_loss, scores, location, labels, saved, *ctx.launch)
    grad_location = grads[1] if location is not None and ctx.needs_input_grad[1] else None
    return grads[0] if ctx.needs_input_grad[0] else None, grad_location, None, None, None, None, None, None, None


_calm_loss_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public function


def calm_loss(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, prior: str = "relu",
              objective: str = "em", location: torch.Tensor | None = None, *, block_n: int = 0, block_k: int = 0,
              num_warps: int = 0) -> torch.Tensor:
    """The mean CALM training loss over the batch, fused (see the module docstring); a scalar.

    scores: merged maps [B, C, H, W] (class channels 0..K-1, the location channel K, padding after it) when
    `location` is None, else the class logits [B, K, H, W] with location [B, 1, H, W]; float32, bfloat16,
    float16 (fp32 math) or float64; labels: int64 [B]. objective "em" or "ml" (same gradient), prior "relu"
    or "softmax". The gradient comes back in the inputs' dtypes and layouts: for merged scores one gradient,
    with zeros in the padding channels. block_n, block_k, num_warps override the launch choice (0: default).
    """
    loss, _ = torch.ops.calm_fast.calm_loss(scores, location, labels, num_classes, prior, objective, block_n,
                                            block_k, num_warps)
    return loss
