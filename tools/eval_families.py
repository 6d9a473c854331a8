#!/usr/bin/env python3
"""The model against the hard-surface targets, family by family, on held-out shapes (data.validation_pairs of each
family alone: never in any training stream) and optionally on a directory of real meshes:

- closed: share of AR results that are watertight after welding equal vertices (no boundary or non-manifold edge);
- CD10k (10k samples) of the result against the shape, and of the shape's bounding box against the shape (median);
- faces: median ratio result / shape, and share of results within 0.5x-2x of the shape's count;
- pass: closed >= 80% and median CD10k <= max(0.5 x bbox CD10k, 0.035), and faces within 0.5x-2x for >= 70%;
- on target: share of results that are closed *and* within that CD goal of their own shape, the issue's first
  observation ("none came out closed and closer to the part than half its bounding box's CD"); a model that returns
  the 12-triangle bounding box is always closed and never on target.

The first shape of every family (and the first mesh of the directory) is drawn beside its result in a contact sheet.

    python tools/eval_families.py [--checkpoint PATH] [--count 50] [--families hard_surface] [--meshes DIR]
        [--sheet docs/families.png] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh
from tqdm import tqdm

from xspecmesh.benchmarks.bench import md_table, mesh_inputs
from xspecmesh.decoding.engine import DecodeSettings, Engine
from xspecmesh.geometry import tokenizer
from xspecmesh.geometry.metrics import bbox_mesh, closed, evaluate, soup
from xspecmesh.training.data import ShapeConfig, validation_pairs

CLOSED_TARGET, CD_FLOOR, FACES_TARGET, OVERALL_CLOSED_TARGET = 0.8, 0.035, 0.7, 0.75


def score(engine: Engine, points: np.ndarray, shape: trimesh.Trimesh, seed: int, settings: DecodeSettings) -> dict:
    result = engine.generate(points, dataclasses.replace(settings, seed=seed))
    out = soup(result.triangles) if len(result.triangles) else None
    return {"closed": closed(result.triangles),
            "cd": evaluate(out, shape, seed=seed)["cd_10k"],  # NaN for an empty result: counts against the median
            "bbox_cd": evaluate(bbox_mesh(shape), shape, seed=seed)["cd_10k"],
            "faces": len(result.triangles), "shape_faces": len(shape.faces), "triangles": result.triangles}


def cd_goal(bbox_cd: float) -> float:
    return max(0.5 * bbox_cd, CD_FLOOR)


def summary(rows: list[dict]) -> dict:
    cd = statistics.median(math.inf if math.isnan(r["cd"]) else r["cd"] for r in rows)
    bbox = statistics.median(r["bbox_cd"] for r in rows)
    ratio = [r["faces"] / r["shape_faces"] for r in rows]
    s = {"count": len(rows), "closed": float(np.mean([r["closed"] for r in rows])), "cd_10k": cd,
         "bbox_cd_10k": bbox, "cd_goal": cd_goal(bbox),
         "on_target": float(np.mean([r["closed"] and r["cd"] <= cd_goal(r["bbox_cd"]) for r in rows])),
         "faces_ratio_median": statistics.median(ratio),
         "faces_within_2x": float(np.mean([0.5 <= q <= 2 for q in ratio]))}
    s["pass"] = s["closed"] >= CLOSED_TARGET and cd <= s["cd_goal"] and s["faces_within_2x"] >= FACES_TARGET
    return s


def contact_sheet(examples: list[tuple[str, trimesh.Trimesh, dict]], path: str, title: str) -> None:
    """Two columns per example: the shape, then the first seed's result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xspecmesh.commands.dataset import draw_mesh

    cols = 4  # two examples per row
    rows = math.ceil(2 * len(examples) / cols)
    fig = plt.figure(figsize=(2.4 * cols, 2.4 * rows + 0.7), dpi=100, facecolor="white")
    for i, (name, shape, row) in enumerate(examples):
        draw_mesh(fig.add_subplot(rows, cols, 2 * i + 1, projection="3d"), shape.vertices[shape.faces],
                  f"{name}\n{len(shape.faces)} faces")
        verdict = "closed" if row["closed"] else "open"
        draw_mesh(fig.add_subplot(rows, cols, 2 * i + 2, projection="3d"), row["triangles"],
                  f"result: {row['faces']} faces, {verdict}\nCD10k {row['cd']:.3f} (box {row['bbox_cd']:.3f})")
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=10, y=1 - 0.06 / height)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - 0.75 / height, wspace=0, hspace=0.18)
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def markdown(result: dict) -> str:
    header = ["family", "n", "closed", "CD10k", "bbox CD10k", "goal", "faces ratio", "faces 0.5-2x", "on target",
              "pass"]
    return "\n".join(md_table(header, ([name, str(s["count"]), f"{s['closed']:.0%}", f"{s['cd_10k']:.3f}",
                                        f"{s['bbox_cd_10k']:.3f}", f"{s['cd_goal']:.3f}",
                                        f"{s['faces_ratio_median']:.2f}", f"{s['faces_within_2x']:.0%}",
                                        f"{s['on_target']:.0%}", "yes" if s["pass"] else "no"]
                                       for name, s in result["families"].items())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--count", type=int, default=50, help="held-out shapes per family (default 50)")
    p.add_argument("--families", default="hard_surface", help="families or groups (default hard_surface)")
    p.add_argument("--max-faces", type=int, default=160, help="face cap of the held-out shapes (default 160)")
    p.add_argument("--axis-turns", type=int, default=24, choices=(4, 24), help="poses of the held-out shapes")
    p.add_argument("--meshes", default=None, help="also a directory of real meshes (tools/fetch_eval_meshes.py)")
    p.add_argument("--mesh-count", type=int, default=None, help="at most this many files of --meshes")
    p.add_argument("--temperature", type=float, default=DecodeSettings.temperature)
    p.add_argument("--max-tokens", type=int, default=1200, help="AR token cap per result (default 1200)")
    p.add_argument("--candidates", type=int, default=1,
                   help="decode this many per shape and keep the best (the candidates setting; default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--sheet", default=None, help="PNG contact sheet: each family's first shape beside its result")
    p.add_argument("--json", default=None, help="write the full result as JSON here")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.checkpoint, args.device)
    settings = DecodeSettings(mode="ar", temperature=args.temperature, max_tokens=args.max_tokens,
                              candidates=args.candidates)
    config = ShapeConfig.parse(args.families, max_faces=args.max_faces, axis_aligned=True, axis_turns=args.axis_turns)
    num_points = engine.model.cfg.encoder.num_points
    groups: dict[str, list[tuple[np.ndarray, trimesh.Trimesh]]] = {}
    for family in config.names:
        pairs = validation_pairs(args.count, config=dataclasses.replace(config, families=(family,)),
                                 num_points=num_points)
        groups[family] = [(pr.points, trimesh.Trimesh(*tokenizer.decode_mesh(pr.tokens), process=False))
                          for pr in pairs]
    skipped = []
    if args.meshes:
        inputs, skipped = mesh_inputs(args.meshes, args.mesh_count, num_points)
        groups["real meshes"] = [(inp.points, inp.reference) for inp in inputs]
    result, examples, every = {"checkpoint": engine.ckpt.path, "families": {}}, [], []
    for name, items in groups.items():
        rows = [score(engine, pts, shape, i, settings)
                for i, (pts, shape) in enumerate(tqdm(items, desc=name, file=sys.stderr))]
        result["families"][name] = summary(rows)
        examples.append((name, items[0][1], rows[0]))
        every += rows if name != "real meshes" else []
    procedural = summary(every)
    result |= {"overall_closed": procedural["closed"], "overall_faces_within_2x": procedural["faces_within_2x"],
               "overall_on_target": procedural["on_target"],
               "overall_pass": procedural["closed"] >= OVERALL_CLOSED_TARGET
               and procedural["faces_within_2x"] >= FACES_TARGET, "skipped_meshes": skipped,
               "settings": {"count": args.count, "max_faces": args.max_faces, "axis_turns": args.axis_turns,
                            "temperature": args.temperature, "max_tokens": args.max_tokens,
                            "candidates": args.candidates}}
    if args.sheet:
        contact_sheet(examples, args.sheet,
                      f"{Path(engine.ckpt.path).name}: held-out shape (left), AR result (right, seed 0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"overall closed {procedural['closed']:.0%} (target {OVERALL_CLOSED_TARGET:.0%}), faces within 0.5-2x "
          f"{procedural['faces_within_2x']:.0%} (target {FACES_TARGET:.0%}), closed and within the CD goal "
          f"{procedural['on_target']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
