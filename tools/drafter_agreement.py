#!/usr/bin/env python3
"""Teacher-forced top-1 agreement of each draft position with the backbone, on held-out shapes of the checkpoint's
own training distribution: on the true token sequences and on the backbone's own samples (temperature 0.5, the
add-on's default). Draft k is scored where drafts 1..k-1 were right, i.e. it reads the true tokens before it; its
agreement bounds how often it is accepted by the greedy rule.

    python tools/drafter_agreement.py --checkpoint A.safetensors[,B.safetensors] [--count 64] [--json]
"""
from __future__ import annotations

import argparse
import json

import torch

from xspecmesh.model.checkpoint import load_checkpoint
from xspecmesh.model.drafter import draft_outputs
from xspecmesh.training.data import ShapeConfig, validation_pairs
from xspecmesh.training.trainer import collate, head_distillation_loss, own_samples


@torch.no_grad()
def agreement(path: str, count: int, batch: int = 16) -> dict:
    ck = load_checkpoint(path)
    model, drafter = ck.model, ck.heads
    shapes = ShapeConfig.parse(ck.meta.get("families"), max_faces=int(ck.meta.get("max_faces") or 400),
                               axis_aligned=bool(ck.meta.get("axis_aligned")))
    pairs = validation_pairs(count, config=shapes, num_points=model.cfg.encoder.num_points)
    sums = {"truth": [0.0] * drafter.num_heads, "samples": [0.0] * drafter.num_heads}
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(pairs), batch):
        inputs, targets, points = collate(pairs[i : i + batch])
        cond = model.encode(points)
        for name, (inp, tgt) in {"truth": (inputs, targets),
                                 "samples": own_samples(model, cond, 3 * shapes.max_faces, gen)}.items():
            logits, hidden = model(inp, cond=cond, taps=drafter.taps)
            _, agree = head_distillation_loss(draft_outputs(drafter, model, hidden, inp, cond), logits, tgt, 1.0, 0.0,
                                              drafter.factored)
            sums[name] = [s + a * len(inp) for s, a in zip(sums[name], agree)]
    return {"checkpoint": path, "kind": drafter.cfg.kind, "output": getattr(drafter.cfg, "output", "shared"),
            **{name: [round(s / len(pairs), 4) for s in v] for name, v in sums.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="comma-separated checkpoints")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [agreement(p, args.count) for p in args.checkpoint.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| checkpoint | drafter | on true sequences, drafts 1..D | on the backbone's samples, drafts 1..D |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['kind']} ({r['output']}) | {' / '.join(f'{a:.2f}' for a in r['truth'])} | "
              f"{' / '.join(f'{a:.2f}' for a in r['samples'])} |")


if __name__ == "__main__":
    main()
