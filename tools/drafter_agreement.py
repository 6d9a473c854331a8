#!/usr/bin/env python3
"""Teacher-forced top-1 agreement of each draft position with the backbone, on held-out shapes of the checkpoint's
own training distribution: on the true token sequences and on the backbone's own samples (temperature 0.5, the
add-on's default). Draft k is scored where drafts 1..k-1 were right, i.e. it reads the true tokens before it; its
agreement bounds how often it is accepted by the greedy rule. Draft 1's is also split by the class of the backbone's
choice (plain block, offset, special block, EOS): on BPT's tokens the blocks, where the mesh goes next, are the hard
part; and kept apart where the backbone is confident (its sampling distribution, without the grammar mask, gives its
top token more than 0.5): there the threshold rule at δ = 0.5 accepts the top token and nothing else, so draft 1's
agreement there bounds how often that rule accepts it.

    python tools/drafter_agreement.py --checkpoint A.safetensors[,B.safetensors] [--count 64] [--json]
"""
from __future__ import annotations

import argparse
import json

import torch

from xspecmesh.decoding.token_sampling import SamplingConfig, distribution
from xspecmesh.model.checkpoint import load_checkpoint
from xspecmesh.model.drafter import draft_outputs, factored_argmax
from xspecmesh.training.data import ShapeConfig, validation_pairs
from xspecmesh.training.trainer import SAMPLE_TOKENS_PER_FACE, collate, head_distillation_loss, own_samples


CLASSES = ("plain block", "offset", "special block", "EOS")  # tokenizer.PLAIN, OFFSET, SPECIAL, END


@torch.no_grad()
def held_out_batches(ck, count: int, batch: int = 16):
    """The held-out shapes of the checkpoint's training distribution, `batch` at a time: (condition, true sequences
    (inputs, targets), the backbone's own samples of them (inputs, targets)), the samples drawn from one generator
    seeded 0, so every tool scores the same ones."""
    model = ck.model
    shapes = ShapeConfig.trained_on(ck.meta)
    pairs = validation_pairs(count, config=shapes, num_points=model.cfg.encoder.num_points)
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(pairs), batch):
        inputs, targets, points = collate(pairs[i : i + batch])
        cond = model.encode(points)
        yield cond, (inputs, targets), own_samples(model, cond, SAMPLE_TOKENS_PER_FACE * shapes.max_faces, gen)


@torch.no_grad()
def agreement(path: str, count: int, batch: int = 16) -> dict:
    ck = load_checkpoint(path)
    model, drafter = ck.model, ck.heads
    sums = {"truth": [0.0] * drafter.num_heads, "samples": [0.0] * drafter.num_heads}
    by_class = {name: torch.zeros(2, len(CLASSES)) for name in sums}  # draft 1: (hits, positions) per class
    confident = {name: torch.zeros(2) for name in sums}  # draft 1 where the backbone is confident: (hits, positions)
    for cond, truth, sampled in held_out_batches(ck, count, batch):
        for name, (inp, tgt) in {"truth": truth, "samples": sampled}.items():
            logits, hidden = model(inp, cond=cond, taps=drafter.taps)
            out = draft_outputs(drafter, model, hidden, inp, cond)
            _, agree = head_distillation_loss(out, logits, tgt, 1.0, 0.0, drafter.factored)
            sums[name] = [s + a * len(inp) for s, a in zip(sums[name], agree)]
            # draft 1 from position j names the backbone's choice at j + 1 (as head_distillation_loss scores it)
            valid = tgt[:, 1:] >= 0
            first = out[:, :-1, 0][valid]
            first = factored_argmax(first) if drafter.factored else first.argmax(-1)
            best = logits[:, 1:].argmax(-1)[valid]
            of = model.token_type[best]  # (the backbone's table of each token's class)
            by_class[name] += torch.stack([torch.bincount(of[first == best], minlength=len(CLASSES)),
                                           torch.bincount(of, minlength=len(CLASSES))]).float()
            sure = distribution(logits[:, 1:][valid], SamplingConfig()).amax(-1) > 0.5
            confident[name] += torch.stack([(first == best)[sure].sum(), sure.sum()]).float()
    return {"checkpoint": path, "kind": drafter.cfg.kind, "output": getattr(drafter.cfg, "output", "shared"),
            **{name: [round(s / count, 4) for s in v] for name, v in sums.items()},
            **{f"{name}_draft1_by_class": {c: rate(h, n) for c, h, n in zip(CLASSES, *counts)}
               for name, counts in by_class.items()},
            **{f"{name}_draft1_confident": rate(*counts) for name, counts in confident.items()}}


def rate(hits, positions) -> dict:
    """An agreement cell: hits over positions (None where there are none), and the positions."""
    n = int(positions)
    return {"agreement": round(float(hits / n), 4) if n else None, "positions": n}


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
    print("\n| checkpoint | draft 1 by the backbone's class, on true sequences | on the backbone's samples |")
    print("|---|---|---|")
    for r in rows:
        cells = [", ".join(f"{c} {v['agreement']:.2f} ({v['positions']})"
                           for c, v in {**r[f"{name}_draft1_by_class"], "confident": r[f"{name}_draft1_confident"]}
                           .items() if v["positions"])
                 for name in ("truth", "samples")]
        print(f"| {r['checkpoint']} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
