"""Train several methods and precisions over several seeds on the synthetic set, evaluate, and tabulate.

The science and fidelity questions of the project are answered with this one driver: CALM-EM vs CALM-ML vs
CAM (attribution and localization), and bf16 vs fp32 training (same config, same seeds). Every run has a
fixed number of optimizer steps, never a time budget, so its result does not depend on how busy the
machine is. Runs go through the real `calm-fast train` and `calm-fast eval` commands (one process each, one
core each, `--parallel` at a time); a run whose `model.pt` exists is not trained again, and an evaluation
whose `results.json` exists is not repeated, so the driver resumes after any interruption.

    # the commands behind the README's attribution and precision tables (training is shared; the
    # positional overrides go before the options that take several values):
    python benchmarks/seeds.py --out runs/seeds data.eval_loader=torch --runs calm-em:bf16 calm-ml:bf16 \
        cam:bf16 --seeds 0 1 2 --steps 1000 --eval-args "--benchmark wsol cue remove-classify \
        --control centre-gaussian random blurred-cam --attribution-images 200" \
        --method-eval-args "cam=--gradient vanilla ig-reference smoothgrad vargrad --ig-steps 20 --smooth-samples 20"
    python benchmarks/seeds.py --out runs/seeds data.eval_loader=torch --runs calm-em:fp32 --seeds 0 1 2 \
        --steps 1000 --eval-args "--benchmark wsol"

(the paper's gradient baselines are computed on CAM models, as the reference does; they cost ~100
forward+backward passes per image, hence the attribution subset on a CPU.)

The table gives, per run kind, the mean and the spread (sample standard deviation and min..max) over seeds
of every number that the evaluation's headline reports; `OUT/summary.json` holds every run's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/seeds", help="folder of the runs and the summary")
    parser.add_argument("--config", default="configs/synthetic.toml", help="training config of every run")
    parser.add_argument("--data", default="data", help="data root of the synthetic dataset (made if missing)")
    parser.add_argument("--runs", nargs="+", default=["calm-em:bf16", "calm-ml:bf16", "cam:bf16", "calm-em:fp32"],
                        help="METHOD:PRECISION kinds of run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of every run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--phase", choices=("train", "eval", "all"), default="all")
    parser.add_argument("--eval-args", default="", help="extra arguments of every `calm-fast eval` (one string)")
    parser.add_argument("--method-eval-args", nargs="+", default=[], metavar="METHOD=ARGS",
                        help="more `calm-fast eval` arguments for the runs of one method, e.g. "
                             "'cam=--gradient vanilla smoothgrad'")
    parser.add_argument("--split", default="test")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="overrides for every run")
    return parser.parse_args(argv)


def run_name(kind: str, seed: int) -> str:
    method, precision = kind.split(":")
    return f"{method}-{precision}-seed{seed}"


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "calm_fast.cli", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _run_all(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run (name, argv, log) jobs, `parallel` at a time; stop at the first failure, naming its log."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv, log = pending.pop(0)
            print(f"start {name}", flush=True)
            running.append((name, _cli(argv, log), log, time.perf_counter()))
        time.sleep(1)
        for entry in list(running):
            name, process, log, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if process.returncode != 0:
                for _, other, _, _ in running:
                    other.kill()
                raise SystemExit(f"{name} failed (exit {process.returncode}); see {log}")
            print(f"done  {name} in {time.perf_counter() - started:.0f} s", flush=True)


def ensure_data(args: argparse.Namespace, dataset: str = "SYNTH") -> None:
    if not (Path(args.data) / "metadata" / dataset / "synthetic.json").exists():
        subprocess.run([sys.executable, "-m", "calm_fast.cli", "synth", "--out", args.data, "--name", dataset],
                       cwd=REPO, check=True)
    subprocess.run([sys.executable, "-m", "calm_fast.cli", "convert", "--data-root", args.data, "--dataset",
                    dataset], cwd=REPO, check=True)


def train_jobs(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str], Path]]:
    jobs = []
    for kind in args.runs:
        method, precision = kind.split(":")
        for seed in args.seeds:
            run_dir = out / run_name(kind, seed)
            if (run_dir / "model.pt").exists():
                continue
            if run_dir.exists():  # an interrupted run: start it again from scratch (same seed, same result)
                shutil.rmtree(run_dir)
            argv = ["train", "-c", args.config, *args.overrides, f"data.root={args.data}", f"run_dir={run_dir}",
                    f"model.method={method}", f"train.precision={precision}", f"train.seed={seed}",
                    f"train.max_steps={args.steps}", "train.epochs=1000", "train.max_minutes=1e6",
                    "train.val_every=0", "train.val_localization=false", "train.checkpoint_every=0",
                    "train.progress=false", "data.workers=1"]
            jobs.append((run_name(kind, seed), argv, out / "logs" / f"train-{run_name(kind, seed)}.log"))
    return jobs


def method_eval_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """--method-eval-args as {method: argv}."""
    out = {}
    for entry in args.method_eval_args:
        method, sep, extra = entry.partition("=")
        if not sep or not method:
            raise SystemExit(f"--method-eval-args {entry!r}: expected METHOD=ARGS, e.g. 'cam=--gradient vanilla'")
        methods = sorted({kind.split(":")[0] for kind in args.runs})
        if method not in methods:  # e.g. a SECTION.KEY=VALUE override swallowed by this multi-value option
            raise SystemExit(f"--method-eval-args {entry!r}: {method!r} is none of the methods run ({methods}); "
                             "put SECTION.KEY=VALUE overrides before the options that take several values")
        out.setdefault(method, []).extend(shlex.split(extra))
    return out


def eval_jobs(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str], Path]]:
    jobs = []
    per_method = method_eval_args(args)
    for kind in args.runs:
        for seed in args.seeds:
            run_dir = out / run_name(kind, seed)
            if (run_dir / "eval" / args.split / "results.json").exists():
                continue
            argv = ["eval", "--run", str(run_dir), *args.overrides, f"data.root={args.data}", "--split", args.split,
                    *shlex.split(args.eval_args), *per_method.get(kind.split(":")[0], [])]
            jobs.append((run_name(kind, seed), argv, out / "logs" / f"eval-{run_name(kind, seed)}.log"))
    return jobs


def _numbers(tree, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested results dict, keyed by its dotted path (lists and arrays skipped)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def summarise(args: argparse.Namespace, out: Path) -> dict:
    per_kind: dict[str, dict[str, list[float]]] = {}
    runs, commands = {}, {}
    for kind in args.runs:
        for seed in args.seeds:
            path = out / run_name(kind, seed) / "eval" / args.split / "results.json"
            if not path.exists():
                continue
            results = json.loads(path.read_text())
            numbers = _numbers(results.get("headline", results.get("maps", {})))
            runs[run_name(kind, seed)] = numbers
            commands[run_name(kind, seed)] = results.get("command")  # how that evaluation was run
            for key, value in numbers.items():
                per_kind.setdefault(kind, {}).setdefault(key, []).append(value)
    table = {}
    for kind, columns in per_kind.items():
        table[kind] = {key: {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                             "min": min(values), "max": max(values), "n": len(values)}
                       for key, values in columns.items()}
    return {"runs": runs, "commands": commands, "table": table, "steps": args.steps, "seeds": args.seeds, "config": args.config,
            "overrides": args.overrides, "eval_args": args.eval_args, "method_eval_args": args.method_eval_args}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    ensure_data(args)
    if args.phase in ("train", "all"):
        _run_all(train_jobs(args, out), args.parallel)
    if args.phase in ("eval", "all"):
        _run_all(eval_jobs(args, out), args.parallel)
        summary = summarise(args, out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out / "summary.json")
        for kind, columns in summary["table"].items():
            print(kind)
            for key, stats in sorted(columns.items()):
                print(f"  {key:60s} {stats['mean']:8.2f} ± {stats['std']:.2f}  [{stats['min']:.2f} .. "
                      f"{stats['max']:.2f}] n={stats['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
