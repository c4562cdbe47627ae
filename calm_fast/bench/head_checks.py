"""On-device checks of the fused CALM head for `calm-fast bench head`, run before it times anything.

Values: the fused training loss (calm_fast.kernels.calm_loss, on separate and on merged maps) and the fused
all-class marginal used in evaluation (calm_fast.kernels.calm_head) against the plain-PyTorch oracle of
calm_fast.head, with their gradients, over dtypes, layouts and edge cases (zero priors, logits of ±1e4).
Contracts (CUDA only; the CPU tests cover what the interpreter can show): bitwise-identical results on
repeated calls, no host synchronisation (CUDA's sync debug mode set to error), at most two kernels per
direction (profiler), capture and replay in a CUDA graph, torch.compile(fullgraph=True) with Inductor, and
every torch.library.opcheck test, the AOT-dispatch ones included.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch

from calm_fast import head


@dataclass(frozen=True)
class CheckCase:
    batch: int
    classes: int
    height: int
    width: int
    dtype: torch.dtype
    prior: str
    channels_last: bool = False
    zero_prior_image: bool = False  # image 0 gets relu(a) = 0 everywhere, cells of image 1 partly zero
    scale: float = 3.0  # logits ~ scale · N(0, 1); 1e4 checks the extreme-logit stability

    def name(self) -> str:
        extras = [x for x, on in (("channels_last", self.channels_last), ("zero_prior", self.zero_prior_image),
                                  (f"scale={self.scale:g}", self.scale != 3.0)) if on]
        dtype = str(self.dtype).removeprefix("torch.")
        return " ".join([f"{self.batch}x{self.classes}x{self.height}x{self.width}", dtype, self.prior, *extras])


GPU_CASES = (
    CheckCase(8, 200, 28, 28, torch.bfloat16, "relu"),
    CheckCase(8, 200, 28, 28, torch.bfloat16, "relu", channels_last=True),
    CheckCase(8, 1000, 28, 28, torch.bfloat16, "softmax", channels_last=True),
    CheckCase(4, 1000, 28, 28, torch.float16, "relu", zero_prior_image=True),
    CheckCase(5, 37, 7, 9, torch.float32, "relu", channels_last=True, zero_prior_image=True),
    CheckCase(3, 203, 56, 56, torch.float32, "softmax"),
    CheckCase(4, 200, 28, 28, torch.float32, "relu", scale=1e4),
    CheckCase(4, 200, 28, 28, torch.float32, "softmax", scale=1e4),
    CheckCase(3, 11, 5, 6, torch.float64, "relu", zero_prior_image=True),
)
CPU_CASES = (
    CheckCase(2, 37, 5, 9, torch.bfloat16, "relu", zero_prior_image=True),
    CheckCase(2, 70, 10, 10, torch.float32, "softmax", channels_last=True),
    CheckCase(2, 11, 5, 6, torch.float32, "relu", scale=1e4),
    CheckCase(2, 5, 3, 4, torch.float64, "softmax"),
)


def merge_maps(class_logits: torch.Tensor, location_scores: torch.Tensor) -> torch.Tensor:
    """Channels-last merged head maps as models.wsol makes them: K class channels, the location channel,
    zero padding up to a multiple of 8 channels."""
    batch, classes, height, width = class_logits.shape
    padding = class_logits.new_zeros(batch, -(classes + 1) % 8, height, width)
    merged = torch.cat([class_logits, location_scores, padding], dim=1)
    return merged.contiguous(memory_format=torch.channels_last)


def case_inputs(case: CheckCase, device: torch.device):
    g = torch.Generator().manual_seed(case.classes * 1000 + case.height)
    s = case.scale * torch.randn(case.batch, case.classes, case.height, case.width, generator=g)
    a = (case.scale if case.scale != 3.0 else 1.0) * torch.randn(case.batch, 1, case.height, case.width, generator=g)
    if case.zero_prior_image:
        a[0] = -a[0].abs()
        if case.batch > 1:
            a[1, :, : case.height // 2] = 0.0
    labels = torch.randint(0, case.classes, (case.batch,), generator=g)
    upstream = torch.randn(case.batch, case.classes, generator=g)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    s = s.to(device=device, dtype=case.dtype).contiguous(memory_format=memory_format)
    return s, a.to(device=device, dtype=case.dtype), labels.to(device), upstream.to(device)


def _outputs(s, a, labels, upstream, prior, fused: bool) -> dict:
    """The all-class marginal and the target's log posterior with their gradients under `upstream`
    (evaluation path), and the EM loss with its gradients on separate and on merged maps (training path)."""
    from calm_fast.kernels.calm_head import calm_head  # lazy: Triton picks CPU/GPU at import

    backend = "triton" if fused else "torch"
    s, a = s.detach().requires_grad_(), a.detach().requires_grad_()
    b, k, h, w = s.shape
    if fused:
        log_marginal, log_posterior = calm_head(s.reshape(b, k, h * w), a.reshape(b, h * w), prior, labels)
    else:
        log_marginal = head.log_marginal(s, a, prior, backend="torch")
        joint = head.log_joint(s, a, prior)[torch.arange(b, device=s.device), labels]
        log_posterior = joint - torch.logsumexp(joint, dim=1, keepdim=True)
    grad_s, grad_a = torch.autograd.grad(log_marginal, (s, a), upstream.to(log_marginal.dtype))
    loss = head.calm_loss(s, a, labels, "em", prior, backend=backend)
    loss_grad_s, loss_grad_a = torch.autograd.grad(loss, (s, a))
    merged = merge_maps(s.detach(), a.detach()).requires_grad_()
    merged_loss = head.merged_loss(merged, labels, k, "em", prior, backend=backend)
    (merged_grad,) = torch.autograd.grad(3.0 * merged_loss, merged)
    return {"log_marginal": log_marginal.detach(), "log_posterior": log_posterior.detach(), "grad_logits": grad_s,
            "grad_scores": grad_a, "em_loss": loss.detach(), "em_grad_logits": loss_grad_s,
            "em_grad_scores": loss_grad_a, "merged_em_loss": merged_loss.detach(), "merged_em_grad": merged_grad}


def _tolerance(case: CheckCase, name: str) -> dict:
    if case.scale > 100:  # log-values of size 1e4 carry an fp32 rounding of about 1e-3
        return {"rtol": 1e-2, "atol": 2e-2}
    if "grad" in name and case.dtype in (torch.bfloat16, torch.float16):
        return {}  # torch's defaults for the dtype: one rounding of the fp32 gradient apart
    return {"rtol": 1e-4, "atol": 1e-5}


def value_checks(device: torch.device) -> list[dict]:
    results = []
    for case in GPU_CASES if device.type == "cuda" else CPU_CASES:
        s, a, labels, upstream = case_inputs(case, device)
        fused = _outputs(s, a, labels, upstream, case.prior, fused=True)
        plain = _outputs(s, a, labels, upstream, case.prior, fused=False)
        errors, failures = {}, []
        for name, got in fused.items():
            want = plain[name]
            finite = torch.isfinite(want)
            errors[name] = float((got.double() - want.double())[finite].abs().max()) if finite.any() else 0.0
            try:
                # fp64 inputs: the fused ops compute and return fp64, the oracle fp32
                torch.testing.assert_close(got, want, check_dtype=case.dtype != torch.float64,
                                           **_tolerance(case, name))
            except AssertionError as error:
                failures.append(f"{name}: {str(error).splitlines()[0]}")
        results.append({"check": case.name(), "passed": not failures, "max_abs_error": errors,
                        "failures": failures})
    return results


# ----------------------------------------------------------------------------------------------------------
# Contracts of the fused loss op, CUDA only


def _training_inputs(device, batch=16, classes=200, side=28):
    g = torch.Generator(device=device).manual_seed(1)
    s = torch.randn(batch, classes, side, side, generator=g, device=device)
    a = torch.randn(batch, 1, side, side, generator=g, device=device)
    labels = torch.randint(0, classes, (batch,), generator=g, device=device)
    return merge_maps(s, a).to(torch.bfloat16).requires_grad_(), labels, classes


def _fused_step(maps, labels, classes):
    loss = head.merged_loss(maps, labels, classes, "em", "relu", backend="triton")
    (grad,) = torch.autograd.grad(loss, maps)
    return loss, grad


def _check_deterministic(device):
    maps, labels, classes = _training_inputs(device)
    first, second = _fused_step(maps, labels, classes), _fused_step(maps, labels, classes)
    same = all(torch.equal(x, y) for x, y in zip(first, second))
    return same, "two calls bitwise equal" if same else "results differ between calls"


def _check_no_host_sync(device):
    maps, labels, classes = _training_inputs(device)
    _fused_step(maps, labels, classes)  # plans and kernels compiled outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fused_step(maps, labels, classes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True, "forward + backward under torch.cuda.set_sync_debug_mode('error')"


def _check_launches(device):
    maps, labels, classes = _training_inputs(device)
    _fused_step(maps, labels, classes)
    counts = {}
    for direction in ("forward", "backward"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            if direction == "forward":
                loss = head.merged_loss(maps, labels, classes, "em", "relu", backend="triton")
            else:
                torch.autograd.grad(loss, maps)
            torch.cuda.synchronize()
        counts[direction] = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profile.events())
    return all(count <= 2 for count in counts.values()), f"device kernels per direction: {counts}"


def _check_cuda_graph(device):
    maps, labels, classes = _training_inputs(device)
    eager = _fused_step(maps, labels, classes)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _fused_step(maps, labels, classes)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _fused_step(maps, labels, classes)
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(x, y) for x, y in zip(eager, captured))
    return same, "captured and replayed; equal to eager" if same else "replay differs from eager"


def _check_compile(device):
    maps, labels, classes = _training_inputs(device)
    compiled = torch.compile(_fused_step, fullgraph=True)
    got, want = compiled(maps, labels, classes), _fused_step(maps, labels, classes)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    return True, "torch.compile(fullgraph=True), Inductor: no graph break, equal to eager"


def _check_opcheck(device):
    maps, labels, classes = _training_inputs(device, batch=4, classes=37, side=7)
    results = torch.library.opcheck(torch.ops.calm_fast.calm_loss.default,
                                    (maps, None, labels, classes, "relu", "em", 0, 0, 0))
    return set(results.values()) == {"SUCCESS"}, str(results)


CONTRACTS = {"deterministic": _check_deterministic, "no host sync": _check_no_host_sync,
             "<= 2 kernels per direction": _check_launches, "CUDA graph capture": _check_cuda_graph,
             "torch.compile fullgraph": _check_compile, "torch.library.opcheck": _check_opcheck}


def contract_checks(device: torch.device) -> list[dict]:
    results = []
    for name, check in CONTRACTS.items():
        try:
            passed, detail = check(device)
        except Exception as error:  # a failed contract is a result to report, not a crash of the bench
            passed, detail = False, "".join(traceback.format_exception_only(error)).strip()[-2000:]
        results.append({"check": name, "passed": bool(passed), "detail": detail})
    return results


def run_checks(device: torch.device) -> list[dict]:
    """Every check for the device; printed, and returned for the JSON."""
    results = value_checks(device) + (contract_checks(device) if device.type == "cuda" else [])
    for result in results:
        failures = result.get("failures") or ([] if result["passed"] else [result.get("detail", "")])
        print(f"  check {result['check']:<44} {'ok' if result['passed'] else 'FAILED: ' + '; '.join(failures)}")
    return results
