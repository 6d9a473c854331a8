"""`xspecmesh tokenize`: BPT tokens of mesh files (one JSON line per input with --json)."""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "tokenize",
        help="BPT tokens of mesh files",
        description="Load each mesh as it is, run BPT's preprocessing (normalize, 7-bit quantization, merge, sort) "
        "and print its token sequence (no BOS/EOS).",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="mesh files (obj/ply/stl/off/glb/gltf)")
    p.add_argument("--json", action="store_true", help='one line per input: {"path", "faces", "tokens"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xspecmesh.geometry.mesh import load_mesh
    from xspecmesh.geometry.tokenizer import preprocess, serialize

    for path in args.inputs:
        mesh = load_mesh(path, process=False)  # the tokenizer does BPT's own merging
        qverts, faces = preprocess(mesh.vertices, mesh.faces)
        tokens = serialize(qverts, faces)
        if args.json:
            print(json.dumps({"path": path, "faces": len(faces), "tokens": tokens}, separators=(",", ":")))
        else:
            ratio = len(tokens) / (9 * len(faces)) if len(faces) else 0.0
            print(f"{path}: {len(faces)} faces, {len(qverts)} vertices -> {len(tokens)} tokens "
                  f"({len(tokens) / max(len(faces), 1):.2f} per face, {ratio:.1%} of 9 per face)")
    return 0
