"""The fused Triton CALM head (kernels/calm_head.py) against the plain-PyTorch oracle (calm_fast/head.py).

Runs on CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Shapes are small but
chosen so that programs see several cell blocks and class chunks, partly filled ones included (masking).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_fast import head
from calm_fast.modes import Prior
from calm_fast.kernels.calm_head import LaunchConfig, calm_head, default_launch_config


def oracle(class_logits, location_scores, prior, labels):
    """(log p(y|x) [B,K], log p(z|x,y=labels) [B,N]) from the plain-PyTorch head, on [B,K,N] / [B,N] inputs."""
    s, a = class_logits.unsqueeze(-1), location_scores[:, None, :, None]  # as [B,K,N,1] and [B,1,N,1] maps
    log_marginal = head.log_marginal(s, a, prior, backend="torch")
    joint = head.log_joint(s, a, prior)[torch.arange(len(labels)), labels]  # [B, N]
    return log_marginal, joint - torch.logsumexp(joint, dim=1, keepdim=True)


def random_case(batch, classes, cells, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(batch, classes, cells, generator=g)).to(dtype)
    a = torch.randn(batch, cells, generator=g).to(dtype)  # about half the cells have a zero relu prior
    labels = torch.randint(0, classes, (batch,), generator=g)
    upstream = torch.randn(batch, classes, generator=g)  # a general dL/dlog p(y|x), not only a one-hot NLL
    return s, a, labels, upstream


def values_and_gradients(fn, s, a, labels, prior, upstream):
    s = s.detach().clone().requires_grad_()
    a = a.detach().clone().requires_grad_()
    log_marginal, log_posterior = fn(s, a, prior, labels)
    grad_s, grad_a = torch.autograd.grad(log_marginal, (s, a), upstream.to(log_marginal.dtype))
    return log_marginal.detach(), log_posterior.detach(), grad_s, grad_a


SMALL_BLOCKS = LaunchConfig(block_n=16, block_k=16)

# (batch, classes, cells, dtype, config): each line says what it exercises
SWEEP = [
    (1, 2, 1, torch.float32, None),  # one cell, two classes: most of every block is masked
    (3, 5, 12, torch.float32, None),
    (2, 37, 45, torch.bfloat16, SMALL_BLOCKS),  # 3 cell blocks, 3 class chunks, the last ones partial
    (2, 37, 45, torch.float16, SMALL_BLOCKS),
    (2, 70, 100, torch.float32, None),  # default blocks: 2 cell blocks x 2 class chunks
    (1, 1000, 49, torch.bfloat16, None),  # K = 1000 (4 chunks of 256), not a power of two
    (2, 203, 28 * 28, torch.bfloat16, None),  # K = 200-ish at the paper's 28x28, 13 cell blocks
    (1, 3, 56 * 56, torch.float32, None),  # N = 3136: 49 cell blocks in the combine kernel
]


@pytest.mark.parametrize("prior", tuple(Prior))
@pytest.mark.parametrize("batch,classes,cells,dtype,config", SWEEP)
def test_values_and_gradients_match_oracle(batch, classes, cells, dtype, config, prior):
    s, a, labels, upstream = random_case(batch, classes, cells, dtype, seed=classes + cells)
    fused = values_and_gradients(lambda *args: calm_head(*args, config=config), s, a, labels, prior, upstream)
    expected = values_and_gradients(oracle, s, a, labels, prior, upstream)
    log_marginal, log_posterior, grad_s, grad_a = fused
    assert log_marginal.dtype == log_posterior.dtype == torch.float32
    assert grad_s.dtype == grad_a.dtype == dtype
    torch.testing.assert_close(log_marginal, expected[0], rtol=1e-5, atol=1e-5)
    # -inf exactly where the prior is zero, the same finite values elsewhere
    torch.testing.assert_close(log_posterior, expected[1], rtol=1e-5, atol=1e-5)
    # gradients are rounded to the input dtype by both paths; fp32 sums may differ in their last bit first
    torch.testing.assert_close(grad_s, expected[2], **({"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32
                                                       else {}))
    torch.testing.assert_close(grad_a, expected[3], **({"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32
                                                       else {}))


def float64_reference(s, a, prior):
    """log p(y|x) in float64 with the oracle's prior (relu: detached normaliser), for gradient checks."""
    return torch.logsumexp(torch.log_softmax(s, dim=1) + head.log_prior(a, prior)[:, None, :], dim=2)


@pytest.mark.parametrize("batch,classes,cells,config,fast_mode", [
    (1, 4, 5, None, False),  # every entry of the Jacobian, on one block
    (2, 19, 35, SMALL_BLOCKS, True),  # random projections of it, on 3 cell blocks x 2 class chunks
])
def test_gradcheck_float64_softmax_prior(batch, classes, cells, config, fast_mode):
    """The softmax prior is an ordinary function of both inputs: finite differences check the full backward."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(batch, classes, cells, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(batch, cells, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda s, a: calm_head(s, a, "softmax", config=config)[0]  # noqa: E731
    assert fn(s, a).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (s, a), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


def test_gradcheck_float64_relu_prior():
    """Finite differences see the relu prior's normaliser, which the method detaches: they check the
    gradient in S (the normaliser does not depend on S); the gradient in a is checked against the oracle's
    detached-normaliser definition, evaluated in float64."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 9, generator=g, dtype=torch.float64)
    a = torch.where(a.abs() < 0.1, a.sign() * 0.5, a)  # away from the kink of the relu
    s_small = s[:1, :4, :6].detach().requires_grad_()  # every Jacobian entry on a small case
    assert torch.autograd.gradcheck(lambda s: calm_head(s, a[:1, :6], "relu")[0], (s_small,), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)

    upstream = torch.randn(2, 7, generator=g, dtype=torch.float64)
    a_fused = a.clone().requires_grad_()
    a_reference = a.clone().requires_grad_()
    (grad_fused,) = torch.autograd.grad(calm_head(s, a_fused, "relu")[0], a_fused, upstream)
    (grad_reference,) = torch.autograd.grad(float64_reference(s, a_reference, "relu"), a_reference, upstream)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-10, atol=1e-12)
    assert (grad_fused[a <= 0] == 0).all()


@pytest.mark.parametrize("prior", tuple(Prior))
def test_em_and_ml_gradients_agree_and_match_the_torch_backend(prior):
    """Through calm_fast.head: the fused EM and ML losses have the same gradient (Fisher's identity) and
    both equal the oracle's, as do the loss values (EM = ML + H(q))."""
    g = torch.Generator().manual_seed(13)
    s = torch.randn(4, 23, 6, 7, generator=g)
    a = torch.randn(4, 1, 6, 7, generator=g)
    a = a.abs() + 0.05 if prior == "relu" else a  # away from the relu kink, where EM and ML agree exactly
    a[0, 0, 0, :3] = -1.0  # zero-prior cells too
    labels = torch.tensor([22, 0, 5, 5])
    results = {}
    for backend in ("triton", "torch"):
        for objective in ("em", "ml"):
            s_, a_ = s.clone().requires_grad_(), a.clone().requires_grad_()
            loss = head.calm_loss(s_, a_, labels, objective, prior, backend=backend)
            results[backend, objective] = (loss.detach(), *torch.autograd.grad(loss, (s_, a_)))
    for i in (1, 2):
        torch.testing.assert_close(results["triton", "em"][i], results["triton", "ml"][i], rtol=1e-5, atol=1e-7)
    for objective in ("em", "ml"):
        for fused, plain in zip(results["triton", objective], results["torch", objective]):
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    assert results["triton", "em"][0] > results["triton", "ml"][0]  # H(q) > 0 with several nonzero cells


def test_zero_prior_cells_and_all_zero_relu_prior():
    """Cells with relu(a) = 0 get -inf log posterior and zero gradient; an image with relu(a) = 0 everywhere
    gets the uniform prior 1/N and no gradient in a; nothing is NaN."""
    g = torch.Generator().manual_seed(14)
    s = torch.randn(2, 9, 20, generator=g, requires_grad=True)
    a = torch.rand(2, 20, generator=g) + 0.1
    a[0, :7] = torch.tensor([-1.0, -0.5, 0.0, -3.0, 0.0, -0.1, -2.0])
    a[1] = -torch.rand(20, generator=g)  # all-zero prior
    a[1, 4] = 0.0
    a.requires_grad_()
    labels = torch.tensor([3, 8])
    log_marginal, log_posterior = calm_head(s, a, "relu", labels)
    grad_s, grad_a = torch.autograd.grad(log_marginal, (s, a), torch.ones(2, 9))

    assert torch.isinf(log_posterior[0, :7]).all() and torch.isfinite(log_posterior[0, 7:]).all()
    assert (grad_s[0, :, :7] == 0).all() and (grad_a[0, :7] == 0).all()
    assert (grad_a[1] == 0).all() and torch.isfinite(grad_s).all() and torch.isfinite(grad_a).all()
    # the uniform image: p(y|x) = mean over cells of the class softmax, posterior = that class's share
    class_probs = torch.softmax(s[1].detach().double(), dim=0)
    torch.testing.assert_close(log_marginal[1].detach().double(), class_probs.mean(dim=1).log())
    expected_posterior = class_probs[8] / class_probs[8].sum()
    torch.testing.assert_close(log_posterior[1].double().exp(), expected_posterior)


@pytest.mark.parametrize("prior", tuple(Prior))
def test_extreme_logits_stay_finite_and_accurate(prior):
    """Logits and location scores of ±1e4: the results follow the float64 definition to fp32 precision."""
    g = torch.Generator().manual_seed(15)
    s = 1e4 * torch.randn(3, 11, 30, generator=g)
    a = 1e4 * torch.randn(3, 30, generator=g)
    labels = torch.tensor([0, 5, 10])
    upstream = torch.randn(3, 11, generator=g)
    log_marginal, log_posterior, grad_s, grad_a = values_and_gradients(calm_head, s, a, labels, prior, upstream)
    s64, a64 = s.double().requires_grad_(), a.double().requires_grad_()
    expected = float64_reference(s64, a64, prior)
    expected_grads = torch.autograd.grad(expected, (s64, a64), upstream.double())
    for tensor in (log_marginal, grad_s, grad_a):
        assert torch.isfinite(tensor).all()
    assert not torch.isnan(log_posterior).any()
    # log-values of size 1e4 carry an fp32 rounding of about 1e-3
    torch.testing.assert_close(log_marginal.double(), expected.detach(), rtol=1e-6, atol=2e-2)
    torch.testing.assert_close(grad_s.double(), expected_grads[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_a.double(), expected_grads[1], rtol=1e-2, atol=1e-6)


def test_any_strides_give_the_contiguous_results():
    """Channels-last maps (as head.py reshapes them), strided slices, a transposed a and a stride-0 upstream
    gradient are read in place; the gradient of a channels-last input keeps that layout."""
    g = torch.Generator().manual_seed(16)
    s_map = torch.randn(3, 21, 5, 6, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    a_map = torch.randn(3, 1, 5, 6, generator=g).requires_grad_()
    labels = torch.tensor([1, 20, 7])
    loss = head.calm_loss(s_map, a_map, labels, "em", backend="triton")
    grad_s, grad_a = torch.autograd.grad(loss, (s_map, a_map))
    assert grad_s.is_contiguous(memory_format=torch.channels_last)
    expected_loss = head.calm_loss(s_map, a_map, labels, "em", backend="torch")
    expected_s, expected_a = torch.autograd.grad(expected_loss, (s_map, a_map))
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad_s, expected_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_a, expected_a, rtol=1e-5, atol=1e-7)

    wide = torch.randn(3, 42, 30, generator=g)
    s = wide[:, ::2]  # every other class: stride 60 between classes
    a = torch.randn(30, 3, generator=g).t()  # [B, N] with strides (1, 3)
    fused = values_and_gradients(calm_head, s, a, labels, "softmax", torch.ones(1, 1).expand(3, 21))
    expected = values_and_gradients(oracle, s.contiguous(), a.contiguous(), labels, "softmax", torch.ones(3, 21))
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    s = torch.randn(0, 4, 6, requires_grad=True)
    log_marginal, log_posterior = calm_head(s, torch.randn(0, 6), "relu", torch.zeros(0, dtype=torch.long))
    assert log_marginal.shape == (0, 4) and log_posterior.shape == (0, 6)
    assert torch.autograd.grad(log_marginal.sum(), s)[0].shape == (0, 4, 6)


def test_default_launch_config_keeps_a_program_tile_near_32_kb():
    # 32768 / (200·2) = 81.9 cells -> 64; 32768 / (1000·2) = 16.4 -> 16; 32768 / (200·4) = 40.96 -> 32
    assert default_launch_config(200, 784, 2).block_n == 64
    assert default_launch_config(1000, 784, 2).block_n == 16
    assert default_launch_config(200, 784, 4).block_n == 32
    assert default_launch_config(7, 5, 2).block_n == 16  # never below 16 cells, a GPU-safe block
    for classes, cells, element_size in [(200, 784, 2), (1000, 3136, 4), (3, 1, 2), (50000, 49, 2)]:
        config = default_launch_config(classes, cells, element_size)
        assert config.block_n * config.block_k <= 4096 and config.block_k >= 16
    with pytest.raises(ValueError, match="block_n=24"):
        LaunchConfig(block_n=24, block_k=16)


def test_bad_inputs_name_the_argument():
    s, a = torch.randn(2, 3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="prior='gaussian'"):
        calm_head(s, a, "gaussian")
    with pytest.raises(ValueError, match=r"class_logits must be a \[B, K, N\]"):
        calm_head(s[0], a)
    with pytest.raises(ValueError, match=r"location_scores must be \[B, N\] = \(2, 4\)"):
        calm_head(s, a[:, :3])
    with pytest.raises(TypeError, match="class_logits has dtype torch.int64"):
        calm_head(s.long(), a)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        calm_head(s, a, "relu", torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        calm_head(s, a, "relu", torch.tensor([0.0, 1.0]))


def test_bench_head_smoke_on_cpu(tmp_path):
    """`calm-fast bench head --device cpu` runs its correctness checks and timings under the interpreter and
    writes JSON (the GPU run uses the same code with the paper's shapes, and adds the compiled paths)."""
    from calm_fast import cli

    out = tmp_path / "head.json"
    status = cli.main(["bench", "head", "--device", "cpu", "--shapes", "2x10x3x5", "--rep", "1",
                       "--out", str(out)])
    results = json.loads(out.read_text())
    assert status == 0
    assert results["correctness"] and all(case["passed"] for case in results["correctness"])
    rows = {(row["layout"], row["path"]): row for row in results["benchmarks"]}
    assert set(rows) == {("contiguous", "fused"), ("contiguous", "oracle"), ("channels_last", "fused"),
                         ("channels_last", "fused merged"), ("channels_last", "oracle")}
    for (layout, _), row in rows.items():
        assert (row["batch"], row["classes"], row["height"], row["width"]) == (2, 10, 3, 5)
        wall = row["wall_ms"]
        assert results["repeats"] == 3 and 0 < wall["min"] <= wall["median"] <= wall["max"]
        assert row["device_ms"] is None and row["minimum_bytes"] == 3 * 2 * 10 * 15 * 2
        oracle_wall = rows[layout, "oracle"]["wall_ms"]["median"]
        assert math.isclose(row["speedup_vs_oracle"], oracle_wall / wall["median"], rel_tol=1e-9)


# Compiles the kernels for an H100 (sm_90) without a GPU, with the interpreter off: the interpreter runs
# the kernels as Python and accepts code that the Triton compiler rejects (a name whose type changes inside
# a run-time `if`, for one). ptxas then reports the spills of each variant.
SM90_COMPILE_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from calm_fast.kernels import calm_head as ch

def spill_bytes(kernel, types, constexprs, num_warps):
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        open(ptx, "w").write(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o", ptx + ".cubin"],
                                capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", report).group(1))

def types(logits, buffers):
    return {"s_ptr": logits, "a_ptr": logits, "grad_s_ptr": logits, "grad_a_ptr": logits, "labels_ptr": "*i64",
            **{n: buffers for n in ("partial_lse_ptr", "cell_lse_ptr", "log_prior_ptr", "joint_target_ptr",
                                    "grad_ptr", "log_marginal_ptr")}}

paper_k200, paper_k1000 = ch.default_launch_config(200, 784, 2), ch.default_launch_config(1000, 784, 2)
variants = []
for config, logits, relu, labels in ((paper_k200, "*bf16", True, True), (paper_k1000, "*fp16", False, False),
                                     (paper_k1000, "*fp32", True, True)):
    blocks = dict(BLOCK_K=config.block_k, BLOCK_N=config.block_n)
    variants.append(("forward", ch._calm_head_forward_kernel, types(logits, "*fp32"),
                     dict(IS_RELU=relu, HAS_LABELS=labels, COMPUTE=tl.float32, BLOCK_PRIOR=1024, **blocks),
                     config.num_warps))
    variants.append(("backward", ch._calm_head_backward_kernel, types(logits, "*fp32"),
                     dict(IS_RELU=relu, COMPUTE=tl.float32, **blocks), config.num_warps))
# one cell: Triton passes N == 1 and unit strides as constants
variants.append(("forward N=1", ch._calm_head_forward_kernel, types("*bf16", "*fp32"),
                 dict(N=1, stride_sn=1, stride_an=1, IS_RELU=True, HAS_LABELS=True, COMPUTE=tl.float32,
                      BLOCK_K=16, BLOCK_N=16, BLOCK_PRIOR=16), 8))
for labels in (True, False):
    variants.append(("combine", ch._calm_head_combine_kernel, types("*bf16", "*fp32"),
                     dict(HAS_LABELS=labels, COMPUTE=tl.float32, BLOCK_K=64, BLOCK_BLOCKS=64, BLOCK_CELLS=1024), 4))
fp64 = [("forward fp64", ch._calm_head_forward_kernel, types("*fp64", "*fp64"),
         dict(IS_RELU=False, HAS_LABELS=True, COMPUTE=tl.float64, BLOCK_K=16, BLOCK_N=16, BLOCK_PRIOR=64), 4),
        ("backward fp64", ch._calm_head_backward_kernel, types("*fp64", "*fp64"),
         dict(IS_RELU=True, COMPUTE=tl.float64, BLOCK_K=16, BLOCK_N=16), 4),
        ("combine fp64", ch._calm_head_combine_kernel, types("*fp64", "*fp64"),
         dict(HAS_LABELS=True, COMPUTE=tl.float64, BLOCK_K=16, BLOCK_BLOCKS=16, BLOCK_CELLS=64), 4)]
for name, kernel, pointer_types, constexprs, num_warps in variants + fp64:
    spills = spill_bytes(kernel, pointer_types, constexprs, num_warps)
    print(name, spills)
    if spills and "fp64" not in name:
        sys.exit(f"{name}: {spills} bytes of register spills")
"""


def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia.compiler")
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", SM90_COMPILE_SCRIPT], env=environment, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 12
