"""Evaluate a trained model (or a class-agnostic baseline map) on a split: the WSOL metrics (MaxBoxAcc,
MaxBoxAccV2, PxAP) and the attribution benchmarks (cue localization from the same forward pass per image;
remove-and-classify, gradient baselines and controls in a second pass).

What is measured (METRICS.md). For every image the map of its ground-truth class (GT-known) is taken at
the model's resolution, turned into float64, resized to 224×224 with OpenCV's bicubic filter and min-max
normalised (`normalize_scoremaps`), exactly as the reference evaluator's pipeline does. Box datasets get
MaxBoxAcc (v1: IoU 0.5, largest contour only), MaxBoxAccV2 (every contour, mean over IoU 0.3/0.5/0.7),
top-1 localization (box correct AND predicted class correct; the predicted class is the argmax of
`calm_fast.head.class_log_probs`) and classification accuracy; mask datasets get PxAP. The synthetic
datasets have both boxes and masks and get both.

Distributed. The same code runs as one process, under `deepspeed` or under `torchrun`. Each rank takes a
shard of the split (rank r: samples r, r+W, ...; every sample exactly once, which is checked), turns its
maps into the metrics' exact integer state (counts per IoU × score threshold, pixel histograms) and the
states are summed with one int64 all_reduce, so W ranks give exactly the one-process numbers for the same
maps. (The maps themselves are floats from the model: a different CPU thread count, or on GPU a different
kernel choice, can change their last bits and so move a pixel across a threshold.)

Outputs, under `<run_dir>/eval/<split>/` (or --out), written by rank 0, each file atomically:
  results.json            every number, curves included (NaN written as null)
  metric_state.npz        the summed integer metric state (re-mergeable; two runs are equal iff these are)
  boxacc_<map>.png        BoxAcc against the score-map threshold (box datasets)
  pr_<map>.png            the pixel precision-recall curve (mask datasets)
  overlays_<map>.png      the first few images with GT box, predicted box and the map
  per_class_<map>.csv/png the per-class breakdown
  maps/rank<r>.npz        only with --save-maps: this rank's raw maps (map_<name>: float32 [n, h, w] at
                          the model's resolution) with their indices, labels and predicted classes

Benchmarks (--benchmark, eval.benchmarks; any combination):
  wsol             the metrics above, on the ground-truth class's map of each kind
  cue              cue localization (CALM.md §4): for every class pair that differs in 1, 2 or 3 parts, the
                   map |map_y1 - map_y2| of each image of either class, scored by PxAP against the differing
                   parts (synthetic sets: exact part masks; CUB: the reference protocol), per group and
                   pair-weighted; the maps of all classes come from the WSOL pass's forward pass. Adds
                   cue_<map>.png (a grid of cue maps with the differing-part masks) and the cue table;
                   eval.cue_* keys set the grid and normalisation.
  remove-classify  R_k (CALM.md §4): accuracy after erasing the top k% pixels of a map over accuracy after
                   erasing k% random pixels, k = 10, 30, 50, 70, 90, for every map source: the model's map
                   kinds, --gradient maps and --control maps. Adds the R_k table and remove_classify.png.
wsol and cue share one pass over the split (its cost per benchmark is in results.json under "cost").
Gradient maps ("grad-<method>") and controls ("control-<name>") are also scored by the WSOL metrics when
wsol is asked, and by cue localization when cue is asked: each gradient map is then computed for the
image's class and its pair partners' classes (the reference's published gradient rows are these cue
numbers), the blurred CAM per class; the centred Gaussian and random controls are the same map for every
class (a zero difference) and are listed as not scored. They run in a second pass
(`calm_fast.evaluate.attribution.benchmarks`), over the first --attribution-images samples of the split
when that is given (the gradient set costs ~100 forward+backward passes per image and class); that pass's
cost is in results.json under "attribution", each cue row's image count under cue.maps.<name>.num_images.
results.json's "headline" holds the numbers of every benchmark per map source (`calm_fast.evaluate.headline`).

Map sources. `evaluate_maps(map_fn, split, loader, ...)` scores anything that turns a batch into maps:
a model (`ModelMaps`), or a class-agnostic baseline (`BaselineMaps`: a centred Gaussian, the smoothed
image-gradient energy), through the same metric code. Cue localization needs the maps of every class
(`MapBatch.class_maps`), which class-agnostic baselines do not have.

Examples (config overrides go before the list options --split/--map-kind/--baseline):
  calm-fast eval --run runs/synthetic                       model.pt of the run, eval.split, eval.map_kind
  calm-fast eval --run runs/synthetic eval.cam_curve_interval=0.001 --split val test --map-kind all
  calm-fast eval -c configs/synthetic.toml --baseline centre-gaussian image-energy
  calm-fast eval --run runs/synthetic --benchmark wsol cue --map-kind joint class
  calm-fast eval --run runs/synthetic --benchmark wsol remove-classify --gradient vanilla smoothgrad \
      --control centre-gaussian random blurred-cam --attribution-images 200
  calm-fast eval --run runs/cub_cam --benchmark cue --gradient vargrad smoothgrad ig-reference vanilla
  torchrun --standalone --nproc_per_node 8 -m calm_fast.cli eval --run runs/x      (or the deepspeed
      launcher with --module calm_fast.cli eval ...): 8 ranks, the same numbers as one process

"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from calm_fast.atomic import save_npz
from calm_fast.config import Config, ConfigError, effective_map_kind, load_config, with_overrides
from calm_fast.data.loaders import build_eval_loader, data_repairs
from calm_fast.data.splits import read_configured_split
from calm_fast.distributed import Watchdog, init_world, report_rank_failure, share_cpu_threads, shutdown_world
from calm_fast.errors import is_user_error
from calm_fast.evaluate.attribution.benchmarks import (
    CONTROLS,
    GRADIENT_METHODS,
    AttributionOptions,
    attribution_sections,
    cue_exclusions,
    cue_map_names,
    merge_into,
    run_attribution,
)
from calm_fast.evaluate.attribution.cue import build_cue_localization
from calm_fast.evaluate.attribution.gradients import GradientSettings
from calm_fast.evaluate.job import evaluate_maps
from calm_fast.evaluate.maps import BaselineMaps, MapFn, ModelMaps, check_map_kinds
from calm_fast.evaluate.reports import write_reports
from calm_fast.evaluate.scoring import EvalSettings
from calm_fast.models.weights import load_weights, num_classes_of
from calm_fast.models.wsol import build_model_from
from calm_fast.modes import Baseline, Benchmark, MapKind, Method, choices, map_kinds_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="a training run folder: its config.toml, its model.pt (else newest checkpoint), "
                             "and results under RUN_DIR/eval/")
    parser.add_argument("--config", "-c", metavar="TOML", help="experiment config (default: the run's or the "
                        "checkpoint's own)")
    parser.add_argument("--checkpoint", metavar="PATH", help="model.pt from training, a checkpoint folder "
                        "(checkpoints/step_N), a run folder, or a plain state dict file")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides, e.g. eval.cam_curve_interval=0.001 data.root=data")
    parser.add_argument("--split", nargs="+", metavar="SPLIT", help="split(s) to evaluate (default: eval.split)")
    parser.add_argument("--map-kind", nargs="+", metavar="KIND",
                        help=f"map kind(s): {choices(MapKind)} or all (default: eval.map_kind)")
    parser.add_argument("--benchmark", nargs="+", metavar="NAME", choices=tuple(Benchmark),
                        help=f"what to measure, in one pass over the split: {choices(Benchmark)} "
                             "(default: eval.benchmarks)")
    parser.add_argument("--gradient", nargs="+", metavar="METHOD", choices=GRADIENT_METHODS, default=[],
                        help=f"gradient map sources, scored like the model's maps: {', '.join(GRADIENT_METHODS)}")
    parser.add_argument("--control", nargs="+", metavar="NAME", choices=CONTROLS, default=[],
                        help=f"control map sources: {', '.join(CONTROLS)}")
    parser.add_argument("--attribution-images", type=int, metavar="N",
                        help="run remove-and-classify, gradients and controls (all their benchmarks) on the split's "
                             "first N images only")
    parser.add_argument("--ig-steps", type=int, default=GradientSettings.ig_steps, metavar="N",
                        help="intervals of the IG path (N + 1 points; default %(default)s, as the reference)")
    parser.add_argument("--smooth-samples", type=int, default=GradientSettings.smooth_samples, metavar="N",
                        help="SmoothGrad/VarGrad noise samples per image (default %(default)s, as the reference)")
    parser.add_argument("--baseline", nargs="+", metavar="NAME", choices=tuple(Baseline),
                        help=f"evaluate class-agnostic baseline maps instead of a model: {choices(Baseline)}")
    parser.add_argument("--out", metavar="DIR", help="results folder (default: RUN_DIR/eval/SPLIT, "
                        "RUN_DIR/eval-baselines/SPLIT for --baseline)")
    parser.add_argument("--overlays", type=int, default=8, metavar="N",
                        help="images in the overlay grid (the split's first N; 0: none)")
    parser.add_argument("--no-per-class", dest="per_class", action="store_false",
                        help="skip the per-class breakdown (one metric state instead of one per class)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write each rank's raw maps to OUT/maps/rank<r>.npz (compressed)")


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None, dict[str, torch.Tensor] | None]:
    """(config, checkpoint to evaluate, its weights if already read).

    The config is --config, else the run's config.toml, else the one a checkpoint carries, then the
    overrides. With --run, results go under that run folder (unless run_dir is overridden).
    """
    run = Path(args.run) if args.run else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else run
    state_dict = None
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif run is not None and (run / "config.toml").is_file():
        cfg = load_config(run / "config.toml", args.overrides)
    elif checkpoint is not None and not args.baseline:
        state_dict, saved = load_weights(checkpoint)
        if saved is None:
            raise ConfigError(f"{checkpoint}: holds no config; pass --config")
        cfg = with_overrides(saved, args.overrides)
    else:
        raise ConfigError("no config: pass --config TOML, --run RUN_DIR, or a --checkpoint that carries its config")
    if run is not None and not any(o.strip().startswith("run_dir=") for o in args.overrides):
        cfg = dataclasses.replace(cfg, run_dir=str(run))
    return cfg, checkpoint, state_dict


def main(args: argparse.Namespace) -> int:
    """Errors the user can fix propagate to calm_fast.cli, which prints them as one line."""
    cfg, checkpoint, state_dict = resolve_config(args)
    if args.benchmark:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, benchmarks=list(args.benchmark)))
    kinds = _map_kinds(args, cfg)
    cue_kinds = _cue_map_kinds(args, cfg, kinds)
    attribution = _attribution_options(args, cfg)
    splits = args.split or [cfg.eval.split]
    if args.overlays < 0:
        raise ConfigError(f"--overlays must be >= 0, got {args.overlays}")
    if checkpoint is None and not args.baseline:
        raise ConfigError("nothing to evaluate: pass --checkpoint, --run or --baseline")

    world = init_world(cfg.dist.timeout_minutes)
    # As in training: a rank that makes no progress for dist.watchdog_minutes (frozen, or waiting on a
    # frozen rank) stops the job, instead of waiting out the process-group timeout in a collective.
    watchdog = Watchdog(cfg.dist.watchdog_minutes * 60, world.rank).start()
    try:
        return _run(args, cfg, checkpoint, state_dict, splits, kinds, cue_kinds, attribution, world, watchdog)
    except Exception as error:
        if world.world_size == 1 or is_user_error(error):
            raise
        return report_rank_failure("eval", error)
    finally:
        watchdog.stop()
        shutdown_world()


def _map_kinds(args: argparse.Namespace, cfg: Config) -> tuple[str, ...]:
    for value in (args.map_kind or []) + (args.split or []):
        if "=" in value:
            raise ConfigError(f"{value!r} looks like a config override: put overrides before --map-kind/--split")
    if args.baseline:
        return tuple(args.baseline)
    if not args.map_kind:
        kinds = (effective_map_kind(cfg),)
    elif args.map_kind == ["all"]:
        kinds = map_kinds_of(Method(cfg.model.method))
    else:
        kinds = tuple(args.map_kind)
    return check_map_kinds(kinds, cfg.model.method)


def _cue_map_kinds(args: argparse.Namespace, cfg: Config, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The map kinds cue localization scores: the asked kinds that differ between classes (not the prior)."""
    if Benchmark.CUE not in cfg.eval.benchmarks:
        return ()
    if args.baseline:
        raise ConfigError("cue localization compares the maps of two classes; class-agnostic baselines have "
                          "one map per image: drop --baseline or the cue benchmark")
    per_class = tuple(kind for kind in kinds if kind != MapKind.PRIOR)
    if not per_class:
        raise ConfigError("cue localization needs a per-class map (joint, posterior or class); the prior "
                          "p(z | x) is the same for every class")
    return per_class


def _attribution_options(args: argparse.Namespace, cfg: Config) -> AttributionOptions | None:
    """The attribution pass's options, or None when it has nothing to do."""
    benchmarks = cfg.eval.benchmarks
    if not benchmarks:
        raise ConfigError(f"eval.benchmarks is empty: name at least one of {choices(Benchmark)}")
    try:  # the options check their own values (--attribution-images, --ig-steps, --smooth-samples)
        options = AttributionOptions(
            remove_classify=Benchmark.REMOVE_CLASSIFY in benchmarks, wsol=Benchmark.WSOL in benchmarks,
            cue=Benchmark.CUE in benchmarks,
            gradients=tuple(args.gradient), controls=tuple(args.control), images=args.attribution_images,
            gradient=GradientSettings(ig_steps=args.ig_steps, smooth_samples=args.smooth_samples,
                                      seed=cfg.train.seed),
            seed=cfg.train.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if (args.gradient or args.control) and not options.needed:
        agnostic = " (cue localization scores no class-agnostic control: centre-gaussian, random)" if options.cue else ""
        raise ConfigError("--gradient/--control maps need a benchmark to score them: wsol, remove-classify, or cue "
                          f"for gradients and blurred-cam{agnostic}")
    if not options.needed:
        return None
    if args.baseline:
        raise ConfigError("remove-and-classify, --gradient and --control need a model; drop --baseline")
    return options


def _run(args, cfg: Config, checkpoint: Path | None, state_dict: dict[str, torch.Tensor] | None, splits: list[str],
         kinds: tuple[str, ...], cue_kinds: tuple[str, ...], attribution: AttributionOptions | None, world,
         watchdog: Watchdog) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs: wide enough for the results table
    share_cpu_threads(world)
    settings = EvalSettings.from_config(cfg, per_class=args.per_class, overlay_count=args.overlays,
                                        save_maps=args.save_maps, wsol=Benchmark.WSOL in cfg.eval.benchmarks)
    # The command as typed (after the program name), so that every results.json says how it was made.
    info: dict[str, Any] = {"command": shlex.join(["calm-fast", *sys.argv[1:]]), "world_size": world.world_size,
                            "benchmarks": list(cfg.eval.benchmarks)}
    first_pass = settings.wsol or bool(cue_kinds)  # WSOL and cue share the model's one forward pass per image
    num_classes = cfg.data.num_classes
    if args.baseline:
        info.update(source="baseline", baselines=list(args.baseline))
    else:
        if state_dict is None:
            state_dict, _ = load_weights(checkpoint)
        num_classes = num_classes or num_classes_of(state_dict, checkpoint)
        model = build_model_from(cfg, num_classes, state_dict, checkpoint).to(world.device).eval()
        info.update(source="model", checkpoint=str(checkpoint), backbone=cfg.model.backbone,
                    method=cfg.model.method, prior=cfg.model.prior)
    for split_name in splits:
        split = read_configured_split(cfg, split_name, num_classes)
        if args.baseline:
            source: MapFn = BaselineMaps(kinds)
        else:
            source = ModelMaps(model, cfg.model.method, kinds, cfg.model.prior, world.device, class_map_kinds=cue_kinds)
        progress = world.is_main and console.is_terminal
        evaluation, sections = None, {}
        split_info = {**info, **data_repairs(cfg, split)}
        watchdog.beat(f"start of {split_name}")
        if first_pass:
            cue = build_cue_localization(cfg, split, cue_kinds, args.overlays) if cue_kinds else None
            loader = build_eval_loader(cfg, split, world.rank, world.world_size, world.device)
            evaluation = evaluate_maps(source, split, loader, settings, progress=progress, cue=cue,
                                       heartbeat=watchdog.beat)
        if attribution is not None:
            loader = build_eval_loader(cfg, split, world.rank, world.world_size, world.device)
            names = cue_map_names(attribution) if attribution.cue else ()
            if attribution.cue:  # the controls it leaves out are listed even when nothing else is scored
                cue.excluded.update(cue_exclusions(attribution))
            extra_cue = build_cue_localization(cfg, split, names, args.overlays, truth=cue.truth) if names else None
            extra = run_attribution(model, cfg.model.method, kinds, cfg.model.prior, split, loader, attribution,
                                    settings, world.device, progress=progress, heartbeat=watchdog.beat, cue=extra_cue)
            evaluation, sections = merge_into(evaluation, extra, len(split)), attribution_sections(extra)
        default_out = Path(cfg.run_dir) / ("eval-baselines" if args.baseline else "eval") / split_name
        out_dir = Path(args.out) / split_name if args.out and len(splits) > 1 else Path(args.out or default_out)
        if settings.save_maps and evaluation.saved_maps is not None:
            save_npz(out_dir / "maps" / f"rank{world.rank:05d}.npz", **evaluation.saved_maps)
        if world.is_main:
            write_reports(evaluation, split, out_dir, split_info, settings, console=console,
                          cue_cumulative=cfg.eval.cue_cumulative, sections=sections)
            console.print(f"results: {out_dir / 'results.json'}")
        watchdog.beat(f"reports of {split_name}")
    return 0
