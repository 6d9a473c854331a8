#!/usr/bin/env python3
"""What could lift draft 1 where it misses. Measured on the backbone's own samples (temperature 0.5) of held-out
shapes, at the positions where the threshold rule at δ = 0.5 can accept (the backbone confident: its sampling
distribution gives its top token more than 0.5), against the backbone's top token there:

  lookup  prompt-lookup drafting: the token that followed the last earlier occurrence of the n tokens ending at r.
          `adds` counts the positions where draft 1 is wrong and the lookup right: all a lookup could give as a
          second candidate (a mesh revisits its vertices, so their tokens recur).
  probe   (with --pool) a linear head over the block tokens refitted on the drafter's own draft-1 features against
          the backbone's choice at the block positions of a pool of own samples (`xspecmesh dataset samples`),
          scored on the held-out positions with the drafter's own choice of class: what its output layer (e.g. the
          factored one, additive over axes) loses. `--layers` puts every backbone layer's state beside the feature:
          what a linear read of the backbone finds that the drafter does not. The head starts as the drafter's own
          output, so epoch 0's score is the drafter's.

    python tools/draft1_headroom.py [--checkpoint C] [--count 64] [--pool FILE [--pool-count N] [--layers]] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from xspecmesh.decoding.token_sampling import SamplingConfig, distribution
from xspecmesh.geometry import tokenizer as tok
from xspecmesh.model.checkpoint import load_checkpoint
from xspecmesh.model.drafter import DraftDecoder, draft_outputs, factor_basis, factored_argmax
from xspecmesh.training import sample_file
from xspecmesh.training.trainer import collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drafter_agreement import CLASSES, held_out_batches, rate  # noqa: E402  (the same held-out samples and cells)

LOOKUP_N = (1, 2, 3, 4)
# The block tokens, plain then special: the probe's outputs.
BLOCKS = torch.cat([torch.arange(tok.BLOCK_SIZE ** 3), tok.SPECIAL_BASE + torch.arange(tok.BLOCK_SIZE ** 3)])


def lookup(seq: list[int], j: int, n: int) -> int | None:
    """The token after the last occurrence, before j, of the n tokens ending at seq[j] (None: none)."""
    if j < n - 1:
        return None
    key = seq[j - n + 1 : j + 1]
    for i in range(j - 1, n - 2, -1):
        if seq[i - n + 1 : i + 1] == key:
            return seq[i + 1]
    return None


class _Draft1:
    """Per batch of sequences, draft 1 at every position that has a next token: the drafter's feature, its token, the
    backbone's top token and whether the backbone is confident; the features with every backbone layer's state beside
    them with `layers`."""

    def __init__(self, model, drafter: DraftDecoder, layers: bool):
        self.model, self.drafter, self.layers = model, drafter, layers
        self.seen: list[torch.Tensor] = []
        drafter.out_norm.register_forward_hook(lambda m, i, out: self.seen.append(out))  # first call: draft 1's

    @torch.no_grad()
    def __call__(self, inputs, targets, cond) -> dict:
        model, drafter, dim = self.model, self.drafter, self.model.cfg.dim
        every = tuple(range(1, model.cfg.depth)) if self.layers else drafter.taps
        logits, hidden = model(inputs, cond=cond, taps=every)
        states = hidden.unflatten(-1, (-1, dim))  # (B, T, 1 + taps, dim): the final state, then each tap
        mine = hidden
        if self.layers:  # (every layer tapped: index t is layer t) the drafter reads the final state and its taps
            mine = torch.cat([states[..., 0, :], *(states[..., t, :] for t in drafter.taps)], -1)
        self.seen.clear()
        out = draft_outputs(drafter, model, mine, inputs, cond)[:, :-1, 0]
        valid = targets[:, 1:] >= 0  # draft 1 at position j names the backbone's choice at j + 1
        feature = self.seen[0][:, :-1]
        if self.layers:
            feature = torch.cat([feature, states[:, :-1].flatten(-2)], -1)
        return {"feature": feature[valid], "best": logits[:, 1:].argmax(-1)[valid],
                "sure": distribution(logits[:, 1:][valid], SamplingConfig()).amax(-1) > 0.5,
                "draft": (factored_argmax(out) if drafter.factored else out.argmax(-1))[valid]}


def _own_output(model, drafter: DraftDecoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's token logits as a linear map of its feature, at the block tokens: (weight, bias)."""
    if drafter.factored:
        basis = factor_basis()[BLOCKS]
        return basis @ drafter.to_axes.weight.detach(), basis @ drafter.to_axes.bias.detach()
    return model.to_logits.weight.detach()[BLOCKS], model.to_logits.bias.detach()[BLOCKS]


def _held_out(ck, measure: _Draft1, count: int):
    """Draft 1 over the own samples of `count` held-out shapes (`drafter_agreement.held_out_batches`): the positions
    (`_Draft1`, concatenated) and the lookup's hit counts."""
    parts, counts = [], {n: torch.zeros(3) for n in LOOKUP_N}  # matched, right, adds (right where draft 1 is not)
    for cond, _, (inputs, targets) in held_out_batches(ck, count):
        got = measure(inputs, targets, cond)
        parts.append(got)
        at = 0  # the positions come row by row: sequence token j + 1 is drafted from position j (r = token j)
        for row in targets:
            seq = row[row >= 0].tolist()
            for j in range(len(seq) - 1):
                if got["sure"][at + j]:
                    best, right = int(got["best"][at + j]), bool(got["draft"][at + j] == got["best"][at + j])
                    for n in LOOKUP_N:
                        found = lookup(seq, j, n)
                        counts[n] += torch.tensor([found is not None, found == best, found == best and not right],
                                                  dtype=torch.float)
            at += len(seq) - 1
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, counts


def _agreement(hit: torch.Tensor, where: torch.Tensor) -> float | None:
    return rate(hit[where].sum(), where.sum())["agreement"]


def _scores(pred, best, sure, cls) -> dict:
    """Agreement at the confident positions whose top token is a plain block, a special block, and at all of them."""
    hit = pred == best
    return {"plain block": _agreement(hit, sure & (cls[best] == tok.PLAIN)),
            "special block": _agreement(hit, sure & (cls[best] == tok.SPECIAL)), "all": _agreement(hit, sure)}


def probe(model, drafter, measure: _Draft1, held: dict, pool: str, pool_count: int, epochs: int,
          batch: int = 24) -> dict:
    """Fit the linear block head on the pool's block positions (confident or not) and score it on `held` after every
    epoch (epoch 0: before fitting, the drafter's own output)."""
    cls = model.token_type
    samples = sorted(sample_file.read(pool, model)[:pool_count], key=lambda p: len(p.tokens))
    xs, ys = [], []
    for i in range(0, len(samples), batch):
        inputs, targets, points = collate(samples[i : i + batch])
        with torch.no_grad():
            got = measure(inputs, targets, model.encode(points))
        block = (cls[got["best"]] == tok.PLAIN) | (cls[got["best"]] == tok.SPECIAL)
        xs.append(got["feature"][block])
        ys.append(torch.searchsorted(BLOCKS, got["best"][block]))
    x, y = torch.cat(xs), torch.cat(ys)
    dim = model.cfg.dim
    weight, bias = _own_output(model, drafter)
    head = torch.nn.Linear(x.shape[1], len(BLOCKS))
    with torch.no_grad():  # the drafter's own output on its feature, nothing yet on the backbone's states
        head.weight.zero_()[:, :dim] = weight
        head.bias.copy_(bias)
    test = held["feature"].clone()
    if x.shape[1] > dim:  # the backbone's states standardised (from the pool), so that one step size fits all
        mean, std = x[:, dim:].mean(0), x[:, dim:].std(0) + 1e-3
        x[:, dim:], test[:, dim:] = (x[:, dim:] - mean) / std, (test[:, dim:] - mean) / std

    def score() -> dict:
        with torch.no_grad():
            logits, own = head(test), cls[held["draft"]]
            half = BLOCKS.numel() // 2  # the drafter's class stands; the head picks the block within it
            within = torch.where(own == tok.PLAIN, logits[:, :half].argmax(-1), logits[:, half:].argmax(-1) + half)
            pred = torch.where((own == tok.PLAIN) | (own == tok.SPECIAL), BLOCKS[within], held["draft"])
        return _scores(pred, held["best"], held["sure"], cls)

    optimizer = torch.optim.AdamW(head.parameters(), lr=5e-4, weight_decay=0.05)
    curve = [score()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(512):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append(score())
    return {"pool": pool, "pool_samples": len(samples), "train_positions": len(x),
            "features": "drafter + backbone layers" if x.shape[1] > dim else "drafter", "epochs": curve}


def headroom(path: str | None, count: int, pool: str | None = None, pool_count: int = 2400, layers: bool = False,
             epochs: int = 4) -> dict:
    ck = load_checkpoint(path)
    model, drafter = ck.model, ck.heads
    if not isinstance(drafter, DraftDecoder):
        raise SystemExit(f"{path or 'the shipped checkpoint'} has no draft decoder (kind eagle or grounded)")
    measure = _Draft1(model, drafter, layers)
    with torch.no_grad():
        held, counts = _held_out(ck, measure, count)
    sure, hit, of = held["sure"], held["draft"] == held["best"], model.token_type[held["best"]]
    n = int(sure.sum())
    row = {"checkpoint": path or "shipped", "confident_positions": n, "draft1": _agreement(hit, sure),
           "draft1_by_class": {c: rate(hit[sure & (of == i)].sum(), (sure & (of == i)).sum())
                               for i, c in enumerate(CLASSES)},
           "lookup": {k: dict(zip(("matched", "right", "adds"), (round(float(v) / max(n, 1), 4) for v in c)))
                      for k, c in counts.items()}}
    if pool:
        row["probe"] = probe(model, drafter, measure, held, pool, pool_count, epochs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    ap.add_argument("--count", type=int, default=64, help="held-out shapes (as tools/drafter_agreement.py)")
    ap.add_argument("--pool", help="own samples of this backbone (`xspecmesh dataset samples`) to fit the probe on")
    ap.add_argument("--pool-count", type=int, default=2400)
    ap.add_argument("--layers", action="store_true", help="the probe also reads every backbone layer's state")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    row = headroom(args.checkpoint, args.count, args.pool, args.pool_count, args.layers, args.epochs)
    if args.json:
        print(json.dumps(row, indent=1))
        return
    print(f"{row['confident_positions']} confident positions; draft 1 agrees at {row['draft1']:.3f}: "
          + ", ".join(f"{c} {v['agreement']:.3f} ({v['positions']})" for c, v in row["draft1_by_class"].items()
                      if v["positions"]))
    print("\n| lookup n | matched | right | right where draft 1 is wrong |\n|---|---|---|---|")
    for k, v in row["lookup"].items():
        print(f"| {k} | {v['matched']:.3f} | {v['right']:.3f} | {v['adds']:.3f} |")
    if "probe" in row:
        p = row["probe"]
        print(f"\nprobe ({p['features']}, {p['train_positions']} block positions of {p['pool_samples']} samples):")
        print("| epoch | plain block | special block | all confident |\n|---|---|---|---|")
        for i, s in enumerate(p["epochs"]):
            print(f"| {i} | {s['plain block']:.3f} | {s['special block']:.3f} | {s['all']:.3f} |")


if __name__ == "__main__":
    main()
