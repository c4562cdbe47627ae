"""calm_fast.train.loop without a process group: SyncBatchNorm in the paper configs, and validation's one
loader (eval.batch_size). Its other parts have their own files: test_optim.py, test_sampling.py,
test_divergence.py, test_train_log.py, test_checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from calm_fast.config import ConfigError, load_config
from calm_fast.data.synthetic import generate
from calm_fast.distributed import World
from calm_fast.evaluate import job
from calm_fast.models import build_model
from calm_fast.train import loop

REPO = Path(__file__).resolve().parents[1]


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
