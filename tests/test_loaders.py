"""calm_fast.data.loaders: the one choice between FFCV and torch for a split (data.loader for training,
data.eval_loader for evaluation; the .beton's sidecar), and the loaders it builds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from calm_fast.config import ConfigError, load_config
from calm_fast.data import ffcv_convert
from calm_fast.data.ffcv_loader import FFCVLoader, ffcv_available
from calm_fast.data.loaders import FFCVTrainBatches, TrainBatches, build_eval_loader, build_train_batches, choose_loader
from calm_fast.data.metadata import read_split
from calm_fast.data.synthetic import generate
from calm_fast.distributed import World
from calm_fast.modes import LoaderKind

pytestmark = pytest.mark.skipif(not ffcv_available(), reason="FFCV does not import here")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A synthetic set whose train split is converted (its val split is not)."""
    root = tmp_path_factory.mktemp("loaders")
    generate(root, name="SYNTH", seed=1, num_classes=2, sizes={"train": 8, "val": 5}, image_size=32, workers=1)
    train = read_split(root / "metadata", "SYNTH", "train", root / "SYNTH")
    ffcv_convert.convert_split(train, ffcv_convert.beton_path_for(root / "ffcv", "SYNTH", "train"), num_workers=1)
    return root, train


def config(root, kind: str):
    """data.loader (training) and data.eval_loader (evaluation) both set to `kind`."""
    return load_config(None, [f"data.root={json.dumps(str(root))}", "data.dataset=SYNTH", f"data.loader={kind}",
                              f"data.eval_loader={kind}", "data.input_size=24", "data.resize_size=28",
                              "data.batch_size=4", "data.workers=1", "eval.batch_size=3"])


def test_auto_takes_ffcv_only_for_a_beton_converted_from_the_current_metadata(converted):
    root, train = converted
    val = read_split(root / "metadata", "SYNTH", "val", root / "SYNTH")
    beton = ffcv_convert.beton_path_for(root / "ffcv", "SYNTH", "train")
    assert choose_loader(config(root, "auto"), train) == (LoaderKind.FFCV, beton)
    assert choose_loader(config(root, "auto"), val)[0] == LoaderKind.TORCH  # no .beton for val
    relabelled = dataclasses.replace(train, labels=(train.labels + 1) % 2)  # every label changed
    assert choose_loader(config(root, "auto"), relabelled)[0] == LoaderKind.TORCH  # stale: other labels
    assert choose_loader(config(root, "torch"), train)[0] == LoaderKind.TORCH  # never FFCV


def test_ffcv_insists_and_says_what_to_do(converted):
    root, train = converted
    val = read_split(root / "metadata", "SYNTH", "val", root / "SYNTH")
    assert choose_loader(config(root, "ffcv"), train)[0] == LoaderKind.FFCV
    with pytest.raises(FileNotFoundError, match=r"SYNTH_val\.beton does not exist: run `calm-fast convert`"):
        choose_loader(config(root, "ffcv"), val)
    relabelled = dataclasses.replace(train, labels=(train.labels + 1) % 2)  # every label changed
    with pytest.raises(FileNotFoundError, match=r"SYNTH_train\.beton does not match .*convert` again"):
        choose_loader(config(root, "ffcv"), relabelled)
    with pytest.raises(FileNotFoundError, match=r"data\.eval_loader='ffcv' but .*SYNTH_val\.beton does not exist"):
        choose_loader(config(root, "ffcv"), val, "data.eval_loader")  # the message names the setting
    with pytest.raises(ConfigError, match="data.loader='fast'"):
        config(root, "fast")


def test_a_beton_without_its_sidecar_is_not_used(converted, tmp_path):
    root, train = converted
    beton = ffcv_convert.beton_path_for(root / "ffcv", "SYNTH", "train")
    copy = tmp_path / beton.name
    copy.write_bytes(beton.read_bytes())  # the file alone: no sidecar says what it was converted from
    cfg = dataclasses.replace(config(root, "auto"), data=dataclasses.replace(config(root, "auto").data,
                                                                            beton_dir=str(tmp_path)))
    assert choose_loader(cfg, train) == (LoaderKind.TORCH, copy)


def test_the_built_loaders_follow_the_choice(converted):
    root, train = converted
    world = World(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    eval_loader = build_eval_loader(config(root, "auto"), train)
    assert isinstance(eval_loader, FFCVLoader)
    assert [len(labels) for _, labels, _ in eval_loader] == [3, 3, 2]  # eval.batch_size per batch
    torch_loader = build_eval_loader(config(root, "torch"), train)
    assert torch_loader.batch_size == 3
    training_ffcv = dataclasses.replace(config(root, "auto"), data=dataclasses.replace(
        config(root, "auto").data, eval_loader=LoaderKind.TORCH))
    assert not isinstance(build_eval_loader(training_ffcv, train), FFCVLoader)  # evaluation follows eval_loader
    assert isinstance(build_train_batches(config(root, "auto"), world, train), FFCVTrainBatches)
    assert isinstance(build_train_batches(config(root, "torch"), world, train), TrainBatches)


@pytest.mark.slow  # two fresh interpreters importing torch and FFCV (~20 s)
def test_asking_whether_ffcv_imports_keeps_the_thread_counts():
    """Importing FFCV sets torch's and numba's thread counts to 1; the loader policy asks about FFCV for
    every split, so without the restore a torch-loader run would train on one thread (a fresh interpreter:
    the import's side effect happens once per process)."""
    import subprocess
    import sys

    def counts_after(statement: str) -> list[int]:
        code = ("import torch, numba; torch.set_num_threads(2); numba.set_num_threads(min(2, "
                f"numba.config.NUMBA_NUM_THREADS)); {statement}; print(torch.get_num_threads(), numba.get_num_threads())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return [int(v) for v in out.split()]

    import numba

    expected = [2, min(2, numba.config.NUMBA_NUM_THREADS)]
    assert counts_after("import ffcv.loader")[0] == 1  # the side effect this guards against
    assert counts_after("from calm_fast.data.ffcv_loader import ffcv_available; assert ffcv_available()") == expected
