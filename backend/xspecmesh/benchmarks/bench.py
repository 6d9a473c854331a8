"""Benchmarks: plain AR against XSpecMesh speculative decoding on the same model, inputs and seeds.

`run_bench` decodes every input with every seed under every variant (AR, each speculative configuration, optionally
the naive reference loop), interleaved: for one input and seed all variants run back to back, in an order rotated
from one trial to the next, after a short warm-up of each. Speedup is the median over (input, seed) of the pairwise
ratio AR seconds / variant seconds, so slow inputs and machine drift do not bias it. Quality is each output against
its input (`metrics.evaluate`: CD/HD at BPT's 1024 samples and at 10k); an exception or an empty generation is a
failure, counted in its row and never dropped from the speed numbers.
"""
from __future__ import annotations

import itertools
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import trimesh

from xspecmesh.geometry import tokenizer
from xspecmesh.decoding.engine import DecodeSettings, Engine
from xspecmesh.errors import MeshError, SettingsError
from xspecmesh.geometry.metrics import GEOMETRY_KEYS, evaluate
from xspecmesh.geometry.mesh import MESH_EXTENSIONS, load_mesh, normalize, sample_surface, weld

WARMUP_TOKENS = 48  # warm-up decodes are cut here: enough to touch every code path


@dataclass
class BenchInput:
    name: str
    points: np.ndarray  # (N, 6) xyz + normal, normalized frame
    reference: trimesh.Trimesh  # what the output is compared with, same frame


def _marks(tree: bool | None, confidence: float | None) -> tuple[str, str]:
    """How labels and tables mark our speculative options: the draft tree, then the confidence stop."""
    return "+tree" if tree else "", f" c={confidence:g}" if confidence else ""


@dataclass(frozen=True)
class Variant:
    mode: str  # ar | spec | naive
    heads: int | None = None
    delta: float | None = None  # threshold rule only
    accept: str | None = None
    model: str = ""  # "" is the main checkpoint; else the name of a --compare checkpoint
    adaptive: bool = False  # speculative: draft length chosen per step (xspecmesh.decoding.adaptive)
    tree: bool = DecodeSettings.tree  # speculative: the drafter's runner-up for the first draft verified too
    confidence: float = DecodeSettings.confidence  # speculative: drafts end after one the drafter doubts this much

    @property
    def label(self) -> str:
        at = f" @{self.model}" if self.model else ""
        if self.mode != "spec":
            return self.mode + at
        tree, stop = _marks(self.tree, self.confidence)
        return (f"spec D={self.heads}{'*' if self.adaptive else ''}{tree} {self.accept}"
                + (f" δ={self.delta:g}" if self.delta is not None else "") + stop + at)

    def settings(self, seed: int, max_tokens: int, **sampling) -> DecodeSettings:
        s = DecodeSettings(mode=self.mode, seed=seed, max_tokens=max_tokens, fit=False, **sampling)  # decoding only
        if self.mode == "spec":
            s.heads, s.accept, s.adaptive, s.tree, s.confidence = (self.heads, self.accept, self.adaptive, self.tree,
                                                                   self.confidence)
            if self.delta is not None:
                s.delta = self.delta
        return s


def variants(heads=(4,), deltas=(0.5,), accepts=("threshold",), naive: bool = False,
             adaptive: bool = False, trees=(DecodeSettings.tree,),
             confidences=(DecodeSettings.confidence,)) -> list[Variant]:
    """AR first, then every speculative configuration (δ only varies the threshold rule), each also with an
    adaptive draft length if asked, with each draft-tree choice in `trees` and each confidence stop in
    `confidences`, then naive if asked."""
    out = [Variant("ar")]
    for d, rule in itertools.product(heads, accepts):
        for delta in (deltas if rule == "threshold" else (None,)):
            for adapt, tree, conf in itertools.product((False, True) if adaptive else (False,), trees, confidences):
                v = Variant("spec", int(d), None if delta is None else float(delta), rule, adaptive=adapt, tree=tree,
                            confidence=float(conf))
                if v not in out:
                    out.append(v)
    return out + ([Variant("naive")] if naive else [])


def on_model(variant_list: list[Variant], name: str, max_heads: int) -> list[Variant]:
    """The same AR and speculative variants run on another checkpoint (e.g. the pre-LoRA backbone, or MLP heads),
    in the same interleaved trials, so checkpoints compare side by side; speedups stay relative to the main AR.
    Speculative variants with more heads than that checkpoint has are left out."""
    return [replace(v, model=name) for v in variant_list
            if v.mode == "ar" or (v.mode == "spec" and v.heads <= max_heads)]


# ---------------------------------------------------------------------------------------------------------- inputs


def procedural_inputs(count: int, num_points: int, seed: int = 12345, shapes=None) -> list[BenchInput]:
    """Held-out procedural shapes (data.validation_pairs): the reference is the mesh their tokens describe."""
    from xspecmesh.training.data import validation_pairs

    out = []
    for i, pair in enumerate(validation_pairs(count, seed=seed, config=shapes, num_points=num_points)):
        verts, faces = tokenizer.decode_mesh(pair.tokens)
        out.append(BenchInput(f"{i:03d}-{pair.family}", pair.points, trimesh.Trimesh(verts, faces, process=False)))
    return out


def mesh_inputs(directory, count: int | None, num_points: int) -> tuple[list[BenchInput], list[str]]:
    """The first `count` usable mesh files of a directory (sorted, recursive), normalized and surface-sampled;
    plus one 'name: reason' line per unusable file."""
    root = Path(directory)
    if not root.is_dir():
        raise MeshError(f"not a directory: {root}")
    out, skipped = [], []
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in MESH_EXTENSIONS):
        if count is not None and len(out) >= count:
            break
        try:
            mesh = load_mesh(file)
            mesh = trimesh.Trimesh(normalize(mesh.vertices)[0], mesh.faces, process=False)
            points = sample_surface(mesh, num_points, seed=0)
        except MeshError as exc:
            skipped.append(f"{file.name}: {exc}")
            continue
        out.append(BenchInput(file.stem, points, mesh))
    if not out:
        raise MeshError(f"no usable mesh files in {root}")
    return out, skipped


# ----------------------------------------------------------------------------------------------------- the bench


def _run_once(engine: Engine, inp: BenchInput, variant: Variant, seed: int, max_tokens: int, sampling: dict,
              evaluate_quality: bool = True) -> dict:
    row = {"input": inp.name, "seed": seed, "label": variant.label}
    settings = variant.settings(seed, max_tokens, **sampling)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = engine.generate(inp.points, settings)
    except Exception as exc:  # a failure to count, not a reason to lose the whole run
        return row | {"failed": True, "error": f"{type(exc).__name__}: {exc}", "seconds": math.nan,
                      "cpu_seconds": math.nan}
    row["seconds"] = time.perf_counter() - start
    row["cpu_seconds"] = time.process_time() - cpu_start  # all threads: a load-robust companion to wall time
    st = result.stats
    row |= {k: st.get(k, 0) for k in ("tokens", "steps", "scr", "tokens_per_second")}
    row["decode_seconds"] = st.get("decode_seconds", math.nan)
    row["stalled"] = bool(st.get("stalled"))  # stopped in a loop that made no face (engine.STALL_TOKENS)
    row["accept_hist"] = st.get("accept_hist")
    row["head_accepts"], row["head_trials"] = st.get("head_accepts"), st.get("head_trials")
    row["time_split"] = st.get("time_split")  # speculative only: the decoder's seconds drafting, verifying, the rest
    tris = result.mesh.reshape(-1, 3)
    pred = None
    if len(tris):
        verts, faces = weld(tris, np.arange(len(tris)).reshape(-1, 3))
        pred = trimesh.Trimesh(verts, faces, process=False) if len(faces) else None
    row["faces"] = 0 if pred is None else len(pred.faces)
    if not evaluate_quality:
        return row | {"failed": pred is None}
    return row | evaluate(pred, inp.reference, seed=0)


def run_bench(engine: Engine, inputs: list[BenchInput], variant_list: list[Variant], seeds: int = 1,
              max_tokens: int = 10000, sampling: dict | None = None, progress: bool = True,
              others: dict[str, Engine] | None = None) -> dict:
    """Every input × seed × variant, interleaved; returns {device, checkpoint, ..., rows, runs}. Variants with a
    `model` name run on `others[name]` (same inputs, seeds and sampling)."""
    from tqdm import tqdm

    if not inputs:
        raise SettingsError("nothing to benchmark: no inputs")
    if seeds < 1:
        raise SettingsError("--seeds must be at least 1")
    if variant_list[0].mode != "ar" or variant_list[0].model:
        raise SettingsError("the first variant must be AR on the main checkpoint (speedups are relative to it)")
    engines = {"": engine, **(others or {})}
    for v in variant_list:
        if v.model not in engines:
            raise SettingsError(f"no checkpoint named {v.model!r} to compare with")
        v.settings(0, max_tokens, **(sampling or {})).validate(engines[v.model].max_heads)
    sampling = sampling or {}
    trials = [(inp, seed) for inp in inputs for seed in range(seeds)]
    bar = tqdm(total=len(variant_list) * (1 + len(trials)), desc="bench", unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for v in variant_list:  # warm-up: allocator, kernels, lazy initialisation; results discarded
        bar.set_postfix_str(f"warm-up {v.label}")
        _run_once(engines[v.model], inputs[0], v, 0, min(max_tokens, WARMUP_TOKENS), sampling, evaluate_quality=False)
        bar.update()
    runs = []
    for t, (inp, seed) in enumerate(trials):
        k = t % len(variant_list)
        for v in variant_list[k:] + variant_list[:k]:  # A B C, B C A, ...: no variant always runs first
            bar.set_postfix_str(f"{inp.name} seed {seed} {v.label}")
            runs.append({"variant": v, **_run_once(engines[v.model], inp, v, seed, max_tokens, sampling)})
            bar.update()
    bar.close()
    rows = [_summarize(v, runs, variant_list[0], seeds) for v in variant_list]
    out = {**machine_info(engine), "checkpoint": engine.ckpt.path, "inputs": len(inputs), "seeds": seeds,
           "max_tokens": max_tokens, "sampling": DecodeSettings(**sampling).sampling().__dict__, "rows": rows}
    if others:
        out["compare"] = {name: e.ckpt.path for name, e in others.items()}
    naive = next((r for r in rows if r["mode"] == "naive"), None)
    if naive is not None and naive["speedup"] is not None:
        out["ar_vs_naive"] = 1.0 / naive["speedup"]  # how much faster our AR loop is than the reference loop
    out["runs"] = [{**{k: v for k, v in r.items() if k != "variant"}, **_variant_fields(r["variant"])} for r in runs]
    return json_safe(out)


def _variant_fields(v: Variant) -> dict:
    return {"mode": v.mode, "heads": v.heads, "delta": v.delta, "accept": v.accept, "model": v.model,
            "adaptive": v.adaptive, "tree": v.tree if v.mode == "spec" else None,
            "confidence": v.confidence if v.mode == "spec" else None}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def _summarize(v: Variant, runs: list[dict], ar: Variant, seeds: int) -> dict:
    mine = [r for r in runs if r["variant"] == v]
    base = {(r["input"], r["seed"]): r for r in runs if r["variant"] == ar}
    timed = [r for r in mine if not math.isnan(r["seconds"])]
    ok = [r for r in mine if not r["failed"]]
    pairs = [(base[(r["input"], r["seed"])], r) for r in timed if not math.isnan(base[(r["input"], r["seed"])]
                                                                                  ["seconds"])]
    row = _variant_fields(v) | {
        "runs": len(mine),
        "failures": len(mine) - len(ok),
        "stalled": sum(bool(r.get("stalled")) for r in timed),
        "seconds": _median(r["seconds"] for r in timed),
        "decode_seconds": _median(r["decode_seconds"] for r in timed),
        "speedup": _median(a["seconds"] / b["seconds"] for a, b in pairs if b["seconds"] > 0),
        "cpu_seconds": _median(r["cpu_seconds"] for r in timed),
        "speedup_cpu": _median(a["cpu_seconds"] / b["cpu_seconds"] for a, b in pairs if b["cpu_seconds"] > 0),
        "speedup_tokens": _median(b["tokens_per_second"] / a["tokens_per_second"] for a, b in pairs
                                  if a["tokens_per_second"] > 0),
        "scr": sum(r["tokens"] for r in timed) / max(1, sum(r["steps"] for r in timed)),
        "tokens_per_second": _median(r["tokens_per_second"] for r in timed),
        "tokens": _mean(r["tokens"] for r in timed),
        "faces": _mean(r["faces"] for r in timed),
    }
    row |= {k: _mean(r[k] for r in ok) for k in GEOMETRY_KEYS}
    counted = [r for r in timed if r.get("head_trials")]  # (speculative runs: they carry the decoder's counts)
    if counted:  # per head, pooled: its drafts accepted over its drafts verified (the decoder counts both: a step the
        # confidence stop ended early, or whose d1 the tree's alternative replaced, did not try the later heads)
        hist, accepts, trials = (np.sum([r[k] for r in counted], axis=0)
                                 for k in ("accept_hist", "head_accepts", "head_trials"))
        row["accept_hist"] = hist.tolist()
        row["head_accept_rates"] = [float(a / t) if t else None for a, t in zip(accepts, trials)]  # (None: never tried)
        row["step_cost"] = _step_cost(counted, base)
    if seeds >= 3:  # quality parity: the spread of per-seed mean CD/HD
        for key in ("cd", "hd"):
            per_seed = [_mean(r[key] for r in ok if r["seed"] == s) for s in range(seeds)]
            per_seed = [x for x in per_seed if x is not None]
            row[f"{key}_seed_mean"] = _mean(per_seed)
            row[f"{key}_seed_std"] = statistics.stdev(per_seed) if len(per_seed) >= 2 else None
    return row


def _step_cost(spec_runs: list[dict], ar_runs: dict) -> dict | None:
    """A speculative step's cost in AR steps (AR's decode seconds per step over the same trials), all of it and split
    as the decoder times it (drafting, the verify forward, the rest of its own work; `all` also holds the caller's
    work between steps). Tokens per second go about as SCR / `all`: the arithmetic that bounds the speedup."""
    pairs = [(ar_runs[(r["input"], r["seed"])], r) for r in spec_runs if r.get("time_split")]
    pairs = [(a, r) for a, r in pairs if not math.isnan(a["decode_seconds"]) and not math.isnan(r["decode_seconds"])]
    ar_step = sum(a["decode_seconds"] for a, _ in pairs) / max(1, sum(a["steps"] for a, _ in pairs))
    steps = sum(r["steps"] for _, r in pairs)
    if not steps or ar_step <= 0:
        return None
    parts = {k: sum(r["time_split"][k] for _, r in pairs) for k in ("draft", "verify", "other")}
    parts["all"] = sum(r["decode_seconds"] for _, r in pairs)
    return {k: v / steps / ar_step for k, v in parts.items()}


def json_safe(x):
    """JSON-safe: NaN/inf become None, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def machine_info(engine: Engine) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(engine.device), "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


# ------------------------------------------------------------------------------------------------------ reporting


def cell(x, spec: str = ".3f") -> str:
    """A table cell: a dash for a missing value."""
    return "–" if x is None else format(x, spec)


def md_table(header: list[str], rows) -> list[str]:
    """The lines of a Markdown table: the header, its separator, then one line per row of cell strings."""
    return [f"| {' | '.join(header)} |", "|---" * len(header) + "|", *(f"| {' | '.join(r)} |" for r in rows)]


def _mode(row: dict) -> str:
    tree, stop = _marks(row.get("tree"), row.get("confidence"))
    return (row["mode"] + (" adaptive" if row.get("adaptive") else "") + (" " + tree if tree else "") + stop
            + (f" @{row['model']}" if row.get("model") else ""))


def markdown(result: dict) -> str:
    lines = [f"device {result['device']} ({result['cpu']}, {result['threads']} threads), checkpoint "
             f"{result['checkpoint']}, {result['inputs']} inputs × {result['seeds']} seed(s), max "
             f"{result['max_tokens']} tokens", "",
             "| mode | D | δ | accept | s/mesh | speedup | CPU-time speedup | SCR | tok/s | CD | HD | CD 10k | HD 10k "
             "| faces | failed | stalled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {_mode(r)} | {r['heads'] or '–'} | {cell(r['delta'], 'g')} | {r['accept'] or '–'} | "
                     f"{cell(r['seconds'])} | {cell(r['speedup'], '.2f')}× | {cell(r['speedup_cpu'], '.2f')}× | "
                     f"{cell(r['scr'], '.2f')} | "
                     f"{cell(r['tokens_per_second'], '.0f')} | {cell(r['cd'], '.4f')} | {cell(r['hd'], '.4f')} | "
                     f"{cell(r['cd_10k'], '.4f')} | {cell(r['hd_10k'], '.4f')} | {cell(r['faces'], '.0f')} | "
                     f"{r['failures']}/{r['runs']} | {r['stalled']} |")
    costed = [r for r in result["rows"] if r.get("step_cost")]
    if costed:
        lines += ["", "a speculative step's cost in AR steps (SCR / all ≈ the speedup by tokens per second):", "",
                  "| mode | D | δ | accept | draft | verify | other | all | SCR / all |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in costed:
            c = r["step_cost"]
            lines.append(f"| {_mode(r)} | {r['heads'] or '–'} | {cell(r['delta'], 'g')} | {r['accept'] or '–'} | "
                         + " | ".join(cell(c[k], '.2f') for k in ("draft", "verify", "other", "all"))
                         + f" | {cell(r['scr'] / c['all'], '.2f')}× |")
    for name, path in result.get("compare", {}).items():
        lines += ["", f"@{name}: {path}"]
    if "ar_vs_naive" in result:
        lines += ["", f"our AR loop vs the naive reference loop: {result['ar_vs_naive']:.2f}× faster"]
    if result["seeds"] >= 3:
        lines += ["", f"quality over {result['seeds']} seeds (mean ± std of per-seed mean):", "",
                  "| mode | D | δ | accept | CD | HD |", "|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {_mode(r)} | {r['heads'] or '–'} | {cell(r['delta'], 'g')} | {r['accept'] or '–'} | "
                         f"{cell(r['cd_seed_mean'], '.4f')} ± {cell(r['cd_seed_std'], '.4f')} | "
                         f"{cell(r['hd_seed_mean'], '.4f')} ± {cell(r['hd_seed_std'], '.4f')} |")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Speedup and SCR against δ (one line per D) and against D (one line per δ), CD against δ, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = [r for r in result["rows"] if r["mode"] == "spec" and r["accept"] == "threshold" and not r.get("model")
            and not r.get("adaptive")]
    ar = next(r for r in result["rows"] if r["mode"] == "ar" and not r.get("model"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for row_axes, (x_key, line_key, x_label) in zip(axes, (("delta", "heads", "δ"), ("heads", "delta", "D"))):
        for ax, (key, name) in zip(row_axes, (("speedup", "speedup over AR"), ("scr", "SCR"), ("cd", "CD (1024)"))):
            for line in sorted({r[line_key] for r in spec}):
                pts = sorted((r[x_key], r[key]) for r in spec if r[line_key] == line and r[key] is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{'D' if line_key == 'heads' else 'δ'}={line:g}")
            base = 1.0 if key in ("speedup", "scr") else ar["cd"]
            if base is not None:
                ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="AR")
            ax.set_xlabel(x_label)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']} · {Path(str(result['checkpoint'])).name} · {result['inputs']} inputs × "
                 f"{result['seeds']} seeds")
    fig.savefig(path, dpi=110)
    plt.close(fig)
