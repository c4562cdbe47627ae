"""Randomness keyed on what it is for, so that results do not depend on batch size, rank count or order.

Every random draw of the attribution benchmarks belongs to one image and one purpose (a tie-break order,
a random erasure at fraction k, a random control map, SmoothGrad noise). Its key is built from
(purpose, seed, image index, ...) with splitmix64 (`key64`), never from a generator's position, so the
draw for image i is the same whether i comes first in a batch of 1 or last in a batch of 512 on rank 7.

Two kinds of draw:
- `keyed_hash32`: a counter-based hash of each element's index under a per-row key, computed batched on
  any device with int64 tensor ops (bit-identical on CPU and GPU). For a fixed key it is a bijection of
  [0, 2^32) (xor with a constant, add a constant mod 2^32 and murmur3's finaliser are each bijective), so
  the hashes of a row's indices are distinct: sorting by them gives a random permutation with no ties.
- `keyed_generator`: a torch.Generator seeded from a key, for Gaussian noise (`torch.randn`) drawn per image.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1

# Purposes: the first word of every key, so that no two uses ever share a stream.
TIE_BREAK = 1
RANDOM_ERASURE = 2
RANDOM_MAP = 3
SMOOTHGRAD_NOISE = 4


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def key64(*words: int) -> int:
    """A 64-bit key from a sequence of integers (any sign), by chained splitmix64 (exact Python ints)."""
    state = 0
    for word in words:
        state = _splitmix64(state ^ (int(word) & MASK64))
    return state


def _mul32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """(values · constant) mod 2^32 for int64 values in [0, 2^32), in 16-bit halves so no int64 overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (values * low + (((values * high) & 0xFFFF) << 16)) & MASK32


def _fmix32(values: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijection of [0, 2^32) with full avalanche."""
    values = values ^ (values >> 16)
    values = _mul32(values, 0x85EBCA6B)
    values = values ^ (values >> 13)
    values = _mul32(values, 0xC2B2AE35)
    return values ^ (values >> 16)


def keyed_hash32(keys: list[int], count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [len(keys), count] in [0, 2^32): row r hashes the indices 0..count-1 under keys[r].

    Within a row the values are distinct (a bijection of the index); rows with different keys look
    independent.
    """
    if count > MASK32 + 1:
        raise ValueError(f"keyed_hash32: at most 2^32 elements per row, got {count}")
    rows = torch.tensor([[k & MASK32, (k >> 32) & MASK32] for k in keys], dtype=torch.int64, device=device)
    rows = rows.reshape(len(keys), 2)
    index = torch.arange(count, dtype=torch.int64, device=device)
    hashed = _fmix32(index[None, :] ^ rows[:, :1])
    return _fmix32((hashed + rows[:, 1:]) & MASK32)


def uniform_from_hash(hashed: torch.Tensor) -> torch.Tensor:
    """fp32 in [0, 1) from 32-bit hashes: the top 24 bits, so every value is exact in fp32."""
    return (hashed >> 8).to(torch.float32) * (1.0 / (1 << 24))


def keyed_generator(key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded from a 64-bit key (reduced to the 63 bits a seed may have)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(key & ((1 << 63) - 1))
    return generator
