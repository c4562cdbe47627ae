"""Experiment configuration: plain dataclasses loaded from TOML, with dotted command-line overrides.

A config file holds sections that mirror the dataclasses below (`[data]`, `[model]`, `[optim]`, `[train]`,
`[dist]`, `[eval]`) plus the top-level `run_dir`. A file may start from another one with
`extends = "relative/path.toml"` (resolved against the extending file's folder); sections are merged key
by key, the extending file winning. Overrides such as `optim.lr=0.02` or `run_dir=runs/x` are applied
last; their value is read as a TOML value (`0.02`, `true`, `[30, 50]`, `"text"`), and a value that is not
valid TOML is taken as a plain string, so `data.dataset=CUB` works without quotes.

Relative paths inside a config (data root, run folder, DeepSpeed JSON) are relative to the working
directory of the run, not to the config file: the shipped configs expect to be run from the repository
root. Every unknown section or key is an error that names the file (or the override) and the key. Mode
settings (model.method and prior, train.precision, optim.schedule, data.loader and eval_loader,
eval.benchmarks, cue_grid and cue_normalization) are parsed into the `calm_fast.modes` enums here, once.
A renamed key of an older version (`data.eval_batch_size`, now `eval.batch_size`) is still read, with a
warning that names the file.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm_fast.atomic import atomic_write_text
from calm_fast.errors import UserError, not_utf8_message
from calm_fast.modes import (
    CAM_MAPS_ONLY,
    Benchmark,
    CueGrid,
    CueNormalization,
    LoaderKind,
    MapKind,
    Method,
    Precision,
    Prior,
    Schedule,
    map_kinds_of,
    parse,
)

ZERO_STAGES = (1, 2)


class ConfigError(UserError, ValueError):
    """A config file or override is malformed; the message names the file or override and the key."""


class ConfigDeprecationWarning(FutureWarning):
    """A config uses a key of an older version; it is read under its new name (shown to users by default)."""


# Old key -> the key it is read as. data.eval_batch_size set the batch of training's validation loader,
# eval.batch_size that of every other evaluation: one setting for one thing since eval.batch_size.
RENAMED_KEYS = {"data.eval_batch_size": "eval.batch_size"}


@dataclass
class DataConfig:
    root: str = "data"  # holds metadata/<dataset>/... and the image roots
    dataset: str = "SYNTH"
    metadata_root: str | None = None  # default: <root>/metadata
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Image roots per split; None takes calm_fast.data.metadata.default_image_root (DATA.md defaults).
    train_image_root: str | None = None
    val_image_root: str | None = None
    test_image_root: str | None = None
    mask_root: str | None = None  # mask datasets (OpenImages): folder that holds the instance PNGs
    num_classes: int | None = None  # None: the count the dataset declares (synthetic sets); else required
    input_size: int = 224
    resize_size: int = 256
    batch_size: int = 64  # global: summed over ranks and gradient-accumulation steps
    workers: int = 4  # loader processes per rank
    loader: LoaderKind = LoaderKind.AUTO  # training: auto | ffcv | torch (calm_fast.data.loaders)
    # Evaluation and validation: torch (the exact path: PIL bilinear from the original file, as the reference)
    # | auto | ffcv (faster; JPEG q90 ≤ 512 px and INTER_AREA give other pixels, README "Reproducing the paper")
    eval_loader: LoaderKind = LoaderKind.TORCH
    beton_dir: str | None = None  # FFCV files; default <root>/ffcv


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    method: Method = Method.CALM_EM  # cam | calm-em | calm-ml
    prior: Prior = Prior.RELU  # relu (the reference) | softmax
    large_feature_map: bool = True
    pretrained: str | None = None  # torchvision-format ImageNet state dict (local file)
    batch_norm: bool = False  # BN in the extra VGG/Inception layers
    sync_batchnorm: bool = False  # SyncBatchNorm when ranks split the batch (CUDA only; the experiment configs set it)


@dataclass
class OptimConfig:
    lr: float = 0.01  # base LR of the pretrained part of the backbone
    head_lr_multiplier: float = 10.0  # LR factor of everything else (CALM.md §3)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: Schedule = Schedule.STEP  # step | step_reference (decays one epoch earlier, as the reference) | cosine
    lr_decay_frequency: int = 30  # epochs
    lr_decay_factor: float = 0.1
    warmup_steps: int = 0  # linear warm-up from 0, for either schedule
    min_lr_ratio: float = 0.0  # cosine: final LR as a fraction of the initial one
    grad_clip: float = 0.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    epochs: int = 40
    max_steps: int | None = None  # optimizer steps; stops earlier than `epochs` when set
    max_minutes: float | None = None  # time budget: stop cleanly (and checkpoint) when it runs out
    seed: int = 0
    precision: Precision = Precision.FP32  # fp32 | bf16 | fp16 (dynamic loss scaling)
    zero_stage: int = 1  # ZeRO stage 1 or 2
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    deepspeed_json: str | None = None  # extra DeepSpeed settings (configs/deepspeed/*.json)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at epoch ends and the end
    keep_last: int = 3  # checkpoints kept on disk
    log_every: int = 10  # optimizer steps between metric records
    val_every: int = 1  # epochs between validations; 0 disables periodic validation
    val_localization: bool = False  # also MaxBoxAccV2 / PxAP on the val split (calm_fast.evaluate)
    progress: bool = True  # rich progress bar on rank 0
    tensorboard: bool = True
    export: bool = True  # write a consolidated fp32 state dict (model.pt) at the end


@dataclass
class DistConfig:
    timeout_minutes: float = 10.0  # process-group timeout: a collective waiting longer fails
    watchdog_minutes: float = 20.0  # no finished step for this long: the rank stops with an error


@dataclass
class EvalConfig:
    split: str = "test"
    map_kind: str = "auto"  # auto: "class" for cam, "joint" for CALM | joint | posterior | prior | class
    cam_curve_interval: float = 0.001  # the reference evaluator's grid (CALM.md §3); 0.01: coarser, an option
    iou_thresholds: list[int] = field(default_factory=lambda: [30, 50, 70])
    multi_contour: bool = True  # MaxBoxAccV2 (True) or v1 single-contour boxes
    batch_size: int = 64  # per rank, for `calm-fast eval` and training's validation alike
    benchmarks: list[Benchmark] = field(default_factory=lambda: [Benchmark.WSOL])  # wsol | cue | remove-classify
    # log: the reference's log-spaced thresholds (sub-threshold scores dropped) | linear
    cue_grid: CueGrid = CueGrid.LOG
    cue_curve_interval: float = 0.001  # log: 7 * interval apart in log10 (0.001: 1000 thresholds); linear: step
    # auto: clip for joint/posterior maps, minmax for class logits | clip | minmax | max
    cue_normalization: CueNormalization = CueNormalization.AUTO
    cue_cumulative: bool = True  # also report the reference's never-reset accumulator, labelled as such
    cub_root: str = ""  # CUB mode: the CUB_200_2011 folder (images.txt, parts/, attributes/); "": <data.root>/CUB
    cub_segmentation_root: str = ""  # CUB mode: the segmentations/ folder; "": <cub_root>/segmentations


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


TOP_LEVEL_KEYS = ("run_dir",)
SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name not in TOP_LEVEL_KEYS
}


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (following `extends`), apply dotted overrides, check types and choices."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}  # "section.key" -> where its value came from, for error messages
    if path is not None:
        raw, origin = _read_toml_chain(Path(path), seen=())
    _apply_overrides(raw, origin, overrides)
    return config_from_dict(raw, origin)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` with dotted overrides applied and checked as load_config checks them."""
    raw, origin = config_to_dict(cfg), {}
    _apply_overrides(raw, origin, overrides)
    return config_from_dict(raw, origin)


def _apply_overrides(raw: dict, origin: dict, overrides) -> None:
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(raw, origin, key, value, f"override {override!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> ("section.key", value) with the value read as TOML, else as a string."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value (for example optim.lr=0.02)")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return key, value


def _read_toml_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: `extends` forms a cycle ({chain})")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(not_utf8_message(path, error)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    parent = data.pop("extends", None)
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: `extends` must be a path string, got {parent!r}")
        raw, origin = _read_toml_chain(path.parent / parent, (*seen, resolved))
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _set_dotted(raw, origin, f"{key}.{sub_key}", sub_value, str(path))
        else:
            _set_dotted(raw, origin, key, value, str(path))
    return raw, origin


def _set_dotted(raw: dict, origin: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        if key in SECTIONS:
            raise ConfigError(f"{source}: {key!r} is a section; set its keys as {key}.KEY=VALUE")
        raw[key] = value
    elif len(parts) == 2:
        section, name = parts
        if section in TOP_LEVEL_KEYS:
            raise ConfigError(f"{source}: {section!r} is a value, not a section (key {key!r})")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section!r} is a value, not a section (key {key!r})")
        raw[section][name] = value
        origin.setdefault(section, source)
    else:
        raise ConfigError(f"{source}: key {key!r} has more than one dot; expected section.key")
    origin[key] = source


def config_from_dict(raw: dict[str, Any], origin: dict[str, str] | None = None, source: str = "config") -> Config:
    """Build a Config from nested plain data, checking every key, type and choice. Messages name where each
    key came from (`origin`: "section.key" -> file or override), else `source`."""
    origin = dict(origin or {})
    for key, value in raw.items():
        origin.setdefault(key, source)
        for name in value if isinstance(value, dict) else ():
            origin.setdefault(f"{key}.{name}", source)
    raw = _read_renamed_keys(raw, origin)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in TOP_LEVEL_KEYS:
            kwargs[key] = _coerce(value, str, _where(origin, key), key)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{_where(origin, key)}: {key!r} must be a section (a table)")
            kwargs[key] = _section_from_dict(key, SECTIONS[key], value, origin)
        else:
            known = ", ".join([*TOP_LEVEL_KEYS, *SECTIONS])
            raise ConfigError(f"{_where(origin, key)}: unknown key {key!r} (known: {known})")
    cfg = Config(**kwargs)
    validate(cfg, origin)
    return cfg


def _where(origin: dict[str, str], key: str) -> str:
    return origin.get(key, "config")


def _read_renamed_keys(raw: dict[str, Any], origin: dict[str, str]) -> dict[str, Any]:
    """`raw` with each old key of RENAMED_KEYS moved to its new name (a warning names where it was set); a
    new key set explicitly wins over its old name."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for old, new in RENAMED_KEYS.items():
        old_section, old_name = old.split(".")
        if not isinstance(raw.get(old_section), dict) or old_name not in raw[old_section]:
            continue
        value = raw[old_section].pop(old_name)
        new_section, new_name = new.split(".")
        target = raw.setdefault(new_section, {})
        where = _where(origin, old)
        if isinstance(target, dict) and new_name in target:
            outcome = f"{new} = {target[new_name]!r} from {_where(origin, new)} is used; remove {old}"
        else:
            if isinstance(target, dict):
                target[new_name] = value
                origin[new] = where
            outcome = f"read as {new} = {value!r}; rename it"
        warnings.warn(f"{where}: {old} is deprecated ({old} and {new} set the same thing); {outcome}",
                      ConfigDeprecationWarning, stacklevel=4)
    return raw


def _section_from_dict(section: str, cls: type, values: dict, origin: dict[str, str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"{_where(origin, key)}: unknown key {key!r} (known in [{section}]: {known})")
        kwargs[name] = _coerce(value, hints[name], _where(origin, key), key)
    return cls(**kwargs)


def _coerce(value: Any, annotation: Any, source: str, key: str) -> Any:
    """Check `value` against a field annotation; ints are accepted for floats, mode strings become their
    `calm_fast.modes` enum. Returns the value."""
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.StrEnum):
        try:
            return parse(annotation, value, key)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], source, key)
    if typing.get_origin(annotation) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], source, key) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if annotation in (int, float, str) and (not isinstance(value, annotation) or isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, got {value!r}")
    return value


def _choice(cfg_value, choices, key, origin):
    if cfg_value not in choices:
        raise ConfigError(f"{_where(origin, key)}: {key}={cfg_value!r}: expected one of "
                          f"{', '.join(str(c) for c in choices)}")


def validate(cfg: Config, origin: dict[str, str] | None = None) -> None:
    """Check choices and ranges that the types alone do not catch."""
    origin = origin or {}
    _check_finite(cfg, origin)
    _choice(cfg.train.zero_stage, ZERO_STAGES, "train.zero_stage", origin)
    _choice(cfg.eval.map_kind, ("auto", *MapKind), "eval.map_kind", origin)
    positive = {
        "data.input_size": cfg.data.input_size, "data.resize_size": cfg.data.resize_size,
        "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs, "train.grad_accum": cfg.train.grad_accum,
        "train.keep_last": cfg.train.keep_last, "train.log_every": cfg.train.log_every,
        "optim.lr_decay_frequency": cfg.optim.lr_decay_frequency, "eval.batch_size": cfg.eval.batch_size,
        "optim.lr": cfg.optim.lr, "optim.lr_decay_factor": cfg.optim.lr_decay_factor,
        "dist.timeout_minutes": cfg.dist.timeout_minutes, "dist.watchdog_minutes": cfg.dist.watchdog_minutes,
    }
    non_negative = {
        "data.workers": cfg.data.workers, "optim.head_lr_multiplier": cfg.optim.head_lr_multiplier,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_steps": cfg.optim.warmup_steps, "optim.grad_clip": cfg.optim.grad_clip,
        "train.checkpoint_every": cfg.train.checkpoint_every, "train.val_every": cfg.train.val_every,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{_where(origin, key)}: {key} must be > 0, got {value!r}")
    for key, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{_where(origin, key)}: {key} must be >= 0, got {value!r}")
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"{_where(origin, 'optim.momentum')}: optim.momentum must lie in [0, 1), "
                          f"got {cfg.optim.momentum!r}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"{_where(origin, 'optim.min_lr_ratio')}: optim.min_lr_ratio must lie in [0, 1], "
                          f"got {cfg.optim.min_lr_ratio!r}")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError(f"{_where(origin, 'optim.nesterov')}: optim.nesterov needs optim.momentum > 0 "
                          "(set optim.nesterov = false for plain SGD)")
    ious = cfg.eval.iou_thresholds
    if not ious or not all(0 < delta < 100 for delta in ious):
        raise ConfigError(f"{_where(origin, 'eval.iou_thresholds')}: eval.iou_thresholds must be integer "
                          f"percents in (0, 100), such as [30, 50, 70]; got {ious!r}")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"{_where(origin, 'train.max_steps')}: train.max_steps must be > 0 or absent")
    if cfg.train.max_minutes is not None and not (cfg.train.max_minutes > 0 and math.isfinite(cfg.train.max_minutes)):
        raise ConfigError(f"{_where(origin, 'train.max_minutes')}: train.max_minutes must be > 0 or absent")
    if cfg.data.resize_size < cfg.data.input_size:
        raise ConfigError(f"{_where(origin, 'data.resize_size')}: data.resize_size ({cfg.data.resize_size}) "
                          f"must be >= data.input_size ({cfg.data.input_size}) for the random crop")
    if not 0 < cfg.eval.cam_curve_interval < 1:
        raise ConfigError(f"{_where(origin, 'eval.cam_curve_interval')}: eval.cam_curve_interval must lie in (0, 1)")
    if not 0 < cfg.eval.cue_curve_interval < 1:
        raise ConfigError(f"{_where(origin, 'eval.cue_curve_interval')}: eval.cue_curve_interval must lie in (0, 1)")
    if cfg.model.prior == Prior.SOFTMAX and cfg.model.method == Method.CAM:
        raise ConfigError(f"{_where(origin, 'model.prior')}: model.prior only applies to CALM methods")
    if cfg.eval.map_kind != "auto" and MapKind(cfg.eval.map_kind) not in map_kinds_of(cfg.model.method):
        raise ConfigError(f"{_where(origin, 'eval.map_kind')}: eval.map_kind={cfg.eval.map_kind!r} {CAM_MAPS_ONLY}")


def _check_finite(cfg: Config, origin: dict[str, str]) -> None:
    """No setting may be NaN or ±inf (TOML has both): an infinite LR trains a model of NaNs to the end."""
    for section in SECTIONS:
        for field_ in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), field_.name)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                key = f"{section}.{field_.name}"
                raise ConfigError(f"{_where(origin, key)}: {key} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------------- writing


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data (None values kept; modes as their strings, so the dict pickles without calm-fast)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {key: _plain(value) for key, value in items})


def _plain(value: Any) -> Any:
    """A mode's string for the enum member, element-wise in lists."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value.value if isinstance(value, enum.Enum) else value


def dump_toml(cfg: Config) -> str:
    """The config as TOML text that load_config reads back to an equal Config (None values omitted)."""
    data = config_to_dict(cfg)
    lines = [f"run_dir = {_toml_value(data.pop('run_dir'))}"]
    for section, values in data.items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the config as TOML, atomically."""
    atomic_write_text(Path(path), dump_toml(cfg))


def effective_map_kind(cfg: Config) -> MapKind:
    """eval.map_kind with "auto" resolved: CAM's map is its class logits, CALM's the joint p(y, z | x)."""
    if cfg.eval.map_kind != "auto":
        return MapKind(cfg.eval.map_kind)
    return MapKind.CLASS if cfg.model.method == Method.CAM else MapKind.JOINT
