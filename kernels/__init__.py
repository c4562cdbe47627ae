"""Fused Triton kernels of the CALM head (imported as calm_fast.kernels)."""
