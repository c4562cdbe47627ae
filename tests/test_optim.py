"""calm_fast.train.optim: the DeepSpeed config from the TOML (and a shipped JSON checked against it), the
LR schedules against the reference's rule, and the optimizer's two LR groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calm_fast.config import ConfigError, load_config
from calm_fast.train.optim import build_optimizer, deepspeed_config, lr_factor

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ DeepSpeed config


def test_deepspeed_config_from_toml_fields():
    cfg = load_config(None, ["data.batch_size=64", "train.grad_accum=2", "train.precision=bf16",
                             "train.zero_stage=2", "optim.grad_clip=1.5"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 8  # 64 / (2 × 4)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_fp16_gets_dynamic_loss_scaling():
    ds = deepspeed_config(load_config(None, ["train.precision=fp16"]), world_size=1)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0


def test_batch_must_divide_over_ranks_and_accumulation():
    cfg = load_config(None, ["data.batch_size=64", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="multiple of train.grad_accum"):
        deepspeed_config(cfg, world_size=1)


@pytest.mark.parametrize("name", ["zero1_bf16", "zero2_bf16", "zero1_fp16", "zero2_fp16"])
def test_shipped_deepspeed_json_agrees_with_matching_toml(name):
    stage, precision = int(name[4]), name.split("_")[1]
    path = REPO / "configs" / "deepspeed" / f"{name}.json"
    cfg = load_config(None, [f"train.deepspeed_json={json.dumps(str(path))}", f"train.zero_stage={stage}",
                             f"train.precision={precision}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == stage and ds[precision]["enabled"] is True
    assert ds["train_batch_size"] == 64  # "auto" filled in from the TOML
    # The same file with a disagreeing TOML is an error naming the file and the key.
    other = load_config(None, [f"train.deepspeed_json={json.dumps(str(path))}", f"train.zero_stage={3 - stage}",
                               f"train.precision={precision}"])
    with pytest.raises(ConfigError, match=rf"{name}\.json: zero_optimization\.stage"):
        deepspeed_config(other, world_size=2)


def test_deepspeed_json_may_not_name_an_optimizer(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(load_config(None, [f"train.deepspeed_json={json.dumps(str(path))}"]), world_size=1)


# --------------------------------------------------------------------------------------- LR schedule


def test_step_schedule_decays_every_k_epochs():
    cfg = load_config(None, ["optim.schedule=step", "optim.lr_decay_frequency=3", "optim.lr_decay_factor=0.1"])
    steps_per_epoch = 10
    factors = [lr_factor(s, cfg, steps_per_epoch, total_steps=100) for s in range(0, 100, 10)]  # epoch starts
    expected = [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]
    assert factors == pytest.approx(expected)
    assert lr_factor(29, cfg, steps_per_epoch, 100) == 1.0 and lr_factor(30, cfg, steps_per_epoch, 100) == pytest.approx(0.1)


def reference_epoch_lrs(epochs: int, frequency: int, factor: float) -> list[float]:
    """The CALM reference's rule, written out: before epoch e (0-based) it calls its decay with e + 1 and
    multiplies the LR by `factor` when that number is a non-zero multiple of `frequency`."""
    lr, lrs = 1.0, []
    for epoch in range(epochs):
        if (epoch + 1) != 0 and (epoch + 1) % frequency == 0:
            lr *= factor
        lrs.append(lr)
    return lrs


@pytest.mark.parametrize("epochs, frequency", [(40, 30), (10, 3), (7, 1)])
def test_step_reference_decays_when_the_reference_does(epochs, frequency):
    cfg = load_config(None, ["optim.schedule=step_reference", f"optim.lr_decay_frequency={frequency}",
                             "optim.lr_decay_factor=0.1"])
    steps_per_epoch = 4
    total = epochs * steps_per_epoch
    factors = [lr_factor(s, cfg, steps_per_epoch, total) for s in range(total)]
    for epoch, expected in enumerate(reference_epoch_lrs(epochs, frequency, 0.1)):
        assert factors[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch] == pytest.approx([expected] * 4)


def test_step_reference_with_the_paper_recipe_gives_29_then_11_epochs():
    cfg = load_config(None, ["optim.schedule=step_reference", "optim.lr_decay_frequency=30"])
    steps_per_epoch = 93  # CUB: 5,994 images in whole batches of 64
    per_epoch = [lr_factor(e * steps_per_epoch, cfg, steps_per_epoch, 40 * steps_per_epoch) for e in range(40)]
    assert per_epoch[:29] == [1.0] * 29 and per_epoch[29:] == pytest.approx([0.1] * 11)
    changes = [s for s in range(1, 40 * steps_per_epoch)
               if lr_factor(s, cfg, steps_per_epoch, 0) != lr_factor(s - 1, cfg, steps_per_epoch, 0)]
    assert changes == [29 * steps_per_epoch]  # the first step of epoch 30 counted from 1
    # The plain step schedule decays one epoch later: after 30 full epochs.
    plain = load_config(None, ["optim.schedule=step", "optim.lr_decay_frequency=30"])
    assert [s for s in range(1, 40 * steps_per_epoch)
            if lr_factor(s, plain, steps_per_epoch, 0) != lr_factor(s - 1, plain, steps_per_epoch, 0)] == [
        30 * steps_per_epoch]


def test_cosine_with_warmup():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1"])
    f = [lr_factor(s, cfg, steps_per_epoch=7, total_steps=24) for s in range(24)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    # Halfway through the 20 post-warm-up steps: 0.1 + 0.9 × 0.5 × (1 + cos(π/2)).
    assert f[14] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone after warm-up
    assert lr_factor(24, cfg, 7, 24) == pytest.approx(0.1)


def test_optimizer_groups_follow_the_model_and_head_multiplier():
    from calm_fast.models import build_model

    model = build_model("tiny_resnet", num_classes=3, method="calm-em")
    cfg = load_config(None, ["optim.lr=0.03", "optim.head_lr_multiplier=10"])
    optimizer = build_optimizer(model, cfg)
    base, boosted = model.parameter_groups()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"base": 0.03, "head": 0.3})
    grouped = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert grouped["base"] == {id(p) for p in base} and grouped["head"] == {id(p) for p in boosted}
    group = optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
