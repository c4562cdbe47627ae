"""Where the fused head's time goes on a GPU: per-kernel device time (torch.profiler) against host time per
fwd+bwd step, for the shapes of `calm-fast bench head`. Diagnostic companion of that benchmark.

    python3 benchmarks/gpu/profile_head.py > profile.txt
"""

import functools
import time

import torch

from calm_fast import head


def step(s, a, labels, backend):
    loss = head.calm_loss(s, a, labels, objective="em", prior="relu", backend=backend)
    return torch.autograd.grad(loss, (s, a))


def main() -> None:
    device = torch.device("cuda")
    for batch, classes in ((64, 200), (64, 1000), (256, 200), (256, 1000)):
        s = torch.randn(batch, classes, 28, 28, device=device, dtype=torch.bfloat16, requires_grad=True)
        a = torch.randn(batch, 1, 28, 28, device=device, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), device=device)
        for backend in ("triton", "torch"):
            fn = functools.partial(step, s, a, labels, backend)
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(20):
                fn()
            host_ms = (time.perf_counter() - begin) / 20 * 1e3  # launch-bound if close to the synced time
            torch.cuda.synchronize()
            synced_ms = (time.perf_counter() - begin) / 20 * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            kernels = sorted(((e.key, e.device_time_total / 10 / 1e3) for e in prof.key_averages()
                              if e.device_time_total > 0), key=lambda kv: -kv[1])
            device_ms = sum(ms for _, ms in kernels)
            print(f"{batch}x{classes}x28x28 {backend:6s}: host {host_ms:.3f} ms/step (queued), synced {synced_ms:.3f}, "
                  f"device kernels {device_ms:.3f} ms/step")
            for name, ms in kernels[:6]:
                print(f"    {ms:8.3f} ms  {name[:90]}")


if __name__ == "__main__":
    main()
