"""The price of one speculative step: drafting D tokens with the heads plus verifying D+1 positions in
one backbone forward, against one AR forward, at a fixed cache length. With every draft accepted ("oracle") a step
yields D+1 tokens, so (D+1) / cost ratio bounds the wall-clock speedup that acceptance could ever buy. Run by
`xspecmesh bench --step-cost`.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from xspecmesh.geometry import tokenizer
from xspecmesh.benchmarks.bench import cell, json_safe, machine_info
from xspecmesh.decoding.engine import Engine
from xspecmesh.errors import SettingsError


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(), device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


@torch.no_grad()
def step_cost(engine: Engine, depths=range(1, 7), cache_lengths=(500, 1500), repeats: int = 50, warmup: int = 5,
              progress: bool = True) -> dict:
    """Median wall time of one speculative step (heads draft D tokens, backbone verifies D+1 positions) over one
    AR step (backbone on 1 position), same model and cache, interleaved, per cache length and D."""
    from tqdm import tqdm

    model, heads, dev = engine.model, engine.ckpt.heads, engine.device
    if heads is None:
        raise SettingsError("this checkpoint has no drafting heads")
    depths = [d for d in depths if 1 <= d <= heads.num_heads]
    if not depths:
        raise SettingsError(f"no D in range: the checkpoint has {heads.num_heads} head(s)")
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(4096, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    cond = engine.condition(np.concatenate([xyz * 0.9, xyz], 1), seed=0)  # a sphere: the content does not matter
    ctx = heads.context(cond)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, lengths = [], []
    bar = tqdm(total=len(cache_lengths) * (warmup + repeats), desc="step cost", unit="rep", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for want in cache_lengths:
        length = max(1, min(int(want), model.cfg.max_seq_len - max(depths) - 2))  # the model's position table
        lengths.append(length)
        cache = model.new_cache(cond, length + max(depths) + 2)
        prefix = torch.randint(0, tokenizer.EOS, (1, length), generator=gen).to(dev)  # position 0 reads as BOS
        _, hidden = model(prefix, cache=cache)
        h = hidden[:, -1:]
        start_len = cache.lengths.clone()
        last = prefix[:, -1:]

        def ar():
            model(last, cache=cache)
            cache.rollback(start_len)

        def draft(d):
            return heads(h, ctx, model.to_logits, heads=d)[:, 0].argmax(-1)  # (1, D) greedy drafts

        def verify(drafts):
            model(torch.cat([last, drafts], 1), cache=cache)
            cache.rollback(start_len)

        samples = {item: [] for item in ["ar", *depths]}  # per repetition: (wall, cpu) of draft and verify
        order = ["ar", *depths]
        for rep in range(warmup + repeats):
            k = rep % len(order)
            for item in order[k:] + order[:k]:
                if item == "ar":
                    t = (timed(ar, dev), (0.0, 0.0))
                else:
                    box = {}
                    t = (timed(lambda: box.setdefault("d", draft(item)), dev), timed(lambda: verify(box["d"]), dev))
                if rep >= warmup:
                    samples[item].append(t)
            bar.update()

        def med(item, part, clock):  # part: 0 draft (the AR forward for "ar"), 1 verify, None both
            return statistics.median(sum(t[p][clock] for p in ((0, 1) if part is None else (part,)))
                                     for t in samples[item])

        ar_s, ar_cpu = med("ar", None, 0), med("ar", None, 1)
        for d in depths:
            step, step_cpu = med(d, None, 0), med(d, None, 1)
            rows.append({"cache_length": length, "heads": d, "ar_ms": 1e3 * ar_s, "draft_ms": 1e3 * med(d, 0, 0),
                         "verify_ms": 1e3 * med(d, 1, 0), "step_ms": 1e3 * step, "ratio": step / ar_s,
                         "oracle_speedup": (d + 1) * ar_s / step, "ratio_cpu": step_cpu / max(ar_cpu, 1e-9),
                         "oracle_speedup_cpu": (d + 1) * ar_cpu / max(step_cpu, 1e-9)})
    bar.close()
    cfg = model.cfg
    return json_safe({**machine_info(engine), "checkpoint": engine.ckpt.path, "repeats": repeats,
                      "model": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "max_seq_len": cfg.max_seq_len},
                      "cache_lengths": lengths, "rows": rows})


def step_cost_markdown(result: dict) -> str:
    m = result["model"]
    lines = [f"device {result['device']} ({result['cpu']}, {result['threads']} threads), checkpoint "
             f"{result['checkpoint']} (dim {m['dim']}, depth {m['depth']}), medians of {result['repeats']}", "",
             "| cache | D | AR step ms | draft ms | verify ms | spec step ms | cost ratio | oracle speedup | "
             "CPU-time ratio | oracle speedup (CPU time) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['cache_length']} | {r['heads']} | {r['ar_ms']:.2f} | {r['draft_ms']:.2f} | "
                     f"{r['verify_ms']:.2f} | {r['step_ms']:.2f} | {r['ratio']:.2f} | {r['oracle_speedup']:.2f}× | "
                     f"{cell(r['ratio_cpu'], '.2f')} | {cell(r['oracle_speedup_cpu'], '.2f')}× |")
    return "\n".join(lines)
