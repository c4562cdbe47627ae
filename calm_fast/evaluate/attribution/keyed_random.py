"""Randomness keyed on what it is for, so that results do not depend on batch size, rank count or order.

Every random draw of the attribution benchmarks belongs to one image and one purpose (a tie-break order,
a random erasure at fraction k, a random control map, SmoothGrad noise). Its key is built from
(purpose, seed, image index, ...) with splitmix64 (`key64`), never from a generator's position, so the
draw for image i is the same whether i comes first in a batch of 1 or last in a batch of 512 on rank 7.

Two kinds of draw:
- `keyed_hash31`: a counter-based hash of each element's index under a per-row key, computed batched on
  any device with int64 tensor ops (bit-identical on CPU and GPU). For a fixed key it is a bijection of
  [0, 2^31), so the hashes of a row's indices are distinct: sorting by them gives a random permutation
  with no ties.
- `keyed_generator`: a torch.Generator seeded from a key, for Gaussian noise (`torch.randn`) drawn per image.
"""

from __future__ import annotations

import torch

MASK31 = (1 << 31) - 1
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


def _mix31(values: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^31) with good avalanche: xor-shifts and two odd multipliers mod 2^31.

    Working on 31 bits keeps every product below 2^62, so int64 never overflows and each multiply is one
    tensor op (a 32-bit version needs the product split in halves: twice the work).
    """
    values = values ^ (values >> 16)
    values = (values * 0x7FEB352D) & MASK31
    values = values ^ (values >> 15)
    values = (values * 0x046CA68B) & MASK31
    return values ^ (values >> 16)


def keyed_hash31(keys: list[int], count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [len(keys), count] in [0, 2^31): row r hashes the indices 0..count-1 under keys[r].

    Within a row the values are distinct (a bijection of the index: xor with a constant, adding a constant
    mod 2^31 and `_mix31` are each bijective); rows with different keys look independent.
    """
    if count > MASK31 + 1:
        raise ValueError(f"keyed_hash31: at most 2^31 elements per row, got {count}")
    rows = torch.tensor([[k & MASK31, (k >> 31) & MASK31] for k in keys], dtype=torch.int64, device=device)
    rows = rows.reshape(len(keys), 2)
    index = torch.arange(count, dtype=torch.int64, device=device)
    hashed = _mix31(index[None, :] ^ rows[:, :1])
    return _mix31((hashed + rows[:, 1:]) & MASK31)


def uniform_from_hash(hashed: torch.Tensor) -> torch.Tensor:
    """fp32 in [0, 1) from 31-bit hashes: the top 24 bits, so every value is exact in fp32."""
    return (hashed >> 7).to(torch.float32) * (1.0 / (1 << 24))


def keyed_generator(key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded from a 64-bit key (reduced to the 63 bits a seed may have)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(key & ((1 << 63) - 1))
    return generator
