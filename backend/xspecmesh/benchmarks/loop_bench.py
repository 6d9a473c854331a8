"""Our AR loop against the naive published-code-style loop (xspecmesh.decoding.autoregressive), both decoding the same batch of B
point clouds with the same model and seed, interleaved. Run by `xspecmesh bench --ar-vs-naive`.

A batch shares each weight read across its B sequences, but the naive loop's own overheads (cross-attention keys and
values recomputed, the self-attention cache copied by torch.cat and its keys normalised again, every step) grow with
B like the useful work does, so the ratio grows with B; the table reports every B asked for.
"""
from __future__ import annotations

import statistics
import sys

import torch

from xspecmesh.benchmarks.bench import json_safe, machine_info, md_table, procedural_inputs
from xspecmesh.decoding.engine import Engine
from xspecmesh.errors import SettingsError
from xspecmesh.decoding.autoregressive import decode_ar, decode_naive, run_to_end
from xspecmesh.benchmarks.step_cost import timed

LOOPS = {"ar": decode_ar, "naive": decode_naive}


@torch.inference_mode()
def ar_vs_naive(engine: Engine, batches=(1, 8, 16), max_tokens: int = 1500, trials: int = 1, warmup_tokens: int = 20,
                temperature: float = 0.5, progress: bool = True) -> dict:
    """Per batch size B: tokens/s of each loop (median over trials, the order rotated per trial) and their ratio.
    Both loops must give the same tokens for the same seed (checked per trial; `same_tokens`)."""
    from tqdm import tqdm

    from xspecmesh.decoding.token_sampling import SamplingConfig

    if not batches or min(batches) < 1:
        raise SettingsError("--batch sizes must be at least 1")
    model, dev = engine.model, engine.device
    points = [p.points for p in procedural_inputs(max(batches), model.cfg.encoder.num_points)]
    conds = torch.cat([engine.condition(p, seed=0) for p in points])
    sampling = SamplingConfig(temperature, 50, 0.95)

    def decode(loop: str, b: int, tokens: int, seed: int) -> tuple[float, list[list[int]]]:
        gen, out = torch.Generator(device=dev).manual_seed(seed), []
        seconds, _ = timed(lambda: out.extend(run_to_end(LOOPS[loop](model, conds[:b], sampling, tokens,
                                                                     generator=gen), b)), dev)
        return seconds, out

    rows = []
    bar = tqdm(total=len(batches) * trials * 2, desc="ar vs naive", unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for b in batches:
        for loop in LOOPS:
            decode(loop, b, warmup_tokens, 0)
        rates, same, tokens = {loop: [] for loop in LOOPS}, True, 0
        for trial in range(trials):
            order = list(LOOPS)[trial % 2:] + list(LOOPS)[:trial % 2]
            outs = {}
            for loop in order:
                seconds, outs[loop] = decode(loop, b, max_tokens, seed=trial)
                tokens = sum(len(s) for s in outs[loop])
                rates[loop].append(tokens / seconds)
                bar.update()
            same = same and outs["ar"] == outs["naive"]
        ar, naive = statistics.median(rates["ar"]), statistics.median(rates["naive"])
        rows.append({"batch": b, "tokens": tokens, "ar_tokens_per_second": ar, "naive_tokens_per_second": naive,
                     "ar_vs_naive": ar / naive, "same_tokens": same})
    bar.close()
    cfg = model.cfg
    return json_safe({**machine_info(engine), "checkpoint": engine.ckpt.path, "max_tokens": max_tokens,
                      "trials": trials, "temperature": temperature,
                      "model": {"dim": cfg.dim, "depth": cfg.depth, "latents": cfg.encoder.num_latents}, "rows": rows})


def ar_vs_naive_markdown(result: dict) -> str:
    m = result["model"]
    lines = [f"device {result['device']} ({result['cpu']}, {result['threads']} threads), checkpoint "
             f"{result['checkpoint']} (dim {m['dim']}, depth {m['depth']}, {m['latents']} condition latents), up to "
             f"{result['max_tokens']} tokens per sequence, median of {result['trials']} trial(s)", "",
             *md_table(["batch B", "tokens (all B)", "our AR tok/s", "naive tok/s", "ours vs naive", "same tokens"],
                       ([str(r["batch"]), str(r["tokens"]), f"{r['ar_tokens_per_second']:.0f}",
                         f"{r['naive_tokens_per_second']:.0f}", f"{r['ar_vs_naive']:.2f}×",
                         "yes" if r["same_tokens"] else "NO"] for r in result["rows"]))]
    return "\n".join(lines)
