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
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    precision.add_argument(p)
    p.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the statistics")
    p.set_defaults(func=run)


def add_decode_options(p) -> None:
    """One option per decode setting of xspecmesh.decoding.settings_schema: `--max-faces` for max_faces, `--fit` and
    `--no-fit` for fit; its checks run on the values (DecodeSettings.from_dict), so a bad one exits with its message."""
    for s in DECODE:
        if s.name == "precision":  # model.precision.add_argument: the same option for every command that loads one
            continue
        flag = "--" + s.name.replace("_", "-")
        if s.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=s.default,
                           help=f"{s.help} (default: {'on' if s.default else 'off'})")
        elif s.choices:
            p.add_argument(flag, choices=s.values, default=s.default, help=f"{s.help} (default: %(default)s)")
        else:
            p.add_argument(flag, type=s.type, default=s.default, help=f"{s.help}; {s.range_text()}"
                           + ("" if s.default is None else " (default: %(default)s)"))


def load_input(path: str, count: int, seed: int):
    """Points (count, 6) in the normalized frame and the Normalization that maps back to the input's frame."""
    import numpy as np

    from xspecmesh.geometry.mesh import load_mesh, load_points, normalize, sample_surface

    if str(path).lower().endswith(".npy"):
        pts = load_points(path)
        xyz, norm = normalize(pts[:, :3])
        return np.concatenate([xyz, pts[:, 3:]], 1).astype(np.float32), norm
    mesh = load_mesh(path)
    xyz, norm = normalize(mesh.vertices)
    mesh.vertices = xyz
    return sample_surface(mesh, count, seed), norm


def run(args) -> int:
    import numpy as np

    from xspecmesh.decoding.engine import DecodeSettings, Engine
    from xspecmesh.errors import SettingsError
    from xspecmesh.geometry.mesh import save_mesh, weld

    settings = DecodeSettings.from_dict({s.name: getattr(args, s.name) for s in DECODE})
    engine = Engine.load(args.checkpoint, args.device, args.precision)
    if settings.mode == "spec" and engine.max_heads == 0:
        raise SettingsError("this checkpoint has no drafting heads; use --mode ar")
    if settings.mode == "spec" and settings.heads > engine.max_heads:
        print(f"xspecmesh: note: the checkpoint has {engine.max_heads} heads; using {engine.max_heads}",
              file=sys.stderr)
        settings.heads = cap_heads(settings.heads, engine.max_heads)
    points, norm = load_input(args.input, engine.model.cfg.encoder.num_points, args.seed)
    result = engine.generate(points, settings)
    tris = result.mesh.reshape(-1, 3)
    vertices, faces = weld(norm.invert(tris), np.arange(len(tris)).reshape(-1, 3))
    if len(faces) == 0:
        from xspecmesh.errors import XSpecMeshError

        raise XSpecMeshError(f"the model produced no faces for {args.input} ({result.stats['tokens']} tokens)")
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
