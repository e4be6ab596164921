"""The `swarmfold` command: parse, validate, hand off.

Each module in this package registers a group of subcommands; handlers only turn
arguments into keyword arguments for library functions and print the results.

Exit codes: 0 success; 1 a runtime failure; 2 bad input (spec, data, checkpoint, usage);
3 refused because another instance holds the workdir; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from swarmfold.errors import ExitCode, setup_logging


def _modules() -> list:
    from swarmfold.cli import peer as peer_cmds

    mods = [peer_cmds]
    for optional in ("swarm", "daemon", "contrib", "doctor"):
        try:
            mods.append(__import__(f"swarmfold.cli.{optional}", fromlist=["register"]))
        except ModuleNotFoundError as e:
            if e.name != f"swarmfold.cli.{optional}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmfold", description="Folding@home for LLM training.")
    parser.add_argument("--log-level", default=os.environ.get("SWARMFOLD_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (default INFO, or $SWARMFOLD_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _modules():
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from swarmfold.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"swarmfold {args.command}: error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # e.g. `swarmfold logs | head`: the reader left, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
