"""The `calm-fast` command. Each subcommand is one module with add_arguments(parser) and main(args).

Errors a user can fix (`calm_fast.errors.is_user_error`: config, metadata, input files, permissions,
checkpoints, weights that do not fit) end every subcommand the same way: one line `calm-fast COMMAND:
message` on stderr (with the rank under a multi-process launcher) and exit status 2. Other exceptions are
bugs and keep their traceback; `--debug` keeps it for every error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from calm_fast.console import user_error
from calm_fast.errors import is_user_error

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
    parser.add_argument("--debug", action="store_true", help="print the full traceback of every error")
    # Also accepted after the subcommand; SUPPRESS keeps the subparser from resetting the global flag.
    debug_too = argparse.ArgumentParser(add_help=False)
    debug_too.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="print the full traceback of every error")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        sub = subparsers.add_parser(name, help=summary, description=(module.__doc__ or "").strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug_too])
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except Exception as error:
        if args.debug or not is_user_error(error):
            raise
        return user_error(args.command, error)


if __name__ == "__main__":
    sys.exit(main())
