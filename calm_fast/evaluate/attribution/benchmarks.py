"""The attribution pass of `calm-fast eval`: remove-and-classify over the model's own maps, the gradient
baselines and the controls, and the WSOL and cue-localization metrics of the gradient and control maps, in
one pass over (the first N images of) a split, exact across ranks.

`AttributionMaps` is a map source (`calm_fast.evaluate.maps.MapFn`) that wraps the model's: per batch it
runs the model once (its maps of the asked kinds and its predictions), computes the gradient maps
("grad-<method>", batched: `gradients.gradient_maps`) and the controls ("control-<name>"), returns the
gradient and control maps for the WSOL metrics, and adds the batch to the remove-and-classify counts of
every map (model kinds, gradients, controls), reusing the clean predictions of that forward pass.
With cue localization it computes each gradient map for the image's own class and its pair partners'
(`CueLocalization.needed_classes`) in the same batches (`gradients.class_gradient_maps`): the own-class
map serves WSOL and remove-and-classify, all of them the cue benchmark, so no gradient is taken twice.
Cue localization scores the class-dependent maps only: the gradients and the blurred CAM (blurred per
class); the centred Gaussian and the random map are the same for both classes of a pair, their
difference is zero everywhere, and they are left out with that reason in the report (`CUE_EXCLUDED`).
`run_attribution` drives it through `evaluate_maps` (sharding, sample checks, the WSOL state and its
all_reduce), then sums the remove-and-classify counts and the model-input counts with the same int64
all_reduce, so W ranks give exactly the one-process numbers for the same maps.

The pass is separate from the WSOL pass over the model's maps: it costs one extra forward pass per image
(against 1 + F·M erased inputs and, with gradients, ~100 forward+backward passes per image), and lets
`images` restrict the attribution benchmarks to the split's first N images (the samples are in random
class order) when the full gradient set is too slow; the report says how many images each section used.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_fast import report
from calm_fast.evaluate.attribution.controls import BLUR_SIGMA_FRAC, CONTROLS, blurred_maps, control_maps
from calm_fast.evaluate.attribution.cue import ClassMapRows, CueLocalization
from calm_fast.evaluate.attribution.gradients import (
    GRADIENT_METHODS,
    GradientSettings,
    check_methods,
    class_gradient_maps,
    gradient_maps,
    samples_per_image,
)
from calm_fast.evaluate.attribution.model_fns import model_classifier, model_score
from calm_fast.evaluate.attribution.remove_classify import remove_and_classify
from calm_fast.evaluate.job import Evaluation, evaluate_maps
from calm_fast.evaluate.maps import MapBatch, ModelMaps
from calm_fast.evaluate.scoring import EvalSettings, all_reduce_states, as_numpy, gather_to_all
from calm_fast.metrics.remove_classify import FRACTIONS, RemoveClassifyCounts

GRADIENT_PREFIX = "grad-"
CONTROL_PREFIX = "control-"
# Controls that cue localization cannot score, with the reason the report gives.
CUE_EXCLUDED = {
    "centre-gaussian": "class-agnostic (one map for every class): |map_y1 - map_y2| is zero everywhere",
    "random": "keyed on (seed, image), not on the class: |map_y1 - map_y2| is zero everywhere",
}


@dataclass(frozen=True)
class AttributionOptions:
    """What the attribution pass computes.

    remove_classify: run remove-and-classify; wsol: keep the WSOL metrics of the gradient and control maps;
    cue: score the class-dependent ones (`cue_map_names`) by cue localization;
    gradients / controls: the map sources added to the model's (`GRADIENT_METHODS`, `CONTROLS`);
    images: only the split's first `images` samples (None: all); gradient: the gradient settings (steps,
    samples, chunk size); seed keys the tie-breaks, random erasures, random maps and SmoothGrad noise;
    erase_batch: classifier inputs per call of remove-and-classify.
    """

    remove_classify: bool = True
    wsol: bool = True
    cue: bool = False
    gradients: tuple[str, ...] = ()
    controls: tuple[str, ...] = ()
    images: int | None = None
    gradient: GradientSettings = field(default_factory=GradientSettings)
    seed: int = 0
    fractions: tuple[float, ...] = FRACTIONS
    erase_batch: int = 256
    blur_sigma_frac: float = BLUR_SIGMA_FRAC

    def __post_init__(self):
        if self.gradients:
            check_methods(self.gradients)
        for name in self.controls:
            if name not in CONTROLS:
                raise ValueError(f"control {name!r}: expected one of {', '.join(CONTROLS)}")
        if self.images is not None and self.images < 1:
            raise ValueError(f"the attribution subset needs at least one image, got {self.images}")
        if self.erase_batch < 1:
            raise ValueError(f"erase_batch must be >= 1, got {self.erase_batch}")

    @property
    def needed(self) -> bool:
        """Whether the pass has anything to do: remove-and-classify, or extra maps for the WSOL metrics or
        cue localization."""
        return (self.remove_classify or (self.wsol and bool(self.gradients or self.controls))
                or (self.cue and bool(cue_map_names(self))))


def extra_map_names(options: AttributionOptions) -> tuple[str, ...]:
    """The names of the gradient and control maps, as they appear in the results."""
    return (tuple(GRADIENT_PREFIX + m for m in options.gradients)
            + tuple(CONTROL_PREFIX + c for c in options.controls))


def cue_map_names(options: AttributionOptions) -> tuple[str, ...]:
    """The extra maps cue localization scores when asked: every gradient, and the controls not in
    `CUE_EXCLUDED` (the blurred CAM)."""
    return (tuple(GRADIENT_PREFIX + m for m in options.gradients)
            + tuple(CONTROL_PREFIX + c for c in options.controls if c not in CUE_EXCLUDED))


def cue_exclusions(options: AttributionOptions) -> dict[str, str]:
    """The asked controls cue localization leaves out: map name -> reason."""
    return {CONTROL_PREFIX + c: CUE_EXCLUDED[c] for c in options.controls if c in CUE_EXCLUDED}


def rows_of_classes(needed: np.ndarray) -> np.ndarray:
    """int64 [B, K]: the row of each True cell of `needed` among them in row-major order (as
    `class_gradient_maps` orders its targets), -1 elsewhere."""
    row_of = np.full(needed.shape, -1, np.int64)
    row_of[needed] = np.arange(int(needed.sum()))
    return row_of


class AttributionMaps:
    """The map source of the attribution pass (see the module docstring). `counts` holds this rank's
    remove-and-classify counts; `seconds` the wall time of each stage (and `cpu_seconds` this process's CPU
    time: the cost on a shared machine, where wall time also counts other work); `inputs` the model inputs
    and `gradient_targets` the (image, class) gradient maps computed. With `cue` (a `CueLocalization` of
    `cue_map_names`), batches carry those maps for the classes the cue benchmark reads."""

    def __init__(self, model: torch.nn.Module, method: str, kinds: Sequence[str], prior: str,
                 device: torch.device | str, options: AttributionOptions, cue: CueLocalization | None = None):
        self.cue = cue
        self.blur_classes = cue is not None and CONTROL_PREFIX + "blurred-cam" in cue.map_names
        self.model_maps = ModelMaps(model, method, tuple(kinds), prior, device,
                                    class_map_kinds=(kinds[0],) if self.blur_classes else ())
        self.kinds, self.device, self.options = tuple(kinds), torch.device(device), options
        self.score = model_score(model, method, prior)
        self.classify = model_classifier(model, method, prior)
        self.extra_names = extra_map_names(options)
        self.counts = RemoveClassifyCounts(self.kinds + self.extra_names, options.fractions)
        self.seconds = {"maps": 0.0, "gradients": 0.0, "controls": 0.0, "remove_classify": 0.0}
        self.cpu_seconds = dict.fromkeys(self.seconds, 0.0)
        self.inputs = {"maps": 0, "gradients": 0, "remove_classify": 0}
        self.gradient_targets = 0

    def _lap(self, stage: str, since: tuple[float, float]) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = (time.perf_counter(), time.process_time())
        self.seconds[stage] += now[0] - since[0]
        self.cpu_seconds[stage] += now[1] - since[1]
        return now

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> MapBatch:
        options = self.options
        clock = (time.perf_counter(), time.process_time())
        batch = self.model_maps(images, labels, indices)
        self.inputs["maps"] += len(images)
        clock = self._lap("maps", clock)
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        size = tuple(images.shape[2:])
        extra: dict[str, torch.Tensor] = {}
        class_rows: dict[str, ClassMapRows] = {}
        needed = self.cue.needed_classes(labels) if self.cue is not None else None  # bool [B, K]
        row_of = rows_of_classes(needed) if needed is not None else None
        if options.gradients:
            with torch.enable_grad():  # the model's source runs under no_grad; gradients need autograd
                if needed is None:
                    grads = gradient_maps(self.score, images, labels, indices, options.gradients, options.gradient)
                    targets = len(images)
                else:  # own class and pair partners in one run; the own-class rows serve WSOL and R&C
                    _, _, every = class_gradient_maps(self.score, images, needed, indices, options.gradients,
                                                      options.gradient)
                    own = torch.from_numpy(row_of[np.arange(len(images)), as_numpy(labels)]).to(self.device)
                    grads = {method: maps.index_select(0, own) for method, maps in every.items()}
                    class_rows.update({GRADIENT_PREFIX + m: ClassMapRows(every[m], row_of) for m in options.gradients})
                    targets = int(needed.sum())
            extra.update({GRADIENT_PREFIX + method: grads[method] for method in options.gradients})
            self.inputs["gradients"] += targets * samples_per_image(options.gradients, options.gradient)
            self.gradient_targets += targets
            clock = self._lap("gradients", clock)
        if options.controls:
            controls = control_maps(options.controls, as_numpy(indices).tolist(), size,
                                    cam_maps=batch.maps[self.kinds[0]], seed=options.seed,
                                    blur_sigma_frac=options.blur_sigma_frac, device=self.device)
            extra.update({CONTROL_PREFIX + name: controls[name] for name in options.controls})
            if self.blur_classes:  # the blurred CAM of every class the cue benchmark reads
                cams = batch.class_maps[self.kinds[0]]
                flat = torch.from_numpy(np.flatnonzero(needed)).to(cams.device)
                blurred = blurred_maps(cams.flatten(0, 1).index_select(0, flat), size, options.blur_sigma_frac,
                                       self.device)
                class_rows[CONTROL_PREFIX + "blurred-cam"] = ClassMapRows(blurred, row_of)
            clock = self._lap("controls", clock)
        if options.remove_classify:
            before = int(self.counts.num_images)
            remove_and_classify(self.classify, images, labels, indices, {**batch.maps, **extra}, self.counts,
                                seed=options.seed, max_batch=options.erase_batch,
                                clean_predictions=batch.pred_classes)
            self.inputs["remove_classify"] += (int(self.counts.num_images) - before) * (
                len(self.counts.fractions) * (1 + len(self.counts.map_names)))
            self._lap("remove_classify", clock)
        # Without the WSOL metrics of extra maps, evaluate_maps runs with settings.wsol off and scores none.
        maps = {name: value.cpu() for name, value in extra.items()} if options.wsol else {}
        return dataclasses.replace(batch, maps=maps or batch.maps, class_maps=class_rows or None)


def first_images(split, count: int | None):
    """The split restricted to its first `count` samples (the same indices), or the split itself."""
    if count is None or count >= len(split):
        return split
    sizes = split.known_sizes[:count] if split.known_sizes is not None else None
    return dataclasses.replace(
        split, image_ids=split.image_ids[:count], labels=split.labels[:count],
        boxes=None if split.boxes is None else split.boxes[:count],
        masks=None if split.masks is None else split.masks[:count],
        parts=None if split.parts is None else split.parts[:count], known_sizes=sizes)


def rows_below(loader, count: int | None):
    """The loader's batches with only the samples of index < `count` (all when count is None)."""
    for images, labels, indices in loader:
        keep = np.flatnonzero(as_numpy(indices) < count) if count is not None else None
        if keep is None or len(keep) == len(indices):
            yield images, labels, indices
        elif len(keep):
            yield tuple(t.index_select(0, torch.from_numpy(keep).to(t.device)) for t in (images, labels, indices))


@dataclass
class Attribution:
    """What `run_attribution` returns (identical on every rank): the WSOL evaluation of the gradient and
    control maps (None when not kept), the summed remove-and-classify counts (None when not run), the
    summed cue localization of the gradient and control maps (None when not run), the number of images
    used and the cost of each part."""

    num_images: int
    evaluation: Evaluation | None
    counts: RemoveClassifyCounts | None
    options: AttributionOptions
    cost: dict[str, Any]
    cue: CueLocalization | None = None


def run_attribution(model: torch.nn.Module, method: str, kinds: Sequence[str], prior: str, split, loader,
                    options: AttributionOptions, settings: EvalSettings, device: torch.device | str = "cpu",
                    progress: bool = False, heartbeat: Callable[[str], None] | None = None,
                    cue: CueLocalization | None = None) -> Attribution:
    """The attribution pass over this rank's shard (`loader` over `split`, every sample once across ranks).
    `cue`: a `CueLocalization` of (some of) `cue_map_names(options)`, to score over the same images; the
    controls it cannot score are recorded in its `excluded`.
    Collective when a process group is initialised; `heartbeat(what)` hears every batch (a `Watchdog.beat`)."""
    if cue is not None:
        unknown = sorted(set(cue.map_names) - set(cue_map_names(options)))
        if unknown:
            raise ValueError(f"the attribution pass has no class maps {unknown} for cue localization")
        cue.excluded.update(cue_exclusions(options))
    subset = first_images(split, options.images)
    source = AttributionMaps(model, method, kinds, prior, device, options, cue)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        scoring = dataclasses.replace(settings, save_maps=False, wsol=options.wsol and bool(source.extra_names))
        evaluation = evaluate_maps(source, subset, rows_below(loader, options.images), scoring, progress=progress,
                                   cue=cue, heartbeat=heartbeat)
    finally:
        model.train(was_training)
    counts_state, inputs = all_reduce_states([source.counts.state_dict(),
                                              {k: np.array(v, np.int64) for k, v in source.inputs.items()}
                                              | {"gradient_targets": np.array(source.gradient_targets, np.int64)}])
    source.counts.load_state_dict(counts_state)
    ranks = gather_to_all((source.seconds, source.cpu_seconds))
    slowest = {stage: max(wall[stage] for wall, _ in ranks) for stage in source.seconds}
    if cue is not None:  # binning the cue rows: timed by evaluate_maps, the slowest rank's
        slowest["cue"] = evaluation.cost["benchmarks"]["cue"]["seconds"]
    targets = int(inputs.pop("gradient_targets"))
    cost = _cost(len(subset), {k: int(v) for k, v in inputs.items()}, slowest, time.perf_counter() - started)
    cost["gradients"]["classes_per_image"] = targets / len(subset)
    cost["stage_cpu_seconds"] = {stage: round(max(cpu[stage] for _, cpu in ranks), 3) for stage in source.seconds}
    return Attribution(num_images=len(subset), evaluation=evaluation if options.wsol and source.extra_names else None,
                       counts=source.counts if options.remove_classify else None, options=options, cost=cost,
                       cue=cue)


def _cost(num_images: int, inputs: dict[str, int], seconds: dict[str, float], total: float) -> dict[str, Any]:
    """Per part: model inputs per image and the seconds of the slowest rank; per benchmark the images/s it
    would run at alone, its maps included (remove-and-classify: the model's maps, gradients, controls; cue
    localization: those maps for the pair partners' classes too, and the binning)."""
    def rate(spent: float) -> float | None:
        return num_images / spent if spent > 0 else None

    maps_seconds = seconds["maps"] + seconds["gradients"] + seconds["controls"]
    cost = {
        "num_images": num_images, "seconds": round(total, 3),
        "stage_seconds": {stage: round(value, 3) for stage, value in seconds.items()},
        "forward_passes_per_image": {part: count / num_images for part, count in inputs.items()},
        "gradients": {"seconds": round(seconds["gradients"], 3),
                      "forward_backward_passes_per_image": inputs["gradients"] / num_images,
                      "images_per_second": rate(seconds["maps"] + seconds["gradients"])},
        "remove_classify": {"seconds": round(seconds["remove_classify"], 3),
                            "extra_forward_passes_per_image": inputs["remove_classify"] / num_images,
                            "images_per_second": rate(maps_seconds + seconds["remove_classify"])},
    }
    if "cue" in seconds:
        cost["cue"] = {"seconds": round(seconds["cue"], 3), "forward_passes_per_image": inputs["maps"] / num_images,
                       "forward_backward_passes_per_image": inputs["gradients"] / num_images,
                       "images_per_second": rate(maps_seconds + seconds["cue"])}
    return cost


def merge_into(evaluation: Evaluation | None, attribution: Attribution, num_images: int) -> Evaluation:
    """The WSOL evaluation of the model's maps with the gradient and control maps added (their results,
    states and overlay maps) and the remove-and-classify counts as state "remove_classify"; an empty
    evaluation when the WSOL metrics were not asked for."""
    base = evaluation or Evaluation(num_images=num_images, results={}, state={})
    state = dict(base.state)
    if attribution.counts is not None:
        state["remove_classify"] = attribution.counts.state_dict()
    cue = base.cue
    if attribution.cue is not None:  # one cue report: the model's maps, then the gradient and control maps
        cue = attribution.cue if cue is None else cue.include(attribution.cue)
        state["cue"] = cue.state()
    base = dataclasses.replace(base, cue=cue)
    extra = attribution.evaluation
    if extra is None:
        return dataclasses.replace(base, state=state)
    # An overlay entry is (maps by name, predicted class, the loader's uint8 image).
    overlays = {index: (dict(maps), *rest) for index, (maps, *rest) in base.overlays.items()}
    for index, (maps, *rest) in extra.overlays.items():
        overlays.setdefault(index, ({}, *rest))[0].update(maps)
    return dataclasses.replace(base, results={**base.results, **extra.results}, state={**state, **extra.state},
                               overlays=overlays)


def attribution_sections(attribution: Attribution) -> dict[str, Any]:
    """The results.json sections of the attribution pass: "remove_classify" (R_k per map and k, clean
    and random accuracy, cost), "gradients" (methods, settings, cost) and "attribution" (images used, seed,
    controls, the maps cue localization scored and those it left out, the whole pass's cost)."""
    options = attribution.options
    sections: dict[str, Any] = {"attribution": {
        "num_images": attribution.num_images, "seed": options.seed, "controls": list(options.controls),
        "blur_sigma_frac": options.blur_sigma_frac, "gradients": list(options.gradients),
        "map_sources": list(attribution.counts.map_names) if attribution.counts else None,
        "cost": attribution.cost}}
    if attribution.cue is not None:
        sections["attribution"]["cue"] = {"maps": list(attribution.cue.map_names),
                                          "excluded": cue_exclusions(options), "cost": attribution.cost.get("cue")}
    if attribution.counts is not None:
        computed = attribution.counts.compute()
        sections["remove_classify"] = {**computed, "ks": [round(100 * f) for f in computed["fractions"]],
                                       "cost": attribution.cost["remove_classify"]}
    if options.gradients:
        gradient = options.gradient
        sections["gradients"] = {"methods": list(options.gradients), "ig_steps": gradient.ig_steps,
                                 "ig_rule": gradient.ig_rule, "smooth_samples": gradient.smooth_samples,
                                 "noise_fraction": gradient.noise_fraction, "num_images": attribution.num_images,
                                 "cost": attribution.cost["gradients"]}
    return sections


def remove_classify_report(results: dict[str, Any], out_dir, console=None) -> None:
    """The R_k table on the console and remove_classify.png (R_k against k, one curve per map source)."""
    section = results["remove_classify"]
    ks = section["ks"]
    rows = {name: values["r_k"] for name, values in section["maps"].items()}
    random = ", ".join(f"{k}%: {acc:.1f}" for k, acc in zip(ks, section["random_accuracy"]))
    caption = (f"R_k = correct after erasing the map's top k% / correct after erasing k% random pixels (lower is "
               f"better). {section['num_images']} images; clean accuracy {section['clean_accuracy']:.1f} %; "
               f"random-erasure accuracy {random}")
    if console is not None:
        console.print(report.series_table(f"remove-and-classify R_k · {results.get('dataset', '?')} "
                                          f"{results.get('split', '?')}", [f"R_{k}" for k in ks], rows,
                                          first_column="map source", caption=caption))
    report.plot_series(Path(out_dir) / "remove_classify.png", ks, rows, xlabel="pixels erased, k (%)",
                       ylabel="R_k (top-k erased / random erased)", reference=1.0,
                       title=f"{results.get('dataset', '?')} {results.get('split', '?')}: remove-and-classify, "
                             f"{section['num_images']} images")


__all__ = ["AttributionMaps", "AttributionOptions", "Attribution", "run_attribution", "merge_into",
           "attribution_sections", "remove_classify_report", "first_images", "rows_below", "extra_map_names",
           "cue_map_names", "cue_exclusions", "CUE_EXCLUDED", "GRADIENT_METHODS", "CONTROLS"]
