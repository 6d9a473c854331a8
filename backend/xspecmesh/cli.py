"""`xspecmesh` command line. Each sub-command lives in `xspecmesh/commands/<name>.py` with `register(sub)`,
which adds its parser and sets `func`; heavy imports happen inside `func` so `--help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from xspecmesh import __version__
from xspecmesh.errors import XSpecMeshError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xspecmesh", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"xspecmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    import xspecmesh.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"xspecmesh.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except XSpecMeshError as exc:
        print(f"xspecmesh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xspecmesh: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`xspecmesh tokenize ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot raise again
        return 141
