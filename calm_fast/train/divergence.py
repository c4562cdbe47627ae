"""Stop a training run whose loss or gradient stopped being finite, at that step and before anything is saved.

Checking the loss of every step on the host would cost a GPU sync per step. Instead each micro-step folds
`isfinite(loss)` into a device-side record of the first bad step (a few tiny kernels, no sync), and the
record is read, all ranks together, where the loop syncs anyway: every metric record, and before every
checkpoint, validation and export. A run therefore stops at most `train.log_every` steps after the bad
step, names that step, and never writes a checkpoint or a model after it. Non-finite gradients DeepSpeed
finds itself (it then skips the update; a Python flag it has already synced) stop the run at once, except
under fp16, whose dynamic loss scaling skips overflowing steps by design: those are counted and logged.
Parameters are checked before each checkpoint as well (one pass over them), since a bad gradient that
DeepSpeed does not flag shows in the loss only one step later.
"""

from __future__ import annotations

import torch

from calm_fast.distributed import all_reduce_min, any_rank
from calm_fast.errors import UserError
from calm_fast.modes import Precision

NO_STEP = 2**62  # the record's value while every step has been finite


class TrainingDiverged(UserError, RuntimeError):
    """The loss or a gradient became NaN or infinite; the message names the step (printed as one line: the
    cause is the settings or the data, not a bug)."""


class DivergenceWatch:
    """The first step whose loss was not finite (device-side), and DeepSpeed's skipped steps (host-side)."""

    def __init__(self, device: torch.device, precision: str, skipped_at_start: int = 0):
        self.first_bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self.precision = Precision(precision)
        self.skipped_seen = skipped_at_start
        self.fp16_skipped = 0  # steps skipped by fp16 loss scaling, logged

    def loss(self, loss: torch.Tensor, step: int) -> None:
        """Fold the loss of a micro-step of optimizer step `step` (1-based) into the record (no sync)."""
        bad_here = torch.where(torch.isfinite(loss.detach()), NO_STEP, step)
        self.first_bad_step = torch.minimum(self.first_bad_step, bad_here)

    def step_done(self, skipped_steps: int, step: int) -> None:
        """After optimizer step `step`: DeepSpeed's running count of skipped updates (engine.skipped_steps)."""
        new = skipped_steps - self.skipped_seen
        self.skipped_seen = skipped_steps
        if new <= 0:
            return
        if self.precision == Precision.FP16:
            self.fp16_skipped += new
            return
        raise TrainingDiverged(f"the gradient of step {step} is not finite (NaN or inf; DeepSpeed skipped the "
                               f"update). Lower optim.lr, set optim.grad_clip, or look for bad input data")

    def check(self, before: str) -> None:
        """Raise if any rank saw a non-finite loss (a collective: every rank calls it at the same step)."""
        first = all_reduce_min(self.first_bad_step.clone()).item()
        if first != NO_STEP:
            raise TrainingDiverged(f"the loss of step {first} is not finite (NaN or inf); stopped before "
                                   f"{before}, nothing saved after that step. Lower optim.lr, set "
                                   f"optim.grad_clip, or look for bad input data")

    def check_parameters(self, model: torch.nn.Module, step: int) -> None:
        """Raise if a parameter is not finite (a collective)."""
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()
        if any_rank(not bool(finite.item()), self.first_bad_step.device):
            raise TrainingDiverged(f"a parameter is not finite after step {step}; no checkpoint written. Lower "
                                   f"optim.lr, set optim.grad_clip, or look for bad input data")
