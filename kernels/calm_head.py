"""The fused CALM head: log p(y|x) for every class and the target's posterior, forward and backward, in Triton.

Inputs are the class logits S [B, K, N] and the location scores a [B, N] (N = H·W cells). With the notation
of calm_fast/head.py (the plain-PyTorch oracle these kernels are tested against):

    log p(z|x)      x_z - logsumexp_z' x_z'       x = a (prior "softmax") or log relu(a) (prior "relu");
                                                  where relu(a) is zero on every cell, p(z|x) = 1/N
    lse_z           logsumexp_k S[k, z]           the per-cell class log-softmax is S[k, z] - lse_z
    joint[k, z]     S[k, z] + shift_z             shift_z = log p(z|x) - lse_z
    M_k             logsumexp_z joint[k, z]       log p(y=k | x), the output
    log q_z         joint[t, z] - M_t             log p(z | x, y=t) for the label t, the second output

Backward for a general upstream gradient g = dL/dM [B, K] (CALM.md §1), with the posteriors
r[k, z] = exp(joint[k, z] - M_k) and the per-cell class probabilities P[k, z] = exp(S[k, z] - lse_z):

    u_z          = Σ_k g_k r[k, z]                dL/d log p(z|x)
    dL/dS[k, z]  = g_k r[k, z] - P[k, z] u_z
    dL/da_z      = u_z / a_z where a_z > 0, else 0                  prior "relu" (detached normaliser)
                 = u_z - p(z|x) Σ_k g_k                             prior "softmax"

The softmax line uses Σ_z u_z = Σ_k g_k (each posterior sums to 1 over z), so every cell's gradient is known
to the program that owns the cell and no second pass over the image is needed.

Work split: each program owns BLOCK_N cells of one image and loops over the classes twice (first for lse_z or
u_z, then for the marginal terms or dS). The second loop re-reads the program's own [K, BLOCK_N] tile, which
the first loop has just brought into L2, so DRAM sees S once per kernel as long as the tiles of all resident
programs fit in L2: `default_launch_config` keeps a tile near 32 KB (BLOCK_N = 64 cells for K = 200, 16 for
K = 1000 in bf16). The marginal M_k is a logsumexp over all N cells: each program writes its block's
logsumexp for every class, and a small combine kernel (one program per image and chunk of classes) reduces
those and turns the target's joint into its log posterior.

DRAM traffic, e = element size of S (2 for bf16), NB = ceil(N / BLOCK_N), all buffers fp32:
    forward   read B·K·N·e (S) + B·N·e (a)
              write B·NB·K·4 (block partials) + 3·B·N·4 (lse_z, log p(z|x), target joint)
    combine   read B·NB·K·4 + B·N·4, write B·K·4 (M) + B·N·4 (log posterior)
    backward  read B·K·N·e (S) + B·K·4·2 (g, M) + B·N·(4·2 + e) (lse_z, log p(z|x), a)
              write B·K·N·e (dS) + B·N·e (da)
So forward + backward move about 3·B·K·N·e bytes: one read of S per direction and one write of dS, the least
a general-g backward allows, plus the block partials, 4/(BLOCK_N·e) of S each way (6% for K = 200, 12% for
K = 1000 in bf16; written just before the combine kernel reads them, so often served from L2). No [B, K, N]
intermediate exists besides S and dS. The plain-PyTorch EM loss materialises fp32 [B, K, N] tensors (the
fp32 copy of S, its log-softmax, the joint, the scattered gradient of the target's row, the log-softmax
gradient), about ten fp32 reads or writes of B·K·N values: some 45 bytes per logit against 6.5 here in bf16.
`calm-fast bench head` measures the time and the peak memory of both.
Each program also re-reads its image's N location scores for the prior's normaliser (from L2; N values
against K·BLOCK_N logits).

All arithmetic is fp32 after loading (fp64 for fp64 inputs, which then return fp64 results: that is what the
float64 gradcheck runs on). Gradients come back in each input's dtype and layout. Inputs may have any strides
(a channels-last feature map reshaped to [B, K, N] is used in place, without a copy).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The priors these kernels implement (calm_fast.modes.Prior's values; this folder imports nothing from calm_fast).
PRIORS = ("relu", "softmax")


# ----------------------------------------------------------------------------------------------------------
# Small helpers shared by the kernels


@triton.jit
def _safe_log(x):
    """log x for x >= 0, with log 0 = -inf (computed without taking the log of zero). The mask tests
    "== 0", not "> 0", so that a NaN stays NaN: a NaN or +inf input must reach the outputs, never be hidden."""
    zero = x == 0
    return tl.where(zero, float("-inf"), tl.log(tl.where(zero, 1.0, x)))


@triton.jit
def _lse_update(running_max, running_sum, x, AXIS: tl.constexpr):
    """One step of a streaming logsumexp: fold the values of the 2-D block x along AXIS into the running
    max and the running sum of exp(x - max). Rows that are all -inf so far stay (-inf, 0) without NaN."""
    new_max = tl.maximum(running_max, tl.max(x, axis=AXIS))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
        tl.exp(x - tl.expand_dims(safe_max, AXIS)), axis=AXIS
    )
    return new_max, running_sum


@triton.jit
def _lse_finish(running_max, running_sum):
    return running_max + _safe_log(running_sum)


@triton.jit
def _prior_logits(a, IS_RELU: tl.constexpr):
    """x with p(z|x) ∝ exp(x_z): a itself (softmax prior) or log relu(a), -inf where relu(a) = 0."""
    if IS_RELU:
        # propagate_nan: the GPU's default max returns the number of (NaN, 0), which would hide the NaN
        return _safe_log(tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL))
    else:
        return a


@triton.jit
def _log_prior_of_block(a_image, stride_an, N, offs_n, in_n, IS_RELU: tl.constexpr, COMPUTE: tl.constexpr,
                        BLOCK_PRIOR: tl.constexpr):
    """log p(z|x) for the cells offs_n of one image; the normaliser streams over all N cells of a."""
    offs = tl.arange(0, BLOCK_PRIOR)
    running_max = tl.full([1], float("-inf"), COMPUTE)
    running_sum = tl.zeros([1], COMPUTE)
    for start in range(0, N, BLOCK_PRIOR):
        cells = start + offs
        a = tl.load(a_image + cells * stride_an, mask=cells < N, other=float("-inf")).to(COMPUTE)
        running_max, running_sum = _lse_update(running_max, running_sum, _prior_logits(a, IS_RELU)[None, :], 1)
    log_normaliser = _lse_finish(running_max, running_sum)  # [1]; -inf when relu(a) is zero everywhere
    all_zero = log_normaliser == float("-inf")
    a = tl.load(a_image + offs_n * stride_an, mask=in_n, other=float("-inf")).to(COMPUTE)
    uniform = -tl.log(tl.zeros([1], COMPUTE) + N)  # N may arrive as a constexpr (Triton specialises N == 1)
    return tl.where(all_zero, uniform, _prior_logits(a, IS_RELU) - tl.where(all_zero, 0.0, log_normaliser))


@triton.jit
def _load_logits(s_image, offs_k, offs_n, K, in_n, stride_sk, stride_sn, COMPUTE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile S[offs_k, offs_n] of one image, upcast, -inf outside the bounds."""
    mask = (offs_k < K)[:, None] & in_n[None, :]
    pointers = s_image + offs_k[:, None] * stride_sk + offs_n[None, :] * stride_sn
    return tl.load(pointers, mask=mask, other=float("-inf")).to(COMPUTE)


# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _calm_head_forward_kernel(
    s_ptr, a_ptr, labels_ptr,
    partial_lse_ptr, cell_lse_ptr, log_prior_ptr, joint_target_ptr,
    K, N, NUM_N_BLOCKS,
    stride_sb, stride_sk, stride_sn, stride_ab, stride_an,
    IS_RELU: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PRIOR: tl.constexpr,
):
    """One program per (image, block of BLOCK_N cells).

    Reads S[b, :, cells] (from DRAM once; the second class loop hits L2) and a[b, :]; writes, per class,
    the logsumexp over its cells of the joint (partial_lse [B, NB, K]), and per cell lse_z, log p(z|x) and
    the target's joint log p(y=t, z|x) ([B, N] each).
    """
    pid = tl.program_id(0)
    b = pid // NUM_N_BLOCKS
    n_block = pid % NUM_N_BLOCKS
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    s_image = s_ptr + b.to(tl.int64) * stride_sb
    cell_row = b.to(tl.int64) * N + offs_n

    log_prior = _log_prior_of_block(a_ptr + b.to(tl.int64) * stride_ab, stride_an, N, offs_n, in_n,
                                    IS_RELU, COMPUTE, BLOCK_PRIOR)

    # lse_z = logsumexp over the classes, streamed over class chunks
    running_max = tl.full([BLOCK_N], float("-inf"), COMPUTE)
    running_sum = tl.zeros([BLOCK_N], COMPUTE)
    for k_start in range(0, K, BLOCK_K):
        logits = _load_logits(s_image, k_start + offs_k, offs_n, K, in_n, stride_sk, stride_sn, COMPUTE)
        running_max, running_sum = _lse_update(running_max, running_sum, logits, 0)
    cell_lse = tl.where(in_n, _lse_finish(running_max, running_sum), 0.0)
    shift = tl.where(in_n, log_prior - cell_lse, float("-inf"))  # joint = S + shift; cells past N count 0

    # per class: logsumexp over this block's cells of the joint
    partial_row = partial_lse_ptr + (b.to(tl.int64) * NUM_N_BLOCKS + n_block) * K
    for k_start in range(0, K, BLOCK_K):
        classes = k_start + offs_k
        joint = _load_logits(s_image, classes, offs_n, K, in_n, stride_sk, stride_sn, COMPUTE) + shift[None, :]
        block_max, block_sum = _lse_update(tl.full([BLOCK_K], float("-inf"), COMPUTE),
                                           tl.zeros([BLOCK_K], COMPUTE), joint, 1)
        tl.store(partial_row + classes, _lse_finish(block_max, block_sum), mask=classes < K)

    tl.store(cell_lse_ptr + cell_row, cell_lse, mask=in_n)
    tl.store(log_prior_ptr + cell_row, log_prior, mask=in_n)
    if HAS_LABELS:
        target = tl.load(labels_ptr + b)
        known = (target >= 0) & (target < K)  # an unknown label gives NaN, never an out-of-bounds read
        target_logits = tl.load(s_image + target * stride_sk + offs_n * stride_sn, mask=in_n & known,
                                other=float("nan")).to(COMPUTE)
        tl.store(joint_target_ptr + cell_row, target_logits + shift, mask=in_n)


@triton.jit
def _calm_head_combine_kernel(
    partial_lse_ptr, log_marginal_ptr, joint_target_ptr, labels_ptr,
    K, N, NUM_N_BLOCKS, NUM_K_CHUNKS,
    HAS_LABELS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_BLOCKS: tl.constexpr, BLOCK_CELLS: tl.constexpr,
):
    """One program per (image, chunk of BLOCK_K classes): M_k = logsumexp over the cell blocks of the
    partials. The first chunk's program also turns the target joint into log p(z|x,y=t) = joint - M_t, in
    place. Reads B·NB·K + B·N values, writes B·K + B·N."""
    pid = tl.program_id(0)
    b = pid // NUM_K_CHUNKS
    k_chunk = pid % NUM_K_CHUNKS
    partial_image = partial_lse_ptr + b.to(tl.int64) * NUM_N_BLOCKS * K
    offs_j = tl.arange(0, BLOCK_BLOCKS)
    classes = k_chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    running_max = tl.full([BLOCK_K], float("-inf"), COMPUTE)
    running_sum = tl.zeros([BLOCK_K], COMPUTE)
    for j_start in range(0, NUM_N_BLOCKS, BLOCK_BLOCKS):
        blocks = j_start + offs_j
        mask = (blocks < NUM_N_BLOCKS)[:, None] & (classes < K)[None, :]
        partial = tl.load(partial_image + blocks[:, None] * K + classes[None, :], mask=mask, other=float("-inf"))
        running_max, running_sum = _lse_update(running_max, running_sum, partial, 0)
    tl.store(log_marginal_ptr + b.to(tl.int64) * K + classes, _lse_finish(running_max, running_sum),
             mask=classes < K)

    if HAS_LABELS:
        if k_chunk == 0:
            _write_log_posterior(partial_image, joint_target_ptr + b.to(tl.int64) * N, tl.load(labels_ptr + b),
                                 K, N, NUM_N_BLOCKS, COMPUTE, BLOCK_BLOCKS, BLOCK_CELLS)


@triton.jit
def _write_log_posterior(partial_image, joint_target_row, target, K, N, NUM_N_BLOCKS, COMPUTE: tl.constexpr,
                         BLOCK_BLOCKS: tl.constexpr, BLOCK_CELLS: tl.constexpr):
    """log p(z|x,y=t) = joint[t, z] - M_t over one image's cells, in place; M_t from the partials of t.
    (A function of its own: names inside a run-time `if` must not change the type of names outside it.)"""
    known = (target >= 0) & (target < K)
    offs_j = tl.arange(0, BLOCK_BLOCKS)
    running_max = tl.full([1], float("-inf"), COMPUTE)
    running_sum = tl.zeros([1], COMPUTE)
    for j_start in range(0, NUM_N_BLOCKS, BLOCK_BLOCKS):
        blocks = j_start + offs_j
        mask = (blocks < NUM_N_BLOCKS)[:, None] & known
        partial = tl.load(partial_image + blocks[:, None] * K + target, mask=mask, other=float("-inf"))
        running_max, running_sum = _lse_update(running_max, running_sum, partial, 0)
    log_marginal_target = _lse_finish(running_max, running_sum)
    offs_cells = tl.arange(0, BLOCK_CELLS)
    for n_start in range(0, N, BLOCK_CELLS):
        cells = n_start + offs_cells
        joint_target = tl.load(joint_target_row + cells, mask=cells < N)
        tl.store(joint_target_row + cells, joint_target - log_marginal_target, mask=cells < N)


@triton.jit
def _class_chunk(s_image, grad_row, marginal_row, classes, offs_n, in_n, K, shift,
                 stride_sk, stride_sn, stride_gk, COMPUTE: tl.constexpr):
    """For a chunk of classes: g_k, the logits S[k, z] on the cells and the posteriors
    r[k, z] = exp(S[k, z] + shift_z - M_k)."""
    g = tl.load(grad_row + classes * stride_gk, mask=classes < K, other=0.0).to(COMPUTE)
    marginal = tl.load(marginal_row + classes, mask=classes < K, other=0.0)
    logits = _load_logits(s_image, classes, offs_n, K, in_n, stride_sk, stride_sn, COMPUTE)
    return g, logits, tl.exp(logits + shift[None, :] - marginal[:, None])


@triton.jit
def _store_grad_logits(s_image, grad_s_image, grad_row, marginal_row, classes, offs_n, in_n, K, shift, cell_lse,
                       upstream_per_cell, stride_sk, stride_sn, stride_gk, stride_dsk, stride_dsn,
                       COMPUTE: tl.constexpr):
    """dS[k, z] = g_k r[k, z] - P[k, z] u_z for a chunk of classes, stored in dS's dtype."""
    g, logits, posterior = _class_chunk(s_image, grad_row, marginal_row, classes, offs_n, in_n, K, shift,
                                        stride_sk, stride_sn, stride_gk, COMPUTE)
    class_prob = tl.exp(logits - cell_lse[None, :])
    grad_logits = g[:, None] * posterior - class_prob * upstream_per_cell[None, :]
    pointers = grad_s_image + classes[:, None] * stride_dsk + offs_n[None, :] * stride_dsn
    tl.store(pointers, grad_logits.to(grad_s_image.dtype.element_ty), mask=(classes < K)[:, None] & in_n[None, :])


@triton.jit
def _calm_head_backward_kernel(
    s_ptr, a_ptr, grad_ptr, log_marginal_ptr, cell_lse_ptr, log_prior_ptr, grad_s_ptr, grad_a_ptr,
    K, N, NUM_N_BLOCKS,
    stride_sb, stride_sk, stride_sn, stride_ab, stride_an, stride_gb, stride_gk,
    stride_dsb, stride_dsk, stride_dsn, stride_dab, stride_dan,
    IS_RELU: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (image, block of BLOCK_N cells).

    Reads S[b, :, cells] (DRAM once; the second class loop hits L2), g[b] and M[b] (K each), lse_z,
    log p(z|x) and a for its cells; writes dS[b, :, cells] and da[b, cells] in the inputs' dtypes.
    """
    pid = tl.program_id(0)
    b = pid // NUM_N_BLOCKS
    n_block = pid % NUM_N_BLOCKS
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    s_image = s_ptr + b.to(tl.int64) * stride_sb
    grad_s_image = grad_s_ptr + b.to(tl.int64) * stride_dsb
    grad_row = grad_ptr + b.to(tl.int64) * stride_gb
    marginal_row = log_marginal_ptr + b.to(tl.int64) * K
    cell_row = b.to(tl.int64) * N + offs_n

    cell_lse = tl.load(cell_lse_ptr + cell_row, mask=in_n, other=0.0)
    log_prior = tl.load(log_prior_ptr + cell_row, mask=in_n, other=float("-inf"))
    shift = log_prior - cell_lse  # -inf past N and on zero-prior cells: their posteriors are 0

    # u_z = Σ_k g_k r[k, z], and Σ_k g_k for the softmax prior
    upstream_per_cell = tl.zeros([BLOCK_N], COMPUTE)
    upstream_total = tl.zeros([BLOCK_K], COMPUTE)
    for k_start in range(0, K, BLOCK_K):
        g, _, posterior = _class_chunk(s_image, grad_row, marginal_row, k_start + offs_k, offs_n, in_n, K, shift,
                                       stride_sk, stride_sn, stride_gk, COMPUTE)
        upstream_per_cell += tl.sum(g[:, None] * posterior, axis=0)
        upstream_total += g

    # dS[k, z] = g_k r[k, z] - P[k, z] u_z
    for k_start in range(0, K, BLOCK_K):
        _store_grad_logits(s_image, grad_s_image, grad_row, marginal_row, k_start + offs_k, offs_n, in_n, K,
                           shift, cell_lse, upstream_per_cell, stride_sk, stride_sn, stride_gk, stride_dsk,
                           stride_dsn, COMPUTE)

    if IS_RELU:
        a = tl.load(a_ptr + b.to(tl.int64) * stride_ab + offs_n * stride_an, mask=in_n, other=0.0).to(COMPUTE)
        on = a > 0
        grad_a = tl.where(on, upstream_per_cell / tl.where(on, a, 1.0), 0.0)
    else:
        grad_a = upstream_per_cell - tl.exp(log_prior) * tl.sum(upstream_total, axis=0)
    tl.store(grad_a_ptr + b.to(tl.int64) * stride_dab + offs_n * stride_dan,
             grad_a.to(grad_a_ptr.dtype.element_ty), mask=in_n)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of the kernels: cells per program (block_n) and classes per loop step (block_k), both
    powers of two >= 16, and warps per program. `default_launch_config` picks them from the shape."""

    block_n: int
    block_k: int
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name}={value}: expected a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"LaunchConfig.num_warps={self.num_warps}: expected 1, 2, 4, 8 or 16")


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


def default_launch_config(num_classes: int, num_cells: int, element_size: int = 2) -> LaunchConfig:
    """Blocks for a shape: a program's [K, BLOCK_N] tile near 32 KB, so that the second class loop finds it
    in L2 (see the module docstring), 16 to 64 cells; class chunks of about 4096 elements a tile, spread over
    8 warps (16 values a thread: ptxas gives the sm_90 kernels 64-111 registers and no spills, against
    127-201 with 4 warps). Chosen without a GPU at hand: `calm-fast bench head --configs` measures others."""
    cells_for_l2 = 1 << max(0, (32768 // (num_classes * element_size)).bit_length() - 1)  # power of two below
    block_n = max(16, min(64, cells_for_l2, triton.next_power_of_2(num_cells)))
    block_k = _pow2_between(num_classes, 16, 4096 // block_n)
    return LaunchConfig(block_n=block_n, block_k=block_k, num_warps=8)


def dram_bytes(batch: int, num_classes: int, num_cells: int, element_size: int, block_n: int) -> dict:
    """The DRAM traffic stated in the module docstring, in bytes: {"forward", "backward"} (combine in forward)."""
    b, k, n, e = batch, num_classes, num_cells, element_size
    blocks = math.ceil(n / block_n)
    forward = b * k * n * e + b * n * e + b * blocks * k * 4 + 3 * b * n * 4
    combine = b * blocks * k * 4 + b * k * 4 + 2 * b * n * 4
    backward = 2 * b * k * n * e + 2 * b * k * 4 + b * n * (8 + e) + b * n * e
    return {"forward": forward + combine, "backward": backward}


# ----------------------------------------------------------------------------------------------------------
# Launchers and the autograd.Function


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _forward(class_logits, location_scores, labels, prior, config):
    batch, num_classes, num_cells = class_logits.shape
    compute = _compute_dtype(class_logits, location_scores)
    num_n_blocks = triton.cdiv(num_cells, config.block_n)
    device = class_logits.device
    partial_lse = torch.empty(batch, num_n_blocks, num_classes, device=device, dtype=compute)
    cell_lse = torch.empty(batch, num_cells, device=device, dtype=compute)
    log_prior = torch.empty(batch, num_cells, device=device, dtype=compute)
    log_marginal = torch.empty(batch, num_classes, device=device, dtype=compute)
    log_posterior = torch.empty(batch, num_cells, device=device, dtype=compute) if labels is not None else None
    if batch == 0:
        return log_marginal, log_posterior, cell_lse, log_prior
    has_labels = labels is not None
    labels_arg = labels if has_labels else cell_lse  # never read without labels
    posterior_arg = log_posterior if has_labels else cell_lse  # never written without labels
    cells_block = _pow2_between(num_cells, 16, 1024)
    _calm_head_forward_kernel[(batch * num_n_blocks,)](
        class_logits, location_scores, labels_arg,
        partial_lse, cell_lse, log_prior, posterior_arg,
        num_classes, num_cells, num_n_blocks,
        *class_logits.stride(), *location_scores.stride(),
        IS_RELU=prior == "relu", HAS_LABELS=has_labels, COMPUTE=_triton_dtype(compute),
        BLOCK_K=config.block_k, BLOCK_N=config.block_n,
        BLOCK_PRIOR=cells_block, num_warps=config.num_warps,
    )
    combine_blocks = _pow2_between(num_n_blocks, 16, 64)
    combine_k = _pow2_between(num_classes, 16, 4096 // combine_blocks)
    num_k_chunks = triton.cdiv(num_classes, combine_k)
    _calm_head_combine_kernel[(batch * num_k_chunks,)](
        partial_lse, log_marginal, posterior_arg, labels_arg,
        num_classes, num_cells, num_n_blocks, num_k_chunks,
        HAS_LABELS=has_labels, COMPUTE=_triton_dtype(compute),
        BLOCK_K=combine_k, BLOCK_BLOCKS=combine_blocks, BLOCK_CELLS=cells_block,
        num_warps=4,
    )
    return log_marginal, log_posterior, cell_lse, log_prior


def _backward(grad_log_marginal, class_logits, location_scores, log_marginal, cell_lse, log_prior, prior, config):
    batch, num_classes, num_cells = class_logits.shape
    grad_logits = torch.empty_like(class_logits)  # keeps the input's layout where it is dense
    grad_scores = torch.empty_like(location_scores)
    if batch == 0:
        return grad_logits, grad_scores
    num_n_blocks = triton.cdiv(num_cells, config.block_n)
    _calm_head_backward_kernel[(batch * num_n_blocks,)](
        class_logits, location_scores, grad_log_marginal, log_marginal, cell_lse, log_prior,
        grad_logits, grad_scores,
        num_classes, num_cells, num_n_blocks,
        *class_logits.stride(), *location_scores.stride(), *grad_log_marginal.stride(),
        *grad_logits.stride(), *grad_scores.stride(),
        IS_RELU=prior == "relu", COMPUTE=_triton_dtype(log_marginal.dtype),
        BLOCK_K=config.block_k, BLOCK_N=config.block_n, num_warps=config.num_warps,
    )
    return grad_logits, grad_scores


class CalmHeadFunction(torch.autograd.Function):
    """(S [B,K,N], a [B,N], labels [B] int64 | None, prior, LaunchConfig) -> (log p(y|x) [B,K], log q [B,N] | None).

    Differentiable in S and a through log p(y|x); the log posterior carries no gradient."""

    @staticmethod
    def forward(ctx, class_logits, location_scores, labels, prior, config):
        log_marginal, log_posterior, cell_lse, log_prior = _forward(class_logits, location_scores, labels, prior,
                                                                    config)
        ctx.save_for_backward(class_logits, location_scores, log_marginal, cell_lse, log_prior)
        ctx.prior = prior
        ctx.config = config
        if log_posterior is not None:
            ctx.mark_non_differentiable(log_posterior)
        return log_marginal, log_posterior

    @staticmethod
    def backward(ctx, grad_log_marginal, _grad_log_posterior):
        class_logits, location_scores, log_marginal, cell_lse, log_prior = ctx.saved_tensors
        if grad_log_marginal is None:
            return None, None, None, None, None
        grad_log_marginal = grad_log_marginal.to(log_marginal.dtype)
        grad_logits, grad_scores = _backward(grad_log_marginal, class_logits, location_scores, log_marginal,
                                             cell_lse, log_prior, ctx.prior, ctx.config)
        return (grad_logits if ctx.needs_input_grad[0] else None,
                grad_scores if ctx.needs_input_grad[1] else None, None, None, None)


# ----------------------------------------------------------------------------------------------------------
# Public wrapper


def _check_inputs(class_logits, location_scores, prior, labels):
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r}: expected one of {', '.join(PRIORS)}")
    if not isinstance(class_logits, torch.Tensor) or class_logits.dim() != 3:
        shape = tuple(class_logits.shape) if isinstance(class_logits, torch.Tensor) else type(class_logits)
        raise ValueError(f"class_logits must be a [B, K, N] tensor, got {shape}")
    batch, num_classes, num_cells = class_logits.shape
    if not isinstance(location_scores, torch.Tensor) or tuple(location_scores.shape) != (batch, num_cells):
        shape = tuple(location_scores.shape) if isinstance(location_scores, torch.Tensor) else location_scores
        raise ValueError(f"location_scores must be [B, N] = {(batch, num_cells)}, got {shape}")
    for name, tensor in (("class_logits", class_logits), ("location_scores", location_scores)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}: expected float32, bfloat16, float16 or float64")
    if location_scores.device != class_logits.device:
        raise ValueError(f"location_scores is on {location_scores.device}, class_logits on {class_logits.device}")
    if not class_logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"calm_head needs CUDA tensors (got {class_logits.device}); CPU tensors run only "
                           "under the Triton interpreter, TRITON_INTERPRET=1 set before calm_fast.kernels "
                           "is imported")
    if num_classes < 1 or num_cells < 1:
        raise ValueError(f"class_logits shape {tuple(class_logits.shape)}: K and N must be at least 1")
    if num_classes * num_cells >= 2**31:
        raise ValueError(f"K·N = {num_classes * num_cells} cells·classes per image: must stay below 2**31")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or tuple(labels.shape) != (batch,):
            got = (tuple(labels.shape), labels.dtype) if isinstance(labels, torch.Tensor) else labels
            raise ValueError(f"labels must be an integer tensor of shape [B] = ({batch},), got {got}")
        if labels.device != class_logits.device:
            raise ValueError(f"labels is on {labels.device}, class_logits on {class_logits.device}")
        if not labels.is_cuda and batch and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got values {labels.min().item()} to "
                             f"{labels.max().item()}")


def calm_head(class_logits: torch.Tensor, location_scores: torch.Tensor, prior: str = "relu",
              labels: torch.Tensor | None = None, *, config: LaunchConfig | None = None):
    """The fused CALM head: (log p(y|x) [B, K], log p(z|x, y=labels) [B, N] or None without labels).

    class_logits S [B, K, N] and location_scores a [B, N] in float32, bfloat16, float16 (fp32 math inside)
    or float64 (fp64 math and outputs), any strides, on CUDA (or CPU under TRITON_INTERPRET=1). Outputs are
    fp32 (fp64 for fp64 inputs). log p(y|x) is differentiable in S and a for any upstream gradient; the
    gradients come back in the inputs' dtypes. The log posterior has no gradient; it is -inf on cells with
    zero prior. On CUDA an out-of-range label yields a NaN posterior row (checked eagerly on CPU).
    `config` overrides the block sizes of `default_launch_config` (for tests and tuning).
    """
    _check_inputs(class_logits, location_scores, prior, labels)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    config = config or default_launch_config(class_logits.shape[1], class_logits.shape[2],
                                             class_logits.element_size())
    return CalmHeadFunction.apply(class_logits, location_scores, labels, prior, config)
