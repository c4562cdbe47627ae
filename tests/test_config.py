"""Config loading: TOML + extends + dotted overrides, type and choice checks, round trip, shipped configs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from calm_fast.config import (
    Config,
    ConfigDeprecationWarning,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_toml,
    effective_map_kind,
    load_config,
    parse_override,
    save_config,
)
from calm_fast.modes import Benchmark, LoaderKind, Method, Precision, Prior

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_the_reference_recipe():
    cfg = load_config()
    assert cfg == Config()
    # CALM.md §3: SGD Nesterov 0.9, wd 1e-4, ×10 head LR, ×0.1 every 30 epochs, 40 epochs, LR 0.01, batch 64.
    assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.9, True, 1e-4)
    assert (cfg.optim.head_lr_multiplier, cfg.optim.lr_decay_factor, cfg.optim.lr_decay_frequency) == (10, 0.1, 30)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.data.batch_size) == (40, 0.01, 64)


def test_default_evaluation_grid_is_the_reference_evaluators():
    """CALM.md §3: cam_curve_interval 0.001 wherever numbers are compared with published ones; 0.01 stays an option."""
    from calm_fast.metrics.boxes import BoxAccuracy
    from calm_fast.metrics.masks import PixelAP

    assert load_config().eval.cam_curve_interval == 0.001
    for path in sorted(CONFIGS.rglob("*.toml")):
        assert load_config(path).eval.cam_curve_interval == 0.001, path.name  # demo and synthetic included
    assert BoxAccuracy().cam_curve_interval == 0.001 and len(BoxAccuracy().thresholds) == 1000
    assert PixelAP().cam_curve_interval == 0.001
    assert load_config(None, ["eval.cam_curve_interval=0.01"]).eval.cam_curve_interval == 0.01


def test_extends_merges_key_by_key_and_child_wins(tmp_path):
    write(tmp_path / "base.toml", 'run_dir = "runs/base"\n[optim]\nlr = 0.5\nmomentum = 0.5\n[train]\nepochs = 3\n')
    child = write(tmp_path / "sub" / "child.toml", 'extends = "../base.toml"\n[optim]\nlr = 0.25\n')
    cfg = load_config(child)
    assert cfg.run_dir == "runs/base"
    assert cfg.optim.lr == 0.25 and cfg.optim.momentum == 0.5 and cfg.train.epochs == 3


def test_overrides_apply_last_and_parse_toml_values(tmp_path):
    path = write(tmp_path / "c.toml", "[optim]\nlr = 0.5\n")
    cfg = load_config(path, ["optim.lr=2", "data.dataset=CUB", 'model.backbone="vgg16"', "train.progress=false",
                             "eval.iou_thresholds=[50, 70]", "run_dir=runs/x", "train.max_steps=7"])
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # an int is accepted for a float
    assert cfg.data.dataset == "CUB" and cfg.model.backbone == "vgg16"  # bare word -> string
    assert cfg.train.progress is False and cfg.eval.iou_thresholds == [50, 70]
    assert cfg.run_dir == "runs/x" and cfg.train.max_steps == 7


def test_a_config_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[optim]\nlr = 0.1  # \xe9t\xe9\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9 at column 13"):
        load_config(path)


def test_parse_override_rejects_missing_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")
    assert parse_override("a.b= 3 ") == ("a.b", 3)


@pytest.mark.parametrize("text, needle", [
    ("[optim]\nlrr = 0.1\n", "unknown key 'optim.lrr'"),
    ("[optimizer]\nlr = 0.1\n", "unknown key 'optimizer'"),
    ("typo = 1\n", "unknown key 'typo'"),
    ("[optim]\nlr = \"fast\"\n", "optim.lr must be float"),
    ("[train]\nepochs = 2.5\n", "train.epochs must be int"),
    ("[train]\nprogress = 1\n", "train.progress must be true or false"),
    ("[model]\nmethod = \"gradcam\"\n", "model.method='gradcam'"),
    ("[train]\nzero_stage = 3\n", "train.zero_stage=3"),
    ("[train]\nprecision = \"fp8\"\n", "train.precision"),
    ("[data]\ninput_size = 256\nresize_size = 224\n", "data.resize_size"),
    ("[data]\nbatch_size = 0\n", "data.batch_size must be > 0"),
    ("[eval]\niou_thresholds = 50\n", "eval.iou_thresholds must be a list"),
    ("[model]\nmethod = \"cam\"\n[eval]\nmap_kind = \"joint\"\n", "needs a CALM model"),
    ("[optim\n", "invalid TOML"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, needle):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert needle in str(error.value)
    assert str(path) in str(error.value)


def test_error_in_a_parent_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.toml", "[optim]\nbogus = 1\n")
    child = write(tmp_path / "child.toml", 'extends = "parent.toml"\n[optim]\nlr = 0.1\n')
    with pytest.raises(ConfigError) as error:
        load_config(child)
    assert str(parent) in str(error.value) and "optim.bogus" in str(error.value)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'optim\.lrr=1'.*unknown key 'optim\.lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="more than one dot"):
        load_config(None, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["optim=1"])


def test_extends_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-5", "data.mask_root=masks/x", 'data.dataset="a \\"quoted\\" name"',
                             "train.max_minutes=3.5", "eval.iou_thresholds=[30]"])
    save_config(cfg, tmp_path / "out" / "config.toml")
    assert load_config(tmp_path / "out" / "config.toml") == cfg
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "config.toml"]  # no temp file left
    assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_dump_omits_none_values():
    assert "max_steps" not in dump_toml(Config())


def test_effective_map_kind():
    assert effective_map_kind(load_config(None, ["model.method=cam"])) == "class"
    assert effective_map_kind(load_config(None, ["model.method=calm-ml"])) == "joint"
    assert effective_map_kind(load_config(None, ["eval.map_kind=prior"])) == "prior"


# ------------------------------------------------------------------------------------------ shipped


def experiment_files():
    return sorted((CONFIGS / "experiments").glob("*.toml"))


def test_every_dataset_backbone_method_has_an_experiment():
    names = {p.stem for p in experiment_files()}
    expected = {f"{d}_{b}_{m}" for d in ("cub", "ilsvrc", "openimages")
                for b in ("resnet50", "vgg16", "inception_v3") for m in ("cam", "calm-em", "calm-ml")}
    assert names == expected


def experiment_row(path: Path) -> tuple[str, str, str]:
    parts = path.stem.split("_")
    return parts[0], "_".join(parts[1:-1]), parts[-1]


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: p.stem)
def test_shipped_experiments_load_with_the_paper_settings(path):
    cfg = load_config(path)
    dataset, backbone, method = experiment_row(path)
    assert cfg.model.backbone == backbone and cfg.model.method == method
    assert cfg.data.dataset == {"cub": "CUB", "ilsvrc": "ILSVRC", "openimages": "OpenImages"}[dataset]
    assert cfg.data.num_classes == {"cub": 200, "ilsvrc": 1000, "openimages": 100}[dataset]
    assert cfg.run_dir == f"runs/{path.stem}"
    if dataset == "openimages" and method == "cam":
        # wsolevaluation README's OpenImages command (batch 32, 10 epochs, LR 0.00227913316, decay every 3,
        # weight decay 5e-4, small feature map); its LR is given for VGG16 and reused for the other backbones.
        expected = (32, 0.00227913316, 10, 3, 5e-4, False)
    else:  # the CALM reference code's defaults (CALM.md §3), which its README's CUB command keeps
        expected = (64, 0.01, 40, 30, 1e-4, True)
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.train.epochs, cfg.optim.lr_decay_frequency,
            cfg.optim.weight_decay, cfg.model.large_feature_map) == expected
    assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.head_lr_multiplier, cfg.optim.lr_decay_factor,
            cfg.optim.warmup_steps, cfg.optim.grad_clip) == (0.9, True, 10.0, 0.1, 0, 0.0)
    assert cfg.optim.schedule == "step_reference"  # decays when the reference does (29 + 11 epochs for 30/40)
    assert cfg.model.sync_batchnorm is True  # BN over the whole global batch when ranks split it
    assert (cfg.data.input_size, cfg.data.resize_size) == (224, 256)
    assert cfg.data.eval_loader == "torch"  # evaluation on the reference's pixels, not FFCV's stored copy
    assert cfg.model.batch_norm is False  # plain VGG16, no BN in the new layers (wsolevaluation's baselines)
    assert cfg.model.pretrained == "torchvision" and cfg.model.prior == "relu"
    assert cfg.train.precision == "fp32"  # the published numbers are fp32 training
    assert (cfg.eval.cam_curve_interval, cfg.eval.iou_thresholds, cfg.eval.multi_contour) == (0.001, [30, 50, 70], True)


SOURCE_TAG = re.compile(r"#\s*(\[(ref-cmd|ref-code|wsol-cmd|wsol-code|choice|guess)\]|the row of the table)")


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: p.stem)
def test_every_experiment_value_names_its_source(path):
    dataset, _, method = experiment_row(path)
    values = [line for line in path.read_text().splitlines()
              if "=" in line and not line.startswith(("#", "[", "extends", "run_dir"))]
    assert len(values) >= 20
    for line in values:
        assert SOURCE_TAG.search(line), f"{path.name}: no source for {line!r}"
    # ILSVRC and OpenImages do not inherit CUB's schedule silently: the epochs say where they come from.
    epochs = next(line for line in values if line.startswith("epochs"))
    if dataset != "cub":
        assert "[choice]" in epochs or "[wsol-cmd]" in epochs, epochs


def test_synthetic_config_loads():
    cfg = load_config(CONFIGS / "synthetic.toml")
    assert cfg.model.backbone == "tiny_resnet" and cfg.data.dataset == "SYNTH"


# ---- numbers that would make a run silently useless are refused at load time, naming the key


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.01", "optim.lr"),
    ("optim.head_lr_multiplier=-1", "optim.head_lr_multiplier"),
    ("optim.head_lr_multiplier=inf", "optim.head_lr_multiplier"),
    ("optim.head_lr_multiplier=nan", "optim.head_lr_multiplier"),
    ("optim.momentum=nan", "optim.momentum"), ("optim.momentum=1.5", "optim.momentum"),
    ("optim.weight_decay=inf", "optim.weight_decay"), ("optim.grad_clip=inf", "optim.grad_clip"),
    ("optim.lr_decay_factor=0", "optim.lr_decay_factor"), ("optim.lr_decay_factor=-inf", "optim.lr_decay_factor"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"), ("optim.min_lr_ratio=nan", "optim.min_lr_ratio"),
    ("dist.timeout_minutes=inf", "dist.timeout_minutes"), ("dist.watchdog_minutes=nan", "dist.watchdog_minutes"),
])
def test_non_finite_or_useless_numbers_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value) and repr(override) in str(error.value)


def test_a_non_finite_value_in_a_file_names_the_file_and_key(tmp_path):
    path = write(tmp_path / "bad.toml", "[optim]\nlr = inf\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and "optim.lr" in str(error.value)


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_config(None, ["optim.momentum=0"])
    assert load_config(None, ["optim.momentum=0", "optim.nesterov=false"]).optim.momentum == 0


@pytest.mark.parametrize("value", ["[0.5]", "[0]", "[100]", "[30, 101]", "[-30]", "[]"])
def test_iou_thresholds_are_checked_when_the_config_loads(value):
    """Not when validation first runs, hours into training."""
    with pytest.raises(ConfigError, match=r"eval\.iou_thresholds"):
        load_config(None, [f"eval.iou_thresholds={value}"])


# -------------------------------------------------------------------------------------- renamed keys


def test_the_old_eval_batch_size_key_is_read_as_eval_batch_size_with_a_warning(tmp_path):
    old = write(tmp_path / "old.toml", "[data]\neval_batch_size = 24\n")
    with pytest.warns(ConfigDeprecationWarning, match=rf"{re.escape(str(old))}: data\.eval_batch_size is deprecated"):
        cfg = load_config(old)
    assert cfg.eval.batch_size == 24 and not hasattr(cfg.data, "eval_batch_size")
    both = write(tmp_path / "both.toml", "[data]\neval_batch_size = 24\n[eval]\nbatch_size = 5\n")
    with pytest.warns(ConfigDeprecationWarning, match="eval.batch_size = 5 .* is used"):
        assert load_config(both).eval.batch_size == 5  # the current key wins
    with pytest.warns(ConfigDeprecationWarning, match="override 'data.eval_batch_size=7'"):
        assert load_config(None, ["data.eval_batch_size=7"]).eval.batch_size == 7
    # A saved config (a run's config.toml, an exported model's dict) of the older version still loads.
    saved = config_to_dict(Config())
    saved["data"]["eval_batch_size"] = 16
    del saved["eval"]["batch_size"]
    with pytest.warns(ConfigDeprecationWarning, match="model.pt"):
        assert config_from_dict(saved, source="model.pt").eval.batch_size == 16


def test_modes_are_parsed_when_the_config_is_read():
    cfg = load_config(None, ["model.method=cam", "train.precision=bf16", "data.loader=torch"])
    assert cfg.model.method is Method.CAM and cfg.train.precision is Precision.BF16
    assert cfg.data.loader is LoaderKind.TORCH and cfg.model.prior is Prior.RELU
    assert config_to_dict(cfg)["model"]["method"].__class__ is str  # plain data again (pickles without calm-fast)
    listed = load_config(None, ['eval.benchmarks=["wsol", "cue"]'])
    assert listed.eval.benchmarks == [Benchmark.WSOL, Benchmark.CUE]
    assert [type(b) for b in config_to_dict(listed)["eval"]["benchmarks"]] == [str, str]


def test_a_bad_choice_on_the_command_line_lists_the_values(capsys):
    import calm_fast.modes as modes
    from calm_fast.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--benchmark", "wsol", "nope"])
    message = capsys.readouterr().err
    assert "invalid choice: 'nope' (choose from " + ", ".join(repr(b.value) for b in modes.Benchmark) in message
    assert "<Benchmark" not in message
    # every mode list shares the base that gives this repr
    assert all(issubclass(getattr(modes, name), modes.Mode) for name in modes.__all__
               if isinstance(getattr(modes, name), type) and issubclass(getattr(modes, name), modes.enum.StrEnum))
