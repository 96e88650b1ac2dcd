"""The ``gatekit`` command: a thin layer over the public API, one module per subcommand."""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import GatekitError
from . import profile, sites

SUBCOMMANDS = (profile, sites)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatekit",
        description="Dynamic channel and layer gating for residual networks: inspect and profile models.",
        epilog="Run `gatekit COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"gatekit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status (2 for bad input)."""
    arguments = build_parser().parse_args(argv)
    try:
        return arguments.run(arguments)
    except (GatekitError, OSError) as error:
        # One line, no traceback: the message already says what is wrong and how to fix it.
        message = str(error).replace("\n", " ")
        print(f"gatekit {arguments.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
