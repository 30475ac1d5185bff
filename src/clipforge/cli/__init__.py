"""`clipforge` command line. Each sub-command lives in one module of this package with a `register(sub)`
function; flags become explicit arguments of library calls here and travel no further."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register sub-commands, in the order `--help` lists them. A module whose optional
# dependencies are missing still registers; the command says what to install when run.
COMMAND_MODULES = ["core", "export", "train", "data", "index", "serve", "apps", "eval"]


def build_parser() -> argparse.ArgumentParser:
    from clipforge import __version__

    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="Train, load, run and serve CLIP image-text models. Reads local files only.",
    )
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"clipforge.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        # Bad input is reported in one line naming the culprit, not as a traceback.
        print(f"clipforge {args.command}: error: {e}", file=sys.stderr)
        return 2
