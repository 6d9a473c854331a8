"""`xspecmesh generate IN -o OUT`: a mesh file or an N x 6 .npy point cloud in, a generated mesh out (in IN's frame)."""
from __future__ import annotations

import hashlib
import json
import sys

from xspecmesh.model import precision


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an artist-like mesh for a mesh or point cloud")
    p.add_argument("input", help="mesh file (obj/ply/stl/off/glb) or .npy point cloud (N x 6: xyz + normal)")
    p.add_argument("-o", "--output", required=True, help="output mesh file (format from the extension)")
    add_decode_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the statistics")
    p.set_defaults(func=run)


def add_decode_options(p) -> None:
    """The decode settings, device, checkpoint and --fit (shared with `xspecmesh batch`)."""
    p.add_argument("--mode", choices=["ar", "spec", "naive"], default="spec")
    p.add_argument("--heads", type=int, default=4, help="drafting heads D (capped by the checkpoint's)")
    p.add_argument("--adaptive", action="store_true",
                   help="choose each step's number of drafts (0..heads) from measured acceptance and step cost")
    p.add_argument("--delta", type=float, default=0.5, help="threshold rule: accept while p(x) > delta")
    p.add_argument("--accept", choices=["threshold", "exact", "greedy", "topk"], default="threshold")
    p.add_argument("--topk-accept", type=int, default=5, help="K of the topk rule")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=10000)
    p.add_argument("--max-faces", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    precision.add_argument(p)
    p.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")
    p.add_argument("--fit", action="store_true",
                   help="move the result's vertices onto the input surface (connectivity unchanged; "
                        "xspecmesh.geometry.fit)")


def settings_from_args(args):
    from xspecmesh.decoding.engine import DecodeSettings

    return DecodeSettings(mode=args.mode, heads=args.heads, adaptive=args.adaptive, delta=args.delta,
                          accept=args.accept, topk_accept=args.topk_accept, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens, max_faces=args.max_faces,
                          seed=args.seed, fit=args.fit).validate()


def fit_heads(settings, engine) -> None:
    """Cap the settings' heads at the checkpoint's (with a note), or refuse spec without heads."""
    from xspecmesh.errors import SettingsError

    if settings.mode == "spec" and engine.max_heads == 0:
        raise SettingsError("this checkpoint has no drafting heads; use --mode ar")
    if settings.mode == "spec" and settings.heads > engine.max_heads:
        print(f"xspecmesh: note: the checkpoint has {engine.max_heads} heads; using {engine.max_heads}",
              file=sys.stderr)
        settings.heads = engine.max_heads


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
