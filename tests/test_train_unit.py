"""Pieces of training that need no process group: DeepSpeed config, LR schedule, optimizer groups, global
batches and their sampling, metric-log truncation, and validation's one loader (eval.batch_size)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calm_fast.config import ConfigError, load_config
from calm_fast.data.loaders import TrainBatches
from calm_fast.data.sampling import global_batch_indices
from calm_fast.data.synthetic import generate
from calm_fast.distributed import World
from calm_fast.evaluate import job
from calm_fast.models import build_model
from calm_fast.train import loop
from calm_fast.train.log import truncate_metrics
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


# --------------------------------------------------------------------------------------------- data


def _micro_batches(n, g, world, rank, accum, epoch, first_step=0):
    return [b.tolist() for b in global_batch_indices(n, g, world, rank, accum, seed=5, epoch=epoch,
                                                     first_step=first_step)]


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_each_step_consumes_one_global_batch_of_the_epoch_permutation(world, accum):
    n, g = 70, 16  # 4 full global batches, 6 samples dropped
    order = np.random.default_rng([5, 3]).permutation(n)
    per_rank = [_micro_batches(n, g, world, r, accum, epoch=3) for r in range(world)]
    assert all(len(batches) == 4 * accum for batches in per_rank)
    for step in range(4):
        taken = [i for r in range(world) for b in per_rank[r][step * accum:(step + 1) * accum] for i in b]
        assert sorted(taken) == sorted(order[step * g:(step + 1) * g].tolist())


def test_one_rank_with_accumulation_sees_the_micro_batches_of_two_ranks():
    one = _micro_batches(64, 16, world=1, rank=0, accum=2, epoch=0)
    two = [_micro_batches(64, 16, world=2, rank=r, accum=1, epoch=0) for r in range(2)]
    for step in range(4):
        assert one[2 * step] == two[0][step] and one[2 * step + 1] == two[1][step]


def test_first_step_skips_whole_global_batches_and_epochs_differ():
    full = _micro_batches(64, 8, world=2, rank=1, accum=1, epoch=2)
    assert _micro_batches(64, 8, world=2, rank=1, accum=1, epoch=2, first_step=5) == full[5:]
    assert _micro_batches(64, 8, world=2, rank=1, accum=1, epoch=3) != full


class _KeyDataset(torch.utils.data.Dataset):
    """Returns the key it was asked for, so the test sees what TrainBatches requests."""

    def __len__(self):
        return 40

    def __getitem__(self, key):
        index, epoch = key
        return torch.zeros(1), epoch, index


def test_train_batches_request_this_ranks_samples_with_the_epoch():
    from calm_fast.distributed import World

    cfg = load_config(None, ["data.batch_size=8", "train.grad_accum=2", "data.workers=0", "train.seed=5"])
    world = World(rank=1, local_rank=1, world_size=2, local_world_size=2, device=torch.device("cpu"))
    batches = TrainBatches(_KeyDataset(), cfg, world)
    assert batches.steps_per_epoch == 5
    got = [(epochs.tolist(), indices.tolist()) for _, epochs, indices in batches.micro_batches(epoch=3, first_step=2)]
    expected = _micro_batches(40, 8, world=2, rank=1, accum=2, epoch=3, first_step=2)
    assert [indices for _, indices in got] == expected and len(got) == 3 * 2
    assert all(epochs == [3, 3] for epochs, _ in got)


# ---------------------------------------------------------------------------------------- metric log


def test_truncate_metrics_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------ SyncBatchNorm

EXPERIMENT_CONFIGS = sorted((REPO / "configs" / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_synchronise_batchnorm_when_ranks_split_the_batch(path):
    """CALM.md §3: the reference normalises over its whole batch; with N ranks the paper configs use
    SyncBatchNorm. Only the module conversion is checked (SyncBatchNorm's forward needs CUDA and a group)."""
    from calm_fast.models import build_model
    from calm_fast.train.loop import synchronise_batchnorm

    cfg = load_config(path)
    assert cfg.model.sync_batchnorm is True
    with torch.device("meta"):
        model = build_model(cfg.model.backbone, cfg.data.num_classes, cfg.model.method,
                            large_feature_map=cfg.model.large_feature_map, batch_norm=cfg.model.batch_norm)
    batchnorms = [name for name, module in model.named_modules() if type(module) is torch.nn.BatchNorm2d]
    keys = list(model.state_dict())
    assert len(batchnorms) > 0 or (cfg.model.backbone == "vgg16" and not cfg.model.batch_norm)
    assert synchronise_batchnorm(model, cfg, world_size=1, device_type="cuda") is model  # one rank: untouched
    assert all(type(model.get_submodule(name)) is torch.nn.BatchNorm2d for name in batchnorms)
    synced = synchronise_batchnorm(model, cfg, world_size=2, device_type="cuda")
    assert all(type(synced.get_submodule(name)) is torch.nn.SyncBatchNorm for name in batchnorms)
    assert not any(type(module) is torch.nn.BatchNorm2d for module in synced.modules())
    assert list(synced.state_dict()) == keys  # same parameter and buffer names: checkpoints and exports load


def test_per_rank_batchnorm_stays_an_option_and_cpu_ranks_are_told_so():
    from calm_fast.models import build_model
    from calm_fast.train.loop import synchronise_batchnorm

    model = build_model("tiny_resnet", 3, "cam")
    per_rank = load_config(EXPERIMENT_CONFIGS[0], ["model.sync_batchnorm=false"])
    assert synchronise_batchnorm(model, per_rank, world_size=8, device_type="cuda") is model
    assert not any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.modules())
    with pytest.raises(ConfigError, match="model.sync_batchnorm.*CUDA.*model.sync_batchnorm=false"):
        synchronise_batchnorm(model, load_config(EXPERIMENT_CONFIGS[0]), world_size=2, device_type="cpu")


# ------------------------------------------------------------------------------- divergence watch


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


# ------------------------------------------------------------------------------------------ validation


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, name="SYNTH", seed=2, num_classes=3, sizes={"train": 8, "val": 7}, image_size=32, workers=1)
    return root


@pytest.mark.parametrize("localization", [True, False])
def test_validation_reads_the_one_loader_built_with_eval_batch_size(synthetic_root, monkeypatch, localization):
    cfg = load_config(None, [f"data.root={json.dumps(str(synthetic_root))}", "data.dataset=SYNTH", "data.loader=torch",
                             "data.workers=0", "data.input_size=32", "data.resize_size=36", "data.batch_size=4",
                             "model.backbone=tiny_resnet", "eval.batch_size=3",
                             f"train.val_localization={json.dumps(localization)}"])
    world = World(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    built = []
    real_build = loop.build_eval_loader

    def spy_build(cfg_, split, *args, **kwargs):
        built.append((split.split, cfg_.eval.batch_size))
        return real_build(cfg_, split, *args, **kwargs)

    monkeypatch.setattr(loop, "build_eval_loader", spy_build)
    data = loop.build_run_data(cfg, world)
    assert built == [("val", 3)]  # one validation loader, with eval.batch_size

    def no_second_loader(*args, **kwargs):
        raise AssertionError("validation built a loader of its own")

    monkeypatch.setattr(job, "build_eval_loader", no_second_loader)
    batch_sizes = []

    class CountingLoader:
        def __iter__(self):
            for batch in data.val_loader:
                batch_sizes.append(len(batch[1]))
                yield batch

    torch.manual_seed(0)
    model = build_model("tiny_resnet", data.train_split.num_classes, "calm-em")
    beats = []
    result = loop.validate(SimpleNamespace(module=model), CountingLoader(), data.val_split, cfg, world, torch.float32,
                           SimpleNamespace(beat=beats.append))
    assert batch_sizes == [3, 3, 1] and result["num_images"] == 7
    assert ("max_box_acc_v2" in result) == localization
    assert len(beats) == 3  # the step watchdog hears every validation batch
