"""Exact metric state as named integer count arrays: the one loader (names, shapes and integer dtype
checked, tensors from an all-reduce accepted) and the one merge (sum two shards' counts), shared by every
mergeable metric in calm_fast.metrics.
"""

from __future__ import annotations

import numpy as np


def add_counts(metric, other) -> None:
    """Add `other`'s state into `metric`'s (the caller checked that their settings match)."""
    theirs = other.state_dict()
    metric.load_state_dict({name: value + theirs[name] for name, value in metric.state_dict().items()})


def load_counts(metric, state: dict, template: dict[str, np.ndarray]) -> None:
    """Validate names and shapes against `template`, then set each count as an int64 array."""
    if set(state) != set(template):
        raise ValueError(f"state keys {sorted(state)} do not match {sorted(template)}")
    for name, current in template.items():
        value = state[name]
        if hasattr(value, "detach"):  # a torch tensor, e.g. after all_reduce
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        if value.shape != current.shape:
            raise ValueError(f"state[{name!r}] has shape {value.shape}, expected {current.shape}")
        if not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"state[{name!r}] must hold integer counts, got dtype {value.dtype}")
        setattr(metric, name, value.astype(np.int64))
