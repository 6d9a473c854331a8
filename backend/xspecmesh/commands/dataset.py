"""`xspecmesh dataset {preview,stats,samples}`: look at the procedural training shapes (training/data.py), or decode the
backbone's own samples over them once for drafter training (training/sample_file.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time


def register(sub) -> None:
    p = sub.add_parser("dataset", help="preview or summarize the procedural training shapes",
                       description="Draw a contact sheet of training shapes, or print statistics about them.")
    dsub = p.add_subparsers(dest="action", required=True)

    pv = dsub.add_parser("preview", help="draw a contact sheet (PNG) of shapes as the model sees them")
    pv.add_argument("--count", type=int, default=16, help="number of shapes (default 16)")
    pv.add_argument("-o", "--output", default="dataset_preview.png", help="PNG to write")
    pv.add_argument("--seed", type=int, default=0, help="training stream seed")
    pv.add_argument("--families", default=None, 
                    help="comma-separated families and groups, e.g. hard_surface (default: the general mix)")
    pv.add_argument("--max-faces", type=int, default=400, help="face cap (default 400)")
    pv.add_argument("--points", action="store_true", help="overlay the conditioning point cloud")
    pv.add_argument("--per-family", type=int, default=None, metavar="N",
                    help="N shapes of every family in turn instead of --count from the mixed stream")
    pv.add_argument("--axis-turns", type=int, default=None, choices=(4, 24),
                    help="axis-aligned poses: 4 turns about up or all 24 quarter-turn rotations (default: free poses)")
    pv.set_defaults(func=run_preview)

    st = dsub.add_parser("stats", help="family histogram, faces, tokens per face, shapes per second")
    st.add_argument("--count", type=int, default=200, help="number of shapes (default 200)")
    st.add_argument("--seed", type=int, default=0, help="training stream seed")
    st.add_argument("--families", default=None, 
                    help="comma-separated families and groups, e.g. hard_surface (default: the general mix)")
    st.add_argument("--max-faces", type=int, default=400, help="face cap (default 400)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=run_stats)

    sm = dsub.add_parser("samples", help="decode the backbone's own samples over training shapes into a file that "
                         "`train heads --self-samples S --sample-file FILE` reads",
                         description="The backbone's own AR samples at the add-on's default sampling settings, for "
                         "the first --count shapes of the training stream of --seed, decoded --batch at a time and "
                         "written to a safetensors file (tokens only: training draws the shapes again).")
    sm.add_argument("--checkpoint", default=None, help="the backbone (default: the shipped checkpoint)")
    sm.add_argument("--count", type=int, default=1000, help="shapes, one sample each (default 1000)")
    sm.add_argument("--seed", type=int, default=0, help="training stream seed (default 0)")
    sm.add_argument("--families", default=None,
                    help="comma-separated families and groups, e.g. hard_surface (default: the general mix)")
    sm.add_argument("--max-faces", type=int, default=400, help="face cap (default 400); a sample stops at 3x as "
                    "many tokens, as in training")
    sm.add_argument("--axis-turns", type=int, default=None, choices=(4, 24),
                    help="axis-aligned poses: 4 turns about up or all 24 quarter-turn rotations (default: free poses)")
    sm.add_argument("--batch", type=int, default=32, help="shapes decoded together (default 32)")
    sm.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    sm.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    sm.add_argument("-o", "--output", required=True, help="the file to write (.safetensors)")
    sm.add_argument("--resume", action="store_true", help="go on from OUTPUT.partial, where a run of the same "
                    "settings that was cut left its samples (without it a run starts over)")
    sm.set_defaults(func=run_samples)


def _config(args):
    from xspecmesh.training.data import ShapeConfig

    turns = getattr(args, "axis_turns", None)
    return ShapeConfig.parse(args.families, max_faces=args.max_faces, axis_aligned=turns is not None,
                             axis_turns=turns or 4)


def _shapes(args):
    """(mesh, family, tokens) from the training stream of `args.seed`, unaugmented."""
    import numpy as np

    from xspecmesh.training import data
    from xspecmesh.geometry import tokenizer
    from xspecmesh.errors import SettingsError

    if args.count < 1:
        raise SettingsError("--count must be at least 1")
    config = _config(args)
    rng = np.random.default_rng(np.random.SeedSequence(args.seed, spawn_key=(data.TRAIN_STREAM, 0)))
    per_family = getattr(args, "per_family", None)
    configs = [config] * args.count if per_family is None else \
        [dataclasses.replace(config, families=(f,)) for f in config.names for _ in range(per_family)]
    for cfg in configs:
        mesh, family = data.random_shape(rng, cfg)
        yield mesh, family, tokenizer.encode(mesh.vertices, mesh.faces), rng


def run_stats(args: argparse.Namespace) -> int:
    from collections import defaultdict

    start = time.perf_counter()
    rows = defaultdict(lambda: [0, 0, 0])  # family -> shapes, faces, tokens
    for mesh, family, tokens, _ in _shapes(args):
        r = rows[family]
        r[0], r[1], r[2] = r[0] + 1, r[1] + len(mesh.faces), r[2] + len(tokens)
    seconds = time.perf_counter() - start
    families = {f: {"shapes": n, "mean_faces": fc / n, "tokens_per_face": tk / fc} for f, (n, fc, tk) in
                sorted(rows.items())}
    faces = sum(r[1] for r in rows.values())
    summary = {"shapes": args.count, "seconds": seconds, "shapes_per_second": args.count / seconds,
               "mean_faces": faces / args.count, "tokens_per_face": sum(r[2] for r in rows.values()) / faces,
               "families": families}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{'family':16s} {'shapes':>6s} {'share':>6s} {'faces':>7s} {'tok/face':>8s}")
    for f, r in families.items():
        bar = "#" * round(40 * r["shapes"] / args.count)
        print(f"{f:16s} {r['shapes']:6d} {r['shapes'] / args.count:6.1%} {r['mean_faces']:7.1f} "
              f"{r['tokens_per_face']:8.2f}  {bar}")
    print(f"{'all':16s} {args.count:6d} {1:6.0%} {summary['mean_faces']:7.1f} {summary['tokens_per_face']:8.2f}")
    print(f"{summary['shapes_per_second']:.1f} shapes/s including tokenization ({seconds:.1f} s)")
    return 0


def run_samples(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from xspecmesh.decoding.engine import resolve_device
    from xspecmesh.model.checkpoint import load_checkpoint
    from xspecmesh.training import sample_file
    from xspecmesh.training.trainer import SAMPLE_TOKENS_PER_FACE

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    start = time.perf_counter()
    with tqdm(total=args.count, desc="own samples", unit="shape") as bar:
        summary = sample_file.write(args.output, ckpt.model, _config(args), args.count, args.seed,
                                    SAMPLE_TOKENS_PER_FACE * args.max_faces, args.batch, bar.update, args.resume)
    seconds = time.perf_counter() - start
    print(f"wrote {args.output}: {summary['count']} samples, {summary['tokens']} tokens ({summary['ended']} ended, "
          f"the rest cut at {summary['max_tokens']} tokens) in {seconds:.0f} s, {summary['tokens'] / seconds:.0f} "
          f"tokens/s; backbone {summary['backbone']}")
    return 0


ELEVATION, AZIMUTH = 22.0, -58.0  # the contact sheets' view (degrees)


def draw_mesh(ax, triangles, title: str, points=None) -> None:
    """Draw token-frame triangles (T, 3, 3; y up) shaded and back-face culled on a 3-D matplotlib axis, with
    optional (N, 6) points + normals over them (front-facing ones only)."""
    import math

    import numpy as np
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    elev, azim = math.radians(ELEVATION), math.radians(AZIMUTH)
    eye = np.array([math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)])
    light = eye + [-0.3, 0.0, 0.5]  # plot axes are (x, -z, y): from above the viewer's left shoulder
    light /= np.linalg.norm(light)
    tris = np.asarray(triangles, dtype=float).reshape(-1, 3, 3)[..., [0, 2, 1]] * [1, -1, 1]
    normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    front = normals @ eye > 0  # back-face culling: matplotlib's depth sort alone lets hidden faces through
    shade = 0.3 + 0.7 * np.clip(normals[front] @ light, 0, 1)
    colors = np.concatenate([np.array([0.55, 0.70, 0.88]) * shade[:, None], np.ones((int(front.sum()), 1))], axis=1)
    ax.add_collection3d(Poly3DCollection(tris[front], facecolors=colors, edgecolors=(0.1, 0.15, 0.3, 0.9),
                                         linewidths=0.35))
    if points is not None:
        pts = np.asarray(points)[:, [0, 2, 1, 3, 5, 4]] * [1, -1, 1, 1, -1, 1]
        pts = pts[pts[:, 3:] @ eye > 0]
        ax.computed_zorder = False
        ax.scatter(*pts[:, :3].T, s=0.4, c="crimson", alpha=0.8, depthshade=False, zorder=3)
    for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        set_lim(-0.75, 0.75)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=ELEVATION, azim=AZIMUTH)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, pad=-6)


def run_preview(args: argparse.Namespace) -> int:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from xspecmesh.training import data
    from xspecmesh.geometry import tokenizer
    from xspecmesh.errors import SettingsError

    if args.per_family is not None:
        if args.per_family < 1:
            raise SettingsError("--per-family must be at least 1")
        families = len(_config(args).names)
        args.count = args.per_family * families
        cols = args.per_family * math.ceil(math.sqrt(families / args.per_family))  # a family's shapes side by side
    else:
        cols = min(args.count, max(1, math.ceil(math.sqrt(args.count))))
    rows = math.ceil(args.count / cols)
    fig = plt.figure(figsize=(2.5 * cols, 2.5 * rows + 0.5), dpi=110, facecolor="white")
    for i, (mesh, family, tokens, rng) in enumerate(_shapes(args)):
        # Draw what the model learns: the token sequence decoded back to (dequantized) triangles.
        tris = tokenizer.dequantize(np.asarray(tokenizer.decode(tokens)))
        points = data.conditioning_points(mesh, rng, 2048) if args.points else None
        draw_mesh(fig.add_subplot(rows, cols, i + 1, projection="3d"), tris,
                  f"{family}\n{len(tris)} faces · {len(tokens)} tokens", points)
    what = "decoded tokens" + (" + conditioning points" if args.points else "")
    height = fig.get_figheight()
    fig.suptitle(f"XSpecMesh training shapes (seed {args.seed}, {what})", fontsize=10, y=1 - 0.08 / height)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - 0.55 / height, wspace=0, hspace=0.12)
    fig.savefig(args.output, facecolor="white")
    plt.close(fig)
    print(f"wrote {args.output} ({args.count} shapes)")
    return 0
