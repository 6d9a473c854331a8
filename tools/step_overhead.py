"""Where one AR decoding step's time goes on a CPU, and what the usual cures buy (docs/BENCHMARKS.md, "CPU precision
and overhead"): the backbone forward on one position (fp32 and int8 weights, eager and `torch.compile`), the sampling
(BPT's top-k / top-p / temperature and the CDF draw) and the grammar mask, each timed on its own, interleaved.

    .venv/bin/python tools/step_overhead.py [--checkpoint PATH | --random small] [--threads 1] [--repeats 200]
        [--compile]

Prints one Markdown table of median milliseconds per call. `--compile` adds the backbone forward compiled with
torch.compile (CPU inductor; it takes minutes to compile on a small machine, and recompiles as the cache grows).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from xspecmesh.decoding.engine import Engine
from xspecmesh.decoding.token_sampling import Grammar, SamplingConfig, distribution, draw
from xspecmesh.geometry import tokenizer
from xspecmesh.model.checkpoint import write_random_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--random", default=None, metavar="PRESET")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--cache-length", type=int, default=500)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if args.random:
            path = write_random_checkpoint(f"{tmp}/r.safetensors", args.random, heads=4)
        engines = {p: Engine.load(path, "cpu", p) for p in ("fp32", "int8")}
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(4096, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    points = np.concatenate([xyz * 0.9, xyz], 1)
    prefix = torch.randint(0, tokenizer.EOS, (1, args.cache_length), generator=torch.Generator().manual_seed(0))
    items = {}
    for name, engine in engines.items():
        model = engine.model
        cond = engine.condition(points)
        cache = model.new_cache(cond, args.cache_length + 2)
        with torch.no_grad():
            logits, _ = model(prefix, cache=cache)
        start = cache.lengths.clone()
        last = prefix[:, -1:]

        def forward(fn=model, cache=cache, start=start, last=last):
            with torch.no_grad():
                fn(last, cache=cache)
            cache.rollback(start)

        items[f"backbone forward, 1 position, {name}"] = forward
        if args.compile and name == "fp32":
            compiled = torch.compile(model, dynamic=True)
            t0 = time.perf_counter()
            forward(compiled)
            print(f"torch.compile: first call {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            items[f"backbone forward, 1 position, {name}, torch.compile"] = lambda f=forward, c=compiled: f(c)
    row = logits[:, -1].float()
    grammar = Grammar.on(row.device)
    state = grammar.run(prefix[0, 1:20].tolist()) * torch.ones(1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingConfig()
    mask = grammar.mask(state)
    items["grammar mask (lookup + masked_fill)"] = lambda: row.masked_fill(~grammar.mask(state), float("-inf"))
    items["sampling: distribution (top-k 50, top-p, T)"] = lambda: distribution(row, sampling, mask)
    probs = distribution(row, sampling, mask)
    items["sampling: draw (CDF inversion)"] = lambda: draw(probs, gen)
    items["grammar advance"] = lambda: grammar.advance(state, torch.tensor([tokenizer.EOS]))
    samples = {k: [] for k in items}
    keys = list(items)
    for rep in range(args.repeats + 5):
        for k in keys[rep % len(keys):] + keys[: rep % len(keys)]:
            t0 = time.perf_counter()
            items[k]()
            if rep >= 5:
                samples[k].append(time.perf_counter() - t0)
    print(f"checkpoint {path or 'shipped'}, cache {args.cache_length}, "
          f"{args.threads} thread(s), medians of {args.repeats}\n")
    print("| part of an AR step | ms |\n|---|---|")
    for k in keys:
        print(f"| {k} | {1e3 * statistics.median(samples[k]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
