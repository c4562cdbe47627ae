"""The one home of every mode list: each choice calm-fast offers (method, objective, prior, map kind,
precision, loader kind, head backend, LR schedule, FFCV decoding and storage mode, baseline map, evaluation
benchmark, cue-localization threshold grid and normalisation) is a
`StrEnum` here. Strings from configs and command lines are turned into members once, by `parse`, where
they enter (config reading, API entry points); inner code compares members. A member equals its string
value, so `Method.CAM == "cam"` and members print as their values.
"""

from __future__ import annotations

import enum
from typing import TypeVar

import torch

__all__ = ["Mode", "Method", "Objective", "Prior", "MapKind", "Precision", "LoaderKind", "Backend", "Schedule",
           "DecoderMode", "WriteMode", "Baseline", "Benchmark", "CueGrid", "CueNormalization", "parse", "choices"]

class Mode(enum.StrEnum):
    """The base of every mode list: a member's repr is its quoted value, so that argparse, which lists the
    allowed choices by repr, says `choose from 'wsol', 'cue'` rather than `<Benchmark.WSOL: 'wsol'>`."""

    def __repr__(self) -> str:
        return repr(self.value)


E = TypeVar("E", bound=enum.StrEnum)


def choices(enum_class: type[enum.StrEnum]) -> str:
    """'a, b, c': the values of a mode list, for messages."""
    return ", ".join(member.value for member in enum_class)


def parse(enum_class: type[E], value, name: str) -> E:
    """`value` as a member of `enum_class`; a ValueError names `name`, the value and the choices."""
    if isinstance(value, enum_class):
        return value
    try:
        return enum_class(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected one of {choices(enum_class)}") from None


class Objective(Mode):
    """The training loss (CALM.md §1)."""

    EM = "em"  # the EM M-step loss of CALM-EM
    ML = "ml"  # -log p(y | x), CALM-ML
    CAM = "cam"  # cross-entropy of the pooled class logits


class Method(Mode):
    """A WSOL method: CAM (class head only) or CALM trained by EM or by maximum likelihood."""

    CAM = "cam"
    CALM_EM = "calm-em"
    CALM_ML = "calm-ml"

    @property
    def objective(self) -> Objective:
        return {Method.CAM: Objective.CAM, Method.CALM_EM: Objective.EM, Method.CALM_ML: Objective.ML}[self]

    @property
    def has_location_head(self) -> bool:
        return self is not Method.CAM


class Prior(Mode):
    """p(z | x) from the location scores a: relu(a) normalised (the reference) or softmax(a)."""

    RELU = "relu"
    SOFTMAX = "softmax"


class MapKind(Mode):
    """An attribution map of the ground-truth class."""

    JOINT = "joint"  # p(y, z | x), the CALM map
    POSTERIOR = "posterior"  # p(z | x, y)
    PRIOR = "prior"  # p(z | x), class-agnostic
    CLASS = "class"  # the raw class logits S[y], the CAM map


# The one statement of the rule; every check of a map kind against a method says it with these words.
CAM_MAPS_ONLY = "needs a CALM model (location head); CAM has only the 'class' map"


def map_kinds_of(method: Method) -> tuple[MapKind, ...]:
    """Every map kind a model of `method` has: CAM only its class map."""
    return (MapKind.CLASS,) if method == Method.CAM else tuple(MapKind)


class Precision(Mode):
    """Training precision (DeepSpeed: fp32, bf16, or fp16 with dynamic loss scaling)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


class LoaderKind(Mode):
    """data.loader: FFCV for each split whose .beton matches (auto), FFCV always, or the plain torch loader."""

    AUTO = "auto"
    FFCV = "ffcv"
    TORCH = "torch"


class Backend(Mode):
    """Head math: the fused Triton kernels on CUDA tensors and PyTorch elsewhere (auto), or one of them."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


class Schedule(Mode):
    """LR schedule: step decay per epoch or cosine; both with optional warm-up.

    Both step schedules multiply the LR by lr_decay_factor every lr_decay_frequency (f) epochs; they
    differ in when. STEP decays after k·f full epochs (at the start of 0-based epoch k·f). STEP_REFERENCE
    decays as the CALM reference does, at the start of epoch k·f counted from 1 (0-based epoch k·f − 1):
    for f = 30 and 40 epochs, 29 epochs at the full LR, then 11 (CALM.md §3).
    """

    STEP = "step"
    STEP_REFERENCE = "step_reference"
    COSINE = "cosine"


class DecoderMode(Mode):
    """What the FFCV image decoder does: evaluation's plain resize, or training's reference recipe."""

    EVAL = "eval"  # resize straight to input_size²
    REFERENCE = "reference"  # resize to resize_size², random input_size² crop, flip (CALM.md §3)


class WriteMode(Mode):
    """How `calm-fast convert` stores images in a .beton."""

    JPG = "jpg"
    RAW = "raw"
    PROPORTION = "proportion"


class Baseline(Mode):
    """Class-agnostic baseline maps that a WSOL method must beat."""

    CENTRE_GAUSSIAN = "centre-gaussian"
    IMAGE_ENERGY = "image-energy"


class Benchmark(Mode):
    """What `calm-fast eval` measures: the WSOL metrics, or the attribution benchmarks of CALM.md §4."""

    WSOL = "wsol"  # MaxBoxAcc, MaxBoxAccV2, top-1 localization, PxAP of the ground-truth class's map
    CUE = "cue"  # cue localization: |map_y1 - map_y2| against the parts where classes y1, y2 differ
    REMOVE_CLASSIFY = "remove-classify"  # R_k: accuracy after erasing a map's top-k pixels / k random pixels


class CueGrid(Mode):
    """The threshold grid of cue-localization PxAP."""

    LOG = "log"  # the reference's log-spaced thresholds; scores below the first one are dropped
    LINEAR = "linear"  # numpy's arange(0, 1, interval), as the WSOL metrics use


class CueNormalization(Mode):
    """How |map_y1 - map_y2| becomes scores in [0, 1] (the reference's `normalize_scoremap`)."""

    AUTO = "auto"  # clip for CALM's probability maps, minmax for class logits and other maps
    CLIP = "clip"
    MINMAX = "minmax"
    MAX = "max"
