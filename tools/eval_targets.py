#!/usr/bin/env python3
"""The shipped model against the training issue's targets, on seeded validation shapes never seen in training:

- share of AR generations that give a non-empty, decodable mesh;
- median Chamfer distance (10k samples) of AR outputs against the input, and of the input's bounding box as a mesh;
- how far the AR output's bounding box is from the input's, per axis, in quantization levels (128 across the frame):
  the box task's plainest error, readable without a Chamfer baseline;
- teacher forced, how often the most likely offset token gets each axis right where that axis value is a copy of an
  earlier vertex's and where it is new (must come from the point cloud);
- per-head acceptance and SCR of XSpecMesh decoding (threshold δ, D heads) on the same inputs.

    python tools/eval_targets.py [--checkpoint PATH] [--count 100] [--heads 4] [--delta 0.5] [--temperature T] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch
import trimesh
from tqdm import tqdm

from xspecmesh.geometry import tokenizer
from xspecmesh.model.checkpoint import load_checkpoint
from xspecmesh.training.data import ShapeConfig, validation_pairs
from xspecmesh.decoding.engine import DecodeSettings, Engine
from xspecmesh.geometry.metrics import bbox_mesh, evaluate
from xspecmesh.training.trainer import collate


def as_mesh(triangles: np.ndarray) -> trimesh.Trimesh:
    return trimesh.Trimesh(triangles.reshape(-1, 3), np.arange(len(triangles) * 3).reshape(-1, 3), process=True)


@torch.no_grad()
def backbone_kl(reference, model, pairs, batch: int = 8) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions, teacher-forced on the pairs."""
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch):
        inputs, targets, points = collate(pairs[i : i + batch])
        valid = targets >= 0
        p = reference(inputs, cond=reference.encode(points))[0][valid].log_softmax(-1)
        q = model(inputs, cond=model.encode(points))[0][valid].log_softmax(-1)
        total += torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item()
        count += int(valid.sum())
    return total / count


@torch.no_grad()
def offset_axis_accuracy(model, pairs, batch: int = 8) -> dict:
    """Teacher-forced: how often the model's most likely offset gets each axis right, split by whether that axis's
    full level (block and offset) already occurred among the sequence's earlier vertices (a copy) or is new (must
    be read from the point cloud). The block before each offset is the true one (teacher forcing)."""
    hits = {"repeat": [0, 0], "new": [0, 0]}  # [right, total]
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        inputs, targets, points = collate(chunk)
        logits = model(inputs, cond=model.encode(points))[0][..., tokenizer.OFFSET_BASE : tokenizer.SPECIAL_BASE]
        guesses = (logits.argmax(-1) + tokenizer.OFFSET_BASE).numpy()
        for pair, guess in zip(chunk, guesses):
            t = pair.tokens
            off = tokenizer.is_offset(t)
            blocks = tokenizer.current_blocks(t)[off]
            truth = tokenizer.vertex_levels(blocks, t[off])
            right = tokenizer.vertex_levels(blocks, guess[: len(t)][off]) == truth
            for axis in range(3):
                repeat = np.array([v in truth[:k, axis] for k, v in enumerate(truth[:, axis])], dtype=bool)
                for kind, where in (("repeat", repeat), ("new", ~repeat)):
                    hits[kind][0] += int(right[where, axis].sum())
                    hits[kind][1] += int(where.sum())
    total = hits["repeat"][1] + hits["new"][1]
    return {"tf_offset_axis_acc_repeat": hits["repeat"][0] / max(1, hits["repeat"][1]),
            "tf_offset_axis_acc_new": hits["new"][0] / max(1, hits["new"][1]),
            "tf_offset_axis_repeat_share": hits["repeat"][1] / max(1, total)}


def extent_error_levels(triangles: np.ndarray, reference_vertices: np.ndarray) -> np.ndarray:
    """Per axis, |extent of the output - extent of the reference| in quantization levels (both in the token frame)."""
    extent = lambda v: np.ptp(np.asarray(v).reshape(-1, 3), axis=0)
    return np.abs(extent(triangles) - extent(reference_vertices)) * tokenizer.NUM_LEVELS / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--heads", type=int, default=4, help="0: no speculative runs (a backbone-only checkpoint)")
    p.add_argument("--delta", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--temperature", type=float, default=DecodeSettings.temperature, help="0: greedy")
    p.add_argument("--adaptive", action="store_true", help="adaptive draft length for the speculative runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--reference", default=None,
                   help="the backbone before stage 2: also report KL(reference || checkpoint) on validation sequences")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    engine = Engine.load(args.checkpoint, args.device)
    shapes = ShapeConfig.trained_on(engine.ckpt.meta)
    pairs = validation_pairs(args.count, config=shapes, num_points=engine.model.cfg.encoder.num_points)
    ok, cds, spec_cds, box_cds, extent_errors, tokens, steps = 0, [], [], [], [], 0, 0
    accepts, trials = np.zeros(args.heads), np.zeros(args.heads)
    for i, pair in enumerate(tqdm(pairs, desc="eval", file=sys.stderr)):
        ref = trimesh.Trimesh(*tokenizer.decode_mesh(pair.tokens), process=False)
        box_cds.append(evaluate(bbox_mesh(ref), ref, seed=i)["cd_10k"])
        ar = engine.generate(pair.points, DecodeSettings(mode="ar", seed=i, max_tokens=args.max_tokens,
                                                         temperature=args.temperature, fit=False))
        if len(ar.triangles):
            ok += 1
            cds.append(evaluate(as_mesh(ar.triangles), ref, seed=i)["cd_10k"])
            extent_errors.append(extent_error_levels(ar.triangles, ref.vertices))
        if not args.heads:  # a backbone without heads: the AR figures only
            continue
        spec = engine.generate(pair.points, DecodeSettings(mode="spec", heads=args.heads, delta=args.delta, seed=i,
                                                           max_tokens=args.max_tokens, adaptive=args.adaptive,
                                                           temperature=args.temperature, fit=False))
        if len(spec.triangles):
            spec_cds.append(evaluate(as_mesh(spec.triangles), ref, seed=i)["cd_10k"])
        tokens, steps = tokens + spec.stats["tokens"], steps + spec.stats["steps"]
        trials += spec.stats["head_trials"]  # per head: its drafts verified, and accepted
        accepts += spec.stats["head_accepts"]
    result = {
        "checkpoint": engine.ckpt.path, "device": str(engine.device), "inputs": len(pairs),
        "families": ",".join(shapes.names), "max_faces": shapes.max_faces,
        "ar_nonempty_share": ok / len(pairs),
        "ar_cd_10k_median": statistics.median(cds) if cds else None,
        "bbox_cd_10k_median": statistics.median(box_cds),
        "ar_extent_error_levels_median": statistics.median(np.concatenate(extent_errors)) if extent_errors else None,
        "ar_extent_within_1_level_share": (float(np.mean([e.max() <= 1 for e in extent_errors]))
                                           if extent_errors else None),
        "temperature": args.temperature, "spec_heads": args.heads, "spec_delta": args.delta,
        "spec_scr": tokens / steps if steps else None,
        "spec_nonempty_share": len(spec_cds) / len(pairs),
        "spec_cd_10k_median": statistics.median(spec_cds) if spec_cds else None,
        "head_acceptance": [round(a / t, 4) if t else None for a, t in zip(accepts, trials)],
    }
    result |= offset_axis_accuracy(engine.model, pairs)
    if args.reference:
        result["kl_reference_vs_checkpoint"] = backbone_kl(load_checkpoint(args.reference).model, engine.model, pairs)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>30}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
