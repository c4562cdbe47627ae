"""calm_fast.train.divergence: a non-finite loss, gradient or parameter stops the run naming the step."""

from __future__ import annotations

import pytest
import torch


def test_divergence_watch_names_the_first_non_finite_loss_when_read_later():
    from calm_fast.train.divergence import DivergenceWatch, TrainingDiverged

    watch = DivergenceWatch(torch.device("cpu"), "bf16")
    for step, loss in enumerate([1.0, 0.9, float("nan"), float("inf"), 0.8], start=1):
        watch.loss(torch.tensor(loss), step)
    watch.loss(torch.tensor(float("-inf")), 6)
    with pytest.raises(TrainingDiverged, match=r"loss of step 3 is not finite.*before the record of step 6"):
        watch.check("the record of step 6")
    clean = DivergenceWatch(torch.device("cpu"), "fp32")
    clean.loss(torch.tensor(2.0, requires_grad=True) * 2, 1)
    clean.check("anything")  # finite losses pass


def test_divergence_watch_stops_on_a_skipped_update_except_fp16_loss_scaling():
    from calm_fast.train.divergence import DivergenceWatch, TrainingDiverged

    fp16 = DivergenceWatch(torch.device("cpu"), "fp16", skipped_at_start=2)
    fp16.step_done(2, 5)
    fp16.step_done(3, 6)  # loss scaling skipped step 6 by design: counted, not an error
    fp16.step_done(5, 8)
    assert fp16.fp16_skipped == 3
    bf16 = DivergenceWatch(torch.device("cpu"), "bf16", skipped_at_start=1)
    bf16.step_done(1, 9)
    with pytest.raises(TrainingDiverged, match="gradient of step 10 is not finite"):
        bf16.step_done(2, 10)


def test_divergence_watch_refuses_non_finite_parameters():
    from calm_fast.train.divergence import DivergenceWatch, TrainingDiverged

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    watch = DivergenceWatch(torch.device("cpu"), "fp32")
    watch.check_parameters(model, 4)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="parameter is not finite after step 4"):
        watch.check_parameters(model, 4)
