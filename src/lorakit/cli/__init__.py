"""The ``lorakit`` command line: ``lorakit {train,generate,merge,inspect,estimate,serve} --help``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors lorakit raises on purpose (:class:`~lorakit.errors.LorakitError`) are printed as one clear message
with exit status 1; usage errors exit with 2 (argparse). A signal that stops a command exits with 128 + its
number, as shells report it: Ctrl-C (SIGINT) 130, SIGTERM 143 (``lorakit train`` first writes a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.cli import estimate, generate, inspect, merge, serve, train
from lorakit.errors import LorakitError

COMMANDS = (train, generate, merge, inspect, estimate, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Parameter-efficient fine-tuning with LoRA, PEFT-compatible.",
        epilog="Run `lorakit COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LorakitError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
