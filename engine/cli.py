"""The `echofm` command: one small parser function and one run function per subcommand.

Imports of heavy modules (torch, DALI, DeepSpeed) happen inside the run functions, so
`echofm --help` is instant. Errors a user can fix (bad recipe, bad input file) print one
line `echofm: error: ...` and exit 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set model.depth=6 (repeatable)")


# ---------------------------------------------------------------- config


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show a resolved recipe")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the recipe after includes, --set and validation")
    show.add_argument("recipe")
    _add_set(show)
    show.set_defaults(run=_run_config_show)


def _run_config_show(args) -> int:
    from .config import dump_yaml, load_recipe

    print(dump_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


# ---------------------------------------------------------------- main

# Each entry adds one subcommand; later features append theirs here.
SUBCOMMANDS: list[Callable] = [_add_config]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echofm", description="EchoFM: echocardiography video foundation model engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from echofm.loaders.errors import DataError

    from .config import ConfigError

    try:
        return int(args.run(args) or 0)
    except (ConfigError, UserError, DataError) as e:
        print(f"echofm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
