"""Why verifying a few positions against the KV cache costs more than one AR step: torch.profiler over the backbone
forward on 1, 2 and 5 new positions (docs/BENCHMARKS.md, "CPU precision and overhead"), with the fp32 linear layers
on aten's BLAS path (PyTorch's default), on oneDNN (our fp32 default on CPU) and with int8 weights.

    .venv/bin/python tools/profile_verify.py [--preset bpt] [--threads 2] [--cache-length 500] [--repeats 3]

Prints, per variant and number of positions, the wall milliseconds per forward and the operators that take the most
self CPU time.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from xspecmesh.model import precision
from xspecmesh.model.config import preset
from xspecmesh.model.transformer import MeshTransformer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-length", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = MeshTransformer(preset(args.preset)).eval()
    variants = {"fp32 aten": base}
    for name in ("fp32", "int8"):
        model = copy.deepcopy(base)
        precision.apply(model, None, name)
        variants[f"{name} oneDNN" if name == "fp32" else name] = model
    cfg = base.cfg
    with torch.no_grad():
        cond = base.encode(torch.randn(1, cfg.encoder.num_points, 6))
    prefix = torch.randint(0, 5120, (1, args.cache_length), generator=torch.Generator().manual_seed(0))
    for name, model in variants.items():
        with torch.no_grad():
            cache = model.new_cache(cond, args.cache_length + 8)
            model(prefix, cache=cache)
            start = cache.lengths.clone()
            for n in (1, 2, 5):
                new = prefix[:, -n:]
                model(new, cache=cache)  # warm-up
                cache.rollback(start)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        model(new, cache=cache)
                        cache.rollback(start)
                    ms = 1e3 * (time.perf_counter() - t0) / args.repeats
                rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
                total = sum(e.self_cpu_time_total for e in prof.key_averages())
                tops = ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in rows)
                print(f"{name:12s} {n} position(s): {ms:8.1f} ms/forward (profiled) | {tops}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
