"""`xspecmesh generate IN -o OUT`: a mesh file or an N x 6 .npy point cloud in, a generated mesh out (in IN's frame)."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

from xspecmesh.decoding.settings_schema import DECODE, cap_heads
from xspecmesh.model import precision


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an artist-like mesh for a mesh or point cloud")
    p.add_argument("input", help="mesh file (obj/ply/stl/off/glb) or .npy point cloud (N x 6: xyz + normal)")
    p.add_argument("-o", "--output", required=True, help="output mesh file (format from the extension)")
    add_decode_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the statistics")
    p.set_defaults(func=run)


def add_decode_options(p) -> None:
    """The decode settings, device, precision and checkpoint (shared with `xspecmesh batch`); the settings' checks
    run on the values (DecodeSettings.from_dict), so a bad one exits with its message."""
    for s in DECODE:  # one option per decode setting of xspecmesh.decoding.settings_schema
        if s.name == "precision":  # precision.add_argument below: the same option for every command that loads one
            continue
        flag = "--" + s.name.replace("_", "-")
        if s.type is bool:  # --fit / --no-fit
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=s.default,
                           help=f"{s.help} (default: {'on' if s.default else 'off'})")
        elif s.choices:
            p.add_argument(flag, choices=s.values, default=s.default, help=f"{s.help} (default: %(default)s)")
        else:
            p.add_argument(flag, type=s.type, default=s.default, help=f"{s.help}; {s.range_text()}"
                           + ("" if s.default is None else " (default: %(default)s)"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    precision.add_argument(p)
    p.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")


def settings_from_args(args):
    from xspecmesh.decoding.engine import DecodeSettings

    return DecodeSettings.from_dict({s.name: getattr(args, s.name) for s in DECODE})


def fit_heads(settings, engine) -> None:
    """Cap the settings' heads at the checkpoint's (with a note), or refuse spec without heads."""
    from xspecmesh.errors import SettingsError

    if settings.mode == "spec" and engine.max_heads == 0:
        raise SettingsError("this checkpoint has no drafting heads; use --mode ar")
    if settings.mode == "spec" and settings.heads > engine.max_heads:
        print(f"xspecmesh: note: the checkpoint has {engine.max_heads} heads; using {engine.max_heads}",
              file=sys.stderr)
        settings.heads = cap_heads(settings.heads, engine.max_heads)


def run(args) -> int:
    from xspecmesh.decoding.engine import Engine
    from xspecmesh.geometry.mesh import load_input, save_mesh, welded

    settings = settings_from_args(args)
    engine = Engine.load(args.checkpoint, args.device, args.precision)
    fit_heads(settings, engine)
    points, norm = load_input(args.input, engine.model.cfg.encoder.num_points, args.seed)
    result = engine.generate(points, settings)
    vertices, faces = welded(result.mesh, norm, result.stats["tokens"], f" for {args.input}")
    save_mesh(args.output, vertices, faces)
    stats = result.stats | {"faces": int(len(faces)), "vertices": int(len(vertices)),
                            "sequence_sha256": hashlib.sha256(",".join(map(str, result.tokens)).encode()).hexdigest(),
                            "checkpoint": engine.ckpt.path, "output": args.output}
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"{args.output}: {stats['faces']} faces, {stats['tokens']} tokens in {stats['steps']} steps "
              f"(SCR {stats['scr']:.2f}), {stats['seconds']:.2f} s, {stats['tokens_per_second']:.0f} tokens/s")
    return 0
