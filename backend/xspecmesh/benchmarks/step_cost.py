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
from xspecmesh.benchmarks.bench import cell, json_safe, machine_info, md_table
from xspecmesh.decoding.engine import Engine
from xspecmesh.decoding.token_sampling import HAVE_3, DraftWalk, Grammar
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


@torch.inference_mode()
def step_cost(engine: Engine, depths=range(1, 7), cache_lengths=(500, 1500), repeats: int = 50, warmup: int = 5,
              progress: bool = True, others: dict[str, Engine] | None = None) -> dict:
    """Median wall time of one speculative step (heads draft D tokens, backbone verifies D+1 positions) over one
    AR step (backbone on 1 position), same model and cache, interleaved, per cache length and D. `others` (label ->
    engine, e.g. the same checkpoint at another precision) are timed in the same interleaved repetitions; their rows
    also carry `ar_speedup`, the main engine's AR step time over theirs."""
    from tqdm import tqdm

    engines = {engine.precision: engine, **(others or {})}
    for e in engines.values():
        if e.ckpt.heads is None:
            raise SettingsError("this checkpoint has no drafting heads")
    max_heads = min(e.ckpt.heads.num_heads for e in engines.values())
    depths = [d for d in depths if 1 <= d <= max_heads]
    if not depths:
        raise SettingsError(f"no D in range: the checkpoint has {max_heads} head(s)")
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(4096, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    sphere = np.concatenate([xyz * 0.9, xyz], 1)  # the content does not matter
    model_cfg = engine.model.cfg
    rows, lengths = [], []
    bar = tqdm(total=len(cache_lengths) * (warmup + repeats), desc="step cost", unit="rep", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for want in cache_lengths:
        length = max(1, min(int(want), model_cfg.max_seq_len - max(depths) - 2))  # the model's position table
        lengths.append(length)
        prefix = torch.randint(0, tokenizer.EOS, (1, length), generator=torch.Generator().manual_seed(length))
        calls = (warmup + repeats) * len(depths)
        steps = {label: _step_fns(e, sphere, prefix, depths, calls) for label, e in engines.items()}
        order = [(label, item) for label in engines for item in ["ar", *depths]]
        samples = {key: [] for key in order}  # per repetition: (wall, cpu) of draft and verify
        for rep in range(warmup + repeats):
            k = rep % len(order)
            for label, item in order[k:] + order[:k]:
                ar, draft, verify = steps[label]
                if item == "ar":
                    t = (timed(ar, engines[label].device), (0.0, 0.0))
                else:
                    box = {}
                    t = (timed(lambda: box.setdefault("d", draft(item)), engines[label].device),
                         timed(lambda: verify(box["d"]), engines[label].device))
                if rep >= warmup:
                    samples[(label, item)].append(t)
            bar.update()

        def med(key, part, clock):  # part: 0 draft (the AR forward for "ar"), 1 verify, None both
            return statistics.median(sum(t[p][clock] for p in ((0, 1) if part is None else (part,)))
                                     for t in samples[key])

        main_ar = med((engine.precision, "ar"), None, 0)
        for label in engines:
            ar_s, ar_cpu = med((label, "ar"), None, 0), med((label, "ar"), None, 1)
            for d in depths:
                step, step_cpu = med((label, d), None, 0), med((label, d), None, 1)
                rows.append({"precision": label, "cache_length": length, "heads": d, "ar_ms": 1e3 * ar_s,
                             "ar_speedup": main_ar / ar_s, "draft_ms": 1e3 * med((label, d), 0, 0),
                             "verify_ms": 1e3 * med((label, d), 1, 0), "step_ms": 1e3 * step, "ratio": step / ar_s,
                             "verify_ratio": med((label, d), 1, 0) / ar_s,
                             "oracle_speedup": (d + 1) * ar_s / step, "ratio_cpu": step_cpu / max(ar_cpu, 1e-9),
                             "oracle_speedup_cpu": (d + 1) * ar_cpu / max(step_cpu, 1e-9)})
    bar.close()
    return json_safe({**machine_info(engine), "checkpoint": engine.ckpt.path, "repeats": repeats,
                      "model": {"dim": model_cfg.dim, "depth": model_cfg.depth, "heads": model_cfg.heads,
                                "max_seq_len": model_cfg.max_seq_len},
                      "cache_lengths": lengths, "rows": rows})


def _step_fns(engine: Engine, points: np.ndarray, prefix: torch.Tensor, depths, draft_calls: int):
    """(ar(), draft(D) -> drafts, verify(drafts)) against a cache holding `prefix`; ar and verify leave the cache as
    found, each draft commits one more pair to a draft decoder's own cache (room for `draft_calls` of them)."""
    model, heads, dev = engine.model, engine.ckpt.heads, engine.device
    cond = engine.condition(points, seed=0)
    prefix = prefix.to(dev)  # position 0 reads as BOS
    cache = model.new_cache(cond, prefix.shape[1] + max(depths) + 2)
    _, hidden = model(prefix, cache=cache, taps=heads.taps)
    h = hidden[:, -1:]
    # A draft decoder's own cache holds the prefix too.
    ctx = heads.begin(model, cond, prefix.shape[1] + draft_calls + max(depths) + 2)
    heads.propose(model, ctx, hidden[:, :-1], prefix[:, 1:], torch.tensor([prefix.shape[1] - 1], device=dev), 0, None)
    start_len = cache.lengths.clone()
    last = prefix[:, -1:]

    def ar():
        model(last, cache=cache)
        cache.rollback(start_len)

    grammar = Grammar.on(dev)
    any_class = torch.tensor([HAVE_3], device=dev)  # (a patch's third vertex is done: any class may follow)

    def draft(d):
        return heads.propose(model, ctx, h, last, torch.ones(1, dtype=torch.long, device=dev), d,
                             DraftWalk(grammar, any_class))  # (1, D) greedy drafts

    def verify(drafts):
        model(torch.cat([last, drafts], 1), cache=cache, taps=heads.taps)
        cache.rollback(start_len)

    return ar, draft, verify


def step_cost_markdown(result: dict) -> str:
    m = result["model"]
    lines = [f"device {result['device']} ({result['cpu']}, {result['threads']} threads), checkpoint "
             f"{result['checkpoint']} (dim {m['dim']}, depth {m['depth']}), medians of {result['repeats']}", "",
             *md_table(["weights", "cache", "D", "AR step ms", "AR speedup", "draft ms", "verify ms", "verify / AR",
                        "spec step ms", "cost ratio", "oracle speedup", "CPU-time ratio", "oracle speedup (CPU time)"],
                       ([r["precision"], str(r["cache_length"]), str(r["heads"]), f"{r['ar_ms']:.2f}",
                         f"{r['ar_speedup']:.2f}×", f"{r['draft_ms']:.2f}", f"{r['verify_ms']:.2f}",
                         f"{r['verify_ratio']:.2f}", f"{r['step_ms']:.2f}", f"{r['ratio']:.2f}",
                         f"{r['oracle_speedup']:.2f}×", cell(r["ratio_cpu"], ".2f"),
                         cell(r["oracle_speedup_cpu"], ".2f") + "×"] for r in result["rows"]))]
    return "\n".join(lines)
