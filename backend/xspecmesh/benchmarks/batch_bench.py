"""Batch retopology benchmark: objects per minute and tokens/s at several batch sizes B, AR and speculative, on real
meshes and on procedural shapes, every configuration interleaved in each repetition (the machine may be shared).

    python -m xspecmesh.benchmarks.batch_bench --meshes cache/eval/meshes --count 16 --batch 1,4,8,16 --rounds 8,16 \
        --max-tokens 600 --reps 2 --serve 8 --json batch_bench.json

Three measurements:
  engine  each set of objects decoded B at a time through `Engine.stream_batch` (what `xspecmesh batch` and
          `serve --batch` run), a waiting object taking the slot of one that finished; with --rounds also in rounds
          of B that each wait for their longest object. B = 1 is today's path, `Engine.stream` one object after
          another. Greedy decoding (temperature 0), so every B must give every object the tokens it gets alone:
          `identical` checks it. `occupancy`: the share of slot-steps that decoded a live object. Mode
          `spec+adaptive`: speculative with the adaptive draft length (a chooser per batch size, as the engine keeps).
  serve   (--serve N) N objects sent at once to a `xspecmesh serve --batch B` process, as the add-on's collection
          mode sends them, B = 1 (one at a time) against B = N; seconds from the first request to the last `done`,
          and whether every object's triangles agree.
  cli     (--cli N) `xspecmesh batch` on N mesh files with --batch 1 against --batch N: wall time of the command
          (interpreter start, imports and model loading included) and the objects per minute its own summary reports
          (loading, sampling, decoding, fitting and writing the files), and whether the files are byte-identical.
serve and cli take the first N objects of the real set, or of the procedural one with `--paths-set procedural` (its
shapes written as OBJ files for the CLI).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from xspecmesh.decoding.engine import JOINING, DecodeSettings, Engine


def decode_set(engine: Engine, points: list[np.ndarray], settings: DecodeSettings, batch: int,
               join: bool = True) -> tuple[dict, list]:
    """Decode every object, `batch` at a time: queued objects joining as others finish (`join`), or in rounds of
    `batch` that each wait for their longest object; (measurements, tokens per object)."""
    tokens: list[list[int]] = [[] for _ in points]
    row_steps = slot_steps = 0
    start = time.perf_counter()
    conds = [engine.condition(p, settings.seed) for p in points]
    groups = [list(range(len(points)))] if join else [list(range(f, min(len(points), f + batch)))
                                                      for f in range(0, len(points), batch)]
    for idx in groups if batch > 1 else []:
        steps, batch_steps, earlier = {}, 0, 0  # (naive decoding goes in rounds, each counting from 1)
        for i, upd in engine.stream_batch([conds[k] for k in idx], [replace(settings) for _ in idx], slots=batch):
            tokens[idx[i]] += upd.tokens
            steps[i] = upd.stats["steps"]
            if upd.stats["batch_steps"] < batch_steps:
                earlier += batch_steps
            batch_steps = upd.stats["batch_steps"]
        row_steps += sum(steps.values())
        slot_steps += min(batch, len(idx)) * (earlier + batch_steps)
    for k in range(len(points)) if batch == 1 else []:  # today's path: one object after another
        for upd in engine.stream(points[k], replace(settings)):
            tokens[k] += upd.tokens
        row_steps += upd.stats["steps"]
        slot_steps += upd.stats["steps"]
    seconds = time.perf_counter() - start
    n_tokens = sum(map(len, tokens))
    return {"seconds": seconds, "objects": len(points), "tokens": n_tokens,
            "occupancy": row_steps / slot_steps if slot_steps else 1.0,
            "scr": n_tokens / row_steps if row_steps else 0.0}, tokens


def bench_engine(engine: Engine, sets: dict[str, list[np.ndarray]], batches, modes, max_tokens: int, reps: int,
                 log=print, rounds=()) -> list[dict]:
    """Every (set, mode, B) once per repetition, interleaved, with joining; B in `rounds` also in rounds; rows
    summed over repetitions."""
    rows: dict[tuple, dict] = {}
    for rep in range(reps):
        for set_name, points in sets.items():
            for mode in modes:
                settings = DecodeSettings(mode=mode.removesuffix("+adaptive"), adaptive=mode.endswith("+adaptive"),
                                          temperature=0.0, max_tokens=max_tokens, seed=0, fit=False)
                alone = None
                # (a mode that cannot join goes in rounds anyway: no second run)
                for b, join in [(b, True) for b in batches] + [(b, False) for b in rounds if settings.mode in JOINING]:
                    m, tokens = decode_set(engine, points, settings, b, join)
                    alone = tokens if alone is None else alone
                    how = "join" if (join and settings.mode in JOINING) or b == 1 else "rounds"
                    row = rows.setdefault((set_name, mode, b, how), {
                        "set": set_name, "mode": mode, "batch": b, "refill": how, "seconds": 0.0, "tokens": 0,
                        "objects": 0, "occupancy": [], "scr": 0.0, "identical": True})
                    row["seconds"] += m["seconds"]
                    row["tokens"] += m["tokens"]
                    row["objects"] += m["objects"]
                    row["occupancy"].append(m["occupancy"])
                    row["scr"] = m["scr"]
                    row["identical"] &= tokens == alone
                    log(f"rep {rep} {set_name} {mode} B={b} {how}: {m['seconds']:.1f} s, {m['tokens']} tokens, "
                        f"occupancy {m['occupancy']:.2f}")
    out = []
    for (set_name, mode, b, how), row in rows.items():
        base = rows[(set_name, mode, batches[0], "join")]
        row["objects_per_minute"] = 60 * row["objects"] / row["seconds"]
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        row["speedup"] = base["seconds"] / row["seconds"]
        row["occupancy"] = float(np.mean(row["occupancy"]))
        out.append(row)
    return out


def _serve_once(checkpoint: str, points: list[np.ndarray], settings: dict, batch: int, threads: int) -> tuple:
    from xspecmesh.serving import protocol

    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "xspecmesh", "serve", "--device", "cpu", "--batch", str(batch),
                             *(["--checkpoint", checkpoint] if checkpoint else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert protocol.decode(proc.stdout.readline())["type"] == "hello"
        start = time.perf_counter()
        for i, p in enumerate(points):
            p = np.resize(p, (max(len(p), protocol.MIN_POINTS), 6))  # the protocol's minimum (a tiny model reads fewer)
            line = protocol.generate(f"o{i}", p.astype("<f4").tobytes(), len(p), settings, more=i < len(points) - 1)
            proc.stdin.write(protocol.encode(line))
        proc.stdin.flush()
        tris: dict[str, list] = {f"o{i}": [] for i in range(len(points))}
        done = 0
        while done < len(points):
            msg = protocol.decode(proc.stdout.readline())
            if msg["type"] == "faces":
                tris[msg["id"]] += msg["triangles"]
            elif msg["type"] in ("done", "error"):
                done += 1
        return time.perf_counter() - start, tris
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def bench_serve(checkpoint, points, modes, max_tokens, reps, threads, log=print) -> list[dict]:
    """N objects at once through `serve --batch 1` and `serve --batch N` (the add-on's collection mode)."""
    rows = []
    for mode in modes:
        settings = {"mode": mode, "temperature": 0.0, "max_tokens": max_tokens}
        seconds = {1: 0.0, len(points): 0.0}
        same = True
        for rep in range(reps):
            results = {}
            for b in seconds:
                s, results[b] = _serve_once(checkpoint, points, settings, b, threads)
                seconds[b] += s
                log(f"serve rep {rep} {mode} --batch {b}: {s:.1f} s")
            same &= results[1] == results[len(points)]
        rows.append({"mode": mode, "objects": len(points), "seconds_one_at_a_time": seconds[1],
                     "seconds_batched": seconds[len(points)], "speedup": seconds[1] / seconds[len(points)],
                     "identical": same, "reps": reps})
    return rows


def bench_cli(checkpoint, files: list[Path], modes, max_tokens, reps, threads, log=print) -> list[dict]:
    """`xspecmesh batch` on the files with --batch 1 and --batch N: wall time of the command, outputs compared."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="xspecmesh-batch-bench-") as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for f in files:
            shutil.copy(f, src / f.name)
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        for mode in modes:
            seconds, own = {1: 0.0, len(files): 0.0}, {1: 0.0, len(files): 0.0}
            same = True
            for rep in range(reps):
                outs = {}
                for b in seconds:
                    out = Path(tmp) / f"out_{mode}_{b}_{rep}"
                    t = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "xspecmesh", "batch", str(src), "-o", str(out),
                                           "--batch", str(b), "--mode", mode, "--temperature", "0", "--max-tokens",
                                           str(max_tokens), "--device", "cpu", "--no-progress", "--json",
                                           *(["--checkpoint", checkpoint] if checkpoint else [])],
                                          env=env, check=True, capture_output=True)
                    seconds[b] += time.perf_counter() - t
                    own[b] += json.loads(done.stdout)["seconds"]
                    outs[b] = {p.name: p.read_bytes() for p in out.glob("*_retopo.*")}
                    log(f"cli rep {rep} {mode} --batch {b}: {time.perf_counter() - t:.1f} s")
                same &= outs[1] == outs[len(files)] and len(outs[1]) == len(files)
            rows.append({"mode": mode, "objects": len(files), "seconds_one_at_a_time": seconds[1],
                         "seconds_batched": seconds[len(files)], "speedup": seconds[1] / seconds[len(files)],
                         "summary_seconds_one_at_a_time": own[1], "summary_seconds_batched": own[len(files)],
                         "summary_speedup": own[1] / own[len(files)], "identical": same, "reps": reps})
    return rows


def table(rows: list[dict]) -> str:
    from xspecmesh.benchmarks.bench import md_table

    header = ["set", "mode", "B", "refill", "objects/min", "tokens/s", "× B=1", "occupancy", "SCR", "identical"]
    return "\n".join(md_table(header, ([r["set"], r["mode"], str(r["batch"]),
                                        "one at a time" if r["batch"] == 1 else r["refill"],
                                        f"{r['objects_per_minute']:.2f}", f"{r['tokens_per_second']:.0f}",
                                        f"{r['speedup']:.2f}", f"{r['occupancy']:.2f}", f"{r['scr']:.2f}",
                                        "yes" if r["identical"] else "NO"] for r in rows)))


def main(argv=None) -> int:
    from xspecmesh.benchmarks.bench import mesh_inputs, procedural_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meshes", default=None, help="folder of real meshes (tools/fetch_eval_meshes.py)")
    p.add_argument("--count", type=int, default=16, help="objects per set")
    p.add_argument("--batch", default="1,4,8,16", help="batch sizes, the first the baseline (1: one at a time)")
    p.add_argument("--rounds", default="", help="batch sizes also run in rounds (no joining), to compare")
    p.add_argument("--modes", default="ar,spec")
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--serve", type=int, default=0, help="also N objects through serve --batch 1 vs N")
    p.add_argument("--cli", type=int, default=0, help="also `xspecmesh batch` on N mesh files, --batch 1 vs N")
    p.add_argument("--paths-set", choices=("real", "procedural"), default="real",
                   help="the set whose first N objects --serve and --cli take")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    rounds = [int(b) for b in args.rounds.split(",") if b]
    modes = args.modes.split(",")
    plain = [m for m in modes if not m.endswith("+adaptive")]  # (serve and cli: the request's own settings)
    engine = Engine.load(args.checkpoint, "cpu")
    n = engine.model.cfg.encoder.num_points
    if args.paths_set == "real" and (args.serve or args.cli) and not args.meshes:
        p.error("--serve and --cli on the real set need --meshes")
    inputs = {}
    if args.meshes:
        inputs["real"] = mesh_inputs(args.meshes, args.count, n)[0]
    inputs["procedural"] = procedural_inputs(args.count, n)
    sets = {name: [i.points for i in found] for name, found in inputs.items()}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = {"threads": args.threads, "max_tokens": args.max_tokens, "reps": args.reps, "count": args.count,
              "checkpoint": engine.ckpt.path, "paths_set": args.paths_set,
              "engine": bench_engine(engine, sets, batches, modes, args.max_tokens, args.reps, log, rounds)}
    if args.serve:
        pts = sets[args.paths_set][: args.serve]
        result["serve"] = bench_serve(args.checkpoint, pts, plain, args.max_tokens, args.reps, args.threads, log)
    if args.cli:
        with tempfile.TemporaryDirectory(prefix="xspecmesh-batch-bench-shapes-") as tmp:
            if args.paths_set == "real":
                from xspecmesh.serving.batch import find_tasks

                files = [t.source for t in find_tasks(args.meshes, Path(tmp) / "unused")][: args.cli]
            else:  # the procedural shapes as files, as a user's folder would hold them
                files = []
                for i in inputs["procedural"][: args.cli]:
                    files.append(Path(tmp) / f"{i.name}.obj")
                    i.reference.export(files[-1])
            result["cli"] = bench_cli(args.checkpoint, files, plain, args.max_tokens, args.reps, args.threads, log)
    print(table(result["engine"]))
    for kind in ("serve", "cli"):
        for r in result.get(kind, []):
            own = (f" (the command's own summary: {r['summary_seconds_one_at_a_time']:.1f} s against "
                   f"{r['summary_seconds_batched']:.1f} s, {r['summary_speedup']:.2f}x)" if kind == "cli" else "")
            print(f"{kind} {r['mode']}: {r['objects']} {args.paths_set} objects, one at a time "
                  f"{r['seconds_one_at_a_time']:.1f} s, batched {r['seconds_batched']:.1f} s, "
                  f"{r['speedup']:.2f}x{own}, "
                  f"identical: {r['identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
