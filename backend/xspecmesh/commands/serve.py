"""`xspecmesh serve`: the Blender add-on's backend (xspecmesh/serving: protocol.py, server.py)."""
from __future__ import annotations

import argparse

from xspecmesh.model import precision


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="backend for the Blender add-on: JSON lines on stdin/stdout, logs on stderr",
        description="Load the model once, print a hello line, then answer generate/cancel/shutdown requests "
        "(one JSON object per line) until shutdown or end of input. Opens no network port.",
    )
    p.add_argument("--checkpoint", default=None, help="model file (default: the shipped checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model")
    p.add_argument("--batch", type=int, default=8,
                   help="decode up to B queued requests with the same settings together (1: one at a time)")
    precision.add_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xspecmesh.serving.server import serve_main

    from xspecmesh.errors import SettingsError

    if args.batch < 1:
        raise SettingsError("--batch must be at least 1")
    return serve_main(args.checkpoint, args.device, args.precision, args.batch)
