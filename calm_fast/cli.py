"""The `calm-fast` command. Each subcommand is one module with add_arguments(parser) and main(args)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module; the module docstring's first line is the subcommand's help.
SUBCOMMANDS = {
    "synth": "calm_fast.data.synthetic",
    "convert": "calm_fast.data.ffcv_convert",
    "train": "calm_fast.train.cli",
    "eval": "calm_fast.evaluate.cli",
    "bench": "calm_fast.bench",
    "demo": "calm_fast.demo",
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None  # that part of calm-fast is not installed in this version
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-fast",
        description="CALM (class activation latent mapping): synthetic data, FFCV conversion, DeepSpeed "
        "training, exact WSOL evaluation and benchmarks. Run `calm-fast SUBCOMMAND --help` for details.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        sub = subparsers.add_parser(name, help=summary, description=(module.__doc__ or "").strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
