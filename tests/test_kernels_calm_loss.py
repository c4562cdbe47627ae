"""The fused CALM training loss (kernels/calm_loss.py) against the plain-PyTorch oracle (calm_fast/head.py).

Runs on CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with few programs per
launch: small maps and 16-wide blocks, so programs see several cell blocks and class chunks, partial ones
included (masking), in both layouts and on merged class + location maps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from calm_fast import head
from calm_fast.modes import Method, Prior
from calm_fast.kernels import calm_loss as loss_kernel
from calm_fast.kernels.calm_loss import calm_loss

LAYOUTS = ("contiguous", "channels_last", "strided", "merged")


def test_the_fused_loss_implements_the_objective_of_every_calm_method():
    # kernels/ cannot import calm_fast.modes, so its own list must agree with the modes (CAM's objective,
    # plain cross-entropy, never reaches the fused kernel).
    calm_objectives = {method.objective for method in Method if method.has_location_head}
    assert set(loss_kernel.OBJECTIVES) == calm_objectives


def make_inputs(batch, classes, height, width, layout, dtype, seed, scale=3.0):
    """(scores, location or None for merged maps, labels). "strided": a channel slice of a wider
    channels-last map (no stride a multiple of 8); "merged": channels-last [B, C, H, W] with the K class
    channels, the location channel K and zero padding up to a multiple of 8 channels, as the model makes."""
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(batch, classes, height, width, generator=g)
    a = torch.randn(batch, 1, height, width, generator=g)  # about half the cells have a zero relu prior
    labels = torch.randint(0, classes, (batch,), generator=g)
    if layout == "merged":
        channels = -(-(classes + 1) // 8) * 8
        pad = torch.zeros(batch, channels - classes - 1, height, width)
        merged = torch.cat([s, a, pad], dim=1).to(dtype).contiguous(memory_format=torch.channels_last)
        return merged, None, labels
    if layout == "channels_last":
        s = s.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.randn(batch, classes + 3, height, width, generator=g).contiguous(memory_format=torch.channels_last)
        wide[:, 1:classes + 1] = s
        s = wide[:, 1:classes + 1]
    return s.to(dtype), a.to(dtype), labels


def oracle(scores, location, labels, classes, objective, prior):
    if location is None:
        scores, location = scores[:, :classes], scores[:, classes:classes + 1]
    return head.calm_loss(scores, location, labels, objective, prior, backend="torch")


def fused(scores, location, labels, classes, objective, prior, **blocks):
    return calm_loss(scores, labels, classes, prior, objective, location=location, **blocks)


def loss_and_grads(loss_fn, scores, location, labels, classes, objective, prior, **blocks):
    """A total loss that scales the CALM loss (upstream gradient 2.5, not 1) and adds another term of the
    inputs; its value and the gradients of every input."""
    leaves = [t.detach().clone().requires_grad_() for t in (scores, location) if t is not None]
    scores, location = leaves[0], leaves[1] if len(leaves) > 1 else None
    calm = loss_fn(scores, location, labels, classes, objective, prior, **blocks)
    total = 2.5 * calm + 0.01 * (scores.float() ** 2).mean()
    return (calm.detach(), *torch.autograd.grad(total, leaves))


CASES = [  # (batch, classes, height, width, layout, dtype, blocks)
    (2, 37, 5, 9, "contiguous", torch.bfloat16, {"block_n": 16, "block_k": 16}),  # 3 cell blocks, 3 chunks
    (2, 37, 5, 9, "channels_last", torch.float32, {"block_n": 16, "block_k": 16}),
    (2, 21, 4, 5, "strided", torch.float32, {"block_n": 16, "block_k": 16}),
    (2, 45, 4, 6, "merged", torch.bfloat16, {"block_n": 16, "block_k": 16}),  # 48 channels, 3 pad
    (1, 200, 3, 5, "merged", torch.bfloat16, {}),  # K = 200 at the default blocks: 8-element vectors
    (3, 5, 1, 1, "contiguous", torch.float32, {}),  # one cell per image
]


@pytest.mark.parametrize("prior", tuple(Prior))
@pytest.mark.parametrize("objective", ("em", "ml"))
@pytest.mark.parametrize("batch,classes,height,width,layout,dtype,blocks", CASES)
def test_loss_and_gradients_match_oracle(batch, classes, height, width, layout, dtype, blocks, objective, prior):
    scores, location, labels = make_inputs(batch, classes, height, width, layout, dtype, seed=classes + width)
    got = loss_and_grads(fused, scores, location, labels, classes, objective, prior, **blocks)
    want = loss_and_grads(oracle, scores, location, labels, classes, objective, prior)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for grad, expected in zip(got[1:], want[1:]):
        # both round an fp32 gradient to the input dtype; fp32 sums may differ in their last bit first
        torch.testing.assert_close(grad, expected, **({"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32
                                                      else {}))
    if layout == "merged":
        assert (got[1][:, classes + 1:] == 0).all()  # the padding channels get zero gradient, not garbage


def test_all_zero_relu_prior_and_zero_prior_cells():
    """An image with relu(a) = 0 everywhere gets the uniform prior and no gradient in a; cells with a zero
    prior carry no gradient; nothing is NaN."""
    scores, location, labels = make_inputs(3, 9, 4, 5, "channels_last", torch.float32, seed=3)
    location[0] = -location[0].abs()
    location[1, 0, :2] = 0.0
    for objective in ("em", "ml"):
        got = loss_and_grads(fused, scores, location, labels, 9, objective, "relu", block_n=16, block_k=16)
        want = loss_and_grads(oracle, scores, location, labels, 9, objective, "relu")
        for value, expected in zip(got, want):
            assert torch.isfinite(value).all()
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        assert (got[2][0] == 0).all() and (got[2][1, 0, :2] == 0).all()
        leaf = scores.clone().requires_grad_()
        (extra_only,) = torch.autograd.grad(0.01 * (leaf ** 2).mean(), leaf)
        assert torch.equal(got[1][1, :, :2], extra_only[1, :, :2])  # the CALM loss adds exactly nothing there


@pytest.mark.parametrize("prior", tuple(Prior))
def test_extreme_logits_stay_finite_and_accurate(prior):
    """Logits and location scores of ±1e4: finite, and the oracle's values to fp32 precision."""
    scores, location, labels = make_inputs(2, 11, 3, 6, "contiguous", torch.float32, seed=4, scale=1e4)
    location = location * 1e4
    for objective in ("em", "ml"):
        got = loss_and_grads(fused, scores, location, labels, 11, objective, prior, block_n=16, block_k=16)
        want = loss_and_grads(oracle, scores, location, labels, 11, objective, prior)
        assert all(torch.isfinite(value).all() for value in got)
        # log-values of size 1e4 carry an fp32 rounding of about 1e-3
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=2e-2)
        for grad, expected in zip(got[1:], want[1:]):
            torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-3)


def test_gradcheck_float64():
    """Finite differences check the whole backward in float64: the softmax prior in S and a; the relu prior
    in S (its normaliser is detached by definition, so finite differences in a would not match)."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64).abs().add(0.1).requires_grad_()
    check = {"eps": 1e-6, "atol": 1e-8, "rtol": 1e-6, "fast_mode": True}  # random projections of the Jacobian
    labels = torch.tensor([3, 0])
    for objective in ("ml", "em"):  # EM's value differs by H(q), whose gradient its definition drops
        em = objective == "em"
        softmax = lambda s, a: calm_loss(s, labels, 4, "softmax", objective, location=a)  # noqa: E731
        relu = lambda s: calm_loss(s, labels, 4, "relu", objective, location=a)  # noqa: E731
        assert softmax(s, a).dtype == torch.float64
        if not em:
            assert torch.autograd.gradcheck(softmax, (s, a), **check)
            assert torch.autograd.gradcheck(relu, (s,), **check)
        else:  # the EM gradient is the ML gradient
            ml_grads = torch.autograd.grad(calm_loss(s, labels, 4, "softmax", "ml", location=a), (s, a))
            em_grads = torch.autograd.grad(softmax(s, a), (s, a))
            for em_grad, ml_grad in zip(em_grads, ml_grads):
                torch.testing.assert_close(em_grad, ml_grad, rtol=1e-12, atol=1e-14)


def test_results_are_bitwise_identical_across_calls():
    scores, location, labels = make_inputs(3, 37, 5, 9, "merged", torch.bfloat16, seed=6)
    first = loss_and_grads(fused, scores, location, labels, 37, "em", "relu", block_n=16, block_k=16)
    second = loss_and_grads(fused, scores, location, labels, 37, "em", "relu", block_n=16, block_k=16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops run below the custom op (re-entering itself inside it), except those the Triton
    interpreter runs while it executes a kernel. `_local_scalar_dense` is what .item(), bool() and int()
    of a tensor run: a device-to-host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.inside_kernel = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "calm_fast":  # run its CPU kernel with this mode active again
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        if not self.inside_kernel:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


ALLOCATING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "full"}
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias"}


def test_two_launches_per_direction_no_host_sync_one_autograd_node(monkeypatch):
    """The forward and the backward each run <= 2 kernels (Triton launches + aten ops that write memory),
    <= 4 allocations, nothing that reads a device value on the host; the loss has one autograd node whose
    inputs are the leaves themselves (no view, cast or arithmetic node around the op)."""
    from triton.runtime.interpreter import InterpretedFunction

    recorder = _OpRecorder()
    launches = []
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        recorder.inside_kernel = True
        try:
            return run(self, *args, **kwargs)
        finally:
            recorder.inside_kernel = False

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    scores, _, labels = make_inputs(2, 37, 5, 9, "merged", torch.bfloat16, seed=7)
    scores.requires_grad_()
    upstream = torch.tensor(2.5)
    directions = {}
    for direction in ("forward", "backward"):
        launches.clear()
        recorder.ops.clear()
        with recorder:
            if direction == "forward":
                loss = calm_loss(scores, labels, 37, "relu", "em", block_n=16, block_k=16)
            else:
                loss.backward(upstream)
        names = [op.overloadpacket.__name__ for op in recorder.ops]
        directions[direction] = (list(launches), names)
        writing = [name for name, op in zip(names, recorder.ops) if name not in NO_LAUNCH and not op.is_view]
        assert "_local_scalar_dense" not in names, (direction, names)
        assert not any(name in ("_to_copy", "to", "cpu") for name in names), (direction, names)
        assert len(launches) + len(writing) <= 2, (direction, launches, writing)
        assert sum(name in ALLOCATING for name in names) <= 4, (direction, names)
    assert directions["forward"][0] == ["_calm_loss_forward_kernel"]
    assert directions["backward"][0] == ["_calm_loss_backward_kernel"]
    assert [type(fn).__name__ for fn, _ in loss.grad_fn.next_functions if fn is not None] == ["AccumulateGrad"]
    assert scores.grad.shape == scores.shape and scores.grad.stride() == scores.stride()


def test_torch_library_opcheck():
    """Schema, autograd registration and fake (meta) implementations pass torch.library.opcheck. Its
    test_aot_dispatch_static/dynamic trace the op body with fake tensors: on a GPU wrap_triton turns the
    kernel calls into graph nodes, but under the Triton interpreter (CPU) wrap_triton hands back the plain
    interpreted kernel, which would read the fake tensors' data, so those two run in benchmarks/gpu only."""
    scores, location, labels = make_inputs(2, 19, 3, 5, "channels_last", torch.float32, seed=8)
    for requires_grad in (False, True):
        args = (scores.clone().requires_grad_(requires_grad), location.clone().requires_grad_(requires_grad),
                labels, 19, "relu", "em", 16, 16, 4)
        results = torch.library.opcheck(torch.ops.calm_fast.calm_loss.default, args,
                                        test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor"))
        assert set(results.values()) == {"SUCCESS"}, results
    merged, _, labels = make_inputs(2, 19, 3, 5, "merged", torch.float32, seed=8)
    saved = torch.ops.calm_fast.calm_loss(merged, None, labels, 19, "softmax", "ml", 16, 16, 4)[1]
    results = torch.library.opcheck(torch.ops.calm_fast.calm_loss_backward.default,
                                    (torch.tensor(1.5), merged, None, labels, saved, 19, "softmax", 16, 16, 4),
                                    test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_keeps_the_op_in_one_graph():
    """fullgraph=True fails on any graph break; the graph dynamo hands over calls the op (the eager backend
    then runs it: Inductor's lowering of the Triton kernels needs a GPU)."""
    targets = []

    def recording_backend(graph_module, example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    scores, _, labels = make_inputs(2, 13, 3, 5, "merged", torch.float32, seed=9)
    step = torch.compile(lambda s, y: calm_loss(s, y, 13, "relu", "em", block_n=16, block_k=16) * 2.0,
                         fullgraph=True, backend=recording_backend)
    compiled = loss_and_grads(lambda s, a, y, *_: step(s, y) / 2.0, scores, None, labels, 13, "em", "relu")
    eager = loss_and_grads(fused, scores, None, labels, 13, "em", "relu", block_n=16, block_k=16)
    assert torch.ops.calm_fast.calm_loss in targets  # the op itself, not its pieces
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    scores, location, labels = make_inputs(2, 5, 2, 3, "contiguous", torch.float32, seed=10)
    with pytest.raises(ValueError, match="prior='gaussian'"):
        calm_loss(scores, labels, 5, "gaussian", location=location)
    with pytest.raises(ValueError, match="objective='cam'"):
        calm_loss(scores, labels, 5, "relu", "cam", location=location)
    with pytest.raises(ValueError, match="scores has 5 channels for num_classes=5: expected at least K \\+ 1"):
        calm_loss(scores, labels, 5)
    with pytest.raises(ValueError, match="scores has 5 channels for num_classes=4: expected K channels"):
        calm_loss(scores, labels, 4, location=location)
    with pytest.raises(ValueError, match=r"location must be \[B, 1, H, W\]"):
        calm_loss(scores, labels, 5, location=location[:, :, :1])
    with pytest.raises(ValueError, match="labels must be an int64 tensor"):
        calm_loss(scores, labels.int(), 5, location=location)
    with pytest.raises(TypeError, match="scores has dtype torch.int64"):
        calm_loss(scores.long(), labels, 5, location=location)
    with pytest.raises(ValueError, match="block_n=24"):
        calm_loss(scores, labels, 5, location=location, block_n=24)


# Compiles the kernels for an H100 (sm_90) without a GPU, with the interpreter off, from the arguments the
# launcher passes at run time (the op bodies run with CPU tensors and a stand-in for wrap_triton that
# records each launch), specialised as Triton's launcher specialises them (16-byte aligned pointers and
# integers divisible by 16 marked so). ptxas reports registers and spills; the PTX shows the accesses.
SM90_COMPILE_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from calm_fast.kernels import calm_loss as cl

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
launches = []


class RecordLaunch:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


cl.wrap_triton = RecordLaunch
os.environ["TRITON_INTERPRET"] = "1"  # set after the import (the kernels stay compilable): CPU tensors pass


def compile_launch(kernel, args, kwargs):
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound, specialization, options)
    ptx = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                         options=options.__dict__).asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        open(path, "w").write(ptx)
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx)),
            "vector_loads_through_l1": len(re.findall(r"ld\.global\.v[248]\.", ptx)),  # not the .cg reads
            "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]\.", ptx)),
            "scalar_16bit_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx))}


results = {}
for classes, layout, dtype, prior, objective in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    channels = -(-(classes + 1) // 8) * 8 if layout == "merged" else classes
    scores = torch.empty(2, channels, 28, 28, dtype=dtype)
    if layout != "contiguous":
        scores = scores.contiguous(memory_format=torch.channels_last)
    location = None if layout == "merged" else torch.empty(2, 1, 28, 28, dtype=dtype)
    labels = torch.zeros(2, dtype=torch.int64)
    launches.clear()
    _, saved = torch.ops.calm_fast.calm_loss(scores, location, labels, classes, prior, objective, 0, 0, 0)
    torch.ops.calm_fast.calm_loss_backward(torch.ones(()), scores, location, labels, saved, classes, prior, 0, 0, 0)
    for kernel, args, kwargs in launches:
        direction = "forward" if "forward" in kernel.fn.__name__ else "backward"
        key = f"{direction} K={classes} {layout} {dtype} {prior} {objective}".replace("torch.", "")
        results[key] = {**compile_launch(kernel, args, kwargs), "align": kwargs["ALIGN"]}
print(json.dumps(results))
"""

SM90_VARIANTS = [  # (classes, layout, dtype, prior, objective): the paper's shapes in both layouts, and others
    *[(k, layout, "bfloat16", "relu", "em") for k in (200, 1000) for layout in ("contiguous", "channels_last",
                                                                                 "merged")],
    (1000, "contiguous", "float16", "softmax", "ml"),
    (200, "merged", "float32", "softmax", "em"),
]
REGISTER_BUDGET = 96  # per thread: 5 programs of 4 warps fit an SM's 64 K registers


def compile_for_sm90(variants):
    pytest.importorskip("triton.backends.nvidia.compiler")
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", SM90_COMPILE_SCRIPT, json.dumps(variants)], env=environment,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_kernels_compile_for_sm90_with_vector_accesses_in_both_layouts():
    """With the launcher's specialisation, the tile of S is read (and dS written) with 16-byte vector
    accesses in both layouts at K = 200 and 1000, within the register budget and without spills; the only
    16-bit scalar loads left are the per-cell gathers (target logit forward, location score backward). The
    control case (strides of 203 elements, no alignment to prove) shows the check can fail. (On merged maps
    the location channel is a strided gather, scalar by nature; there the tile is the only vector load
    through L1, the finishing program's reads of saved values going .cg.)"""
    results = compile_for_sm90(SM90_VARIANTS + [(203, "channels_last", "bfloat16", "relu", "em")])
    assert len(results) == 2 * (len(SM90_VARIANTS) + 1)
    for name, report in results.items():
        assert report["spill_bytes"] == 0, (name, report)
        assert report["registers"] <= REGISTER_BUDGET, (name, report)
        if "K=203" in name:  # 4 values of the tile per thread, each a scalar load
            assert report["align"] == 1 and report["scalar_16bit_loads"] >= 4, (name, report)
            continue
        assert report["align"] == 16 // (4 if "float32" in name else 2), (name, report)
        assert report["vector_loads"] >= 1, (name, report)
        if "backward" in name:
            assert report["vector_stores"] >= 1, (name, report)
        if "merged" in name:
            assert report["vector_loads_through_l1"] >= 1, (name, report)
        elif "float32" not in name:
            assert report["scalar_16bit_loads"] <= 1, (name, report)


@pytest.mark.parametrize("objective", ("em", "ml"))
def test_head_dispatches_to_the_fused_op(objective):
    """calm_fast.head with backend "triton" (the default on CUDA): calm_loss and merged_loss run the fused op
    (one autograd node) and agree with the torch backend."""
    merged, _, labels = make_inputs(2, 13, 3, 5, "merged", torch.float32, seed=11)
    separate = (merged[:, :13].contiguous(), merged[:, 13:14].contiguous())

    def merged_loss(inputs, backend):
        return head.merged_loss(inputs[0], labels, 13, objective, backend=backend)

    def calm_loss_of_two(inputs, backend):
        return head.calm_loss(inputs[0], inputs[1], labels, objective, backend=backend)

    for loss_fn, inputs in ((merged_loss, (merged,)), (calm_loss_of_two, separate)):
        results = {}
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in inputs]
            loss = loss_fn(leaves, backend)
            results[backend] = (loss, *torch.autograd.grad(loss, leaves))
        assert results["triton"][0].grad_fn.name() == "GeneratedBackwardFor_calm_fast_calm_loss_defaultBackward"
        for got, want in zip(results["triton"], results["torch"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
