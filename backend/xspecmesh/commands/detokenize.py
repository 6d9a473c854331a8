"""`xspecmesh detokenize`: a BPT token sequence back to a mesh file."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "detokenize",
        help="BPT tokens back to a mesh",
        description="Read a JSON token list (or an object with a \"tokens\" list, as `tokenize --json` prints), "
        "decode it (stops at EOS), weld the vertices and write the mesh in the [-1, 1] cube.",
    )
    p.add_argument("tokens", metavar="TOKENS.json", help="JSON file, or - for stdin")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="mesh file to write (format by extension)")
    p.add_argument("--json", action="store_true", help='print {"path", "faces", "vertices", "tokens"}')
    p.set_defaults(func=run)


def read_tokens(path: str) -> list[int]:
    from xspecmesh.errors import MeshError

    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise MeshError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise MeshError(f"{path}: not JSON") from None
    tokens = data.get("tokens") if isinstance(data, dict) else data
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise MeshError(f'{path}: expected a JSON list of integers or an object with a "tokens" list')
    return tokens


def run(args: argparse.Namespace) -> int:
    from xspecmesh.errors import MeshError
    from xspecmesh.geometry.mesh import save_mesh
    from xspecmesh.geometry.tokenizer import decode_mesh

    tokens = read_tokens(args.tokens)
    vertices, faces = decode_mesh(tokens)
    if len(faces) == 0:
        raise MeshError(f"{args.tokens}: the tokens decode to no faces")
    save_mesh(args.output, vertices, faces)
    if args.json:
        print(json.dumps({"path": args.output, "faces": len(faces), "vertices": len(vertices), "tokens": len(tokens)}))
    else:
        print(f"{args.output}: {len(faces)} faces, {len(vertices)} vertices from {len(tokens)} tokens")
    return 0
