"""`xspecmesh bench`: AR vs XSpecMesh speculative decoding on the same model, inputs and seeds (xspecmesh/bench.py);
`--step-cost` times one speculative step against one AR step instead."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xspecmesh.decoding.settings_schema import SETTINGS, defaults
from xspecmesh.model import precision

DEFAULT = defaults()


def _list(kind):
    def parse(text: str):
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark AR against speculative decoding (speed, SCR, quality)",
        description="Decode every input with every seed as plain AR and as each speculative configuration, "
        "interleaved in one process after a warm-up, and report per configuration the median seconds per mesh, the "
        "speedup over AR (median of per-input ratios), SCR, tokens/s, CD/HD against the input, faces and failures.")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the shipped one)")
    p.add_argument("--random", metavar="PRESET", default=None,
                   help="time a randomly initialised model of this preset (tiny/small/bpt) with 6 heads instead of a "
                        "checkpoint; its speed is real, its quality numbers are meaningless")
    p.add_argument("--meshes", default=None, help="directory of mesh files to use as inputs (default: procedural "
                   "held-out shapes)")
    p.add_argument("--families", default=None,
                   help="procedural inputs: comma-separated families (default: those the checkpoint was trained on)")
    p.add_argument("--max-faces", type=int, default=None,
                   help="procedural inputs: face cap (default: the checkpoint's training cap)")
    p.add_argument("--count", type=int, default=8, help="number of inputs (default 8; with --meshes: the first N)")
    p.add_argument("--heads", type=_list(int), default=[DEFAULT["heads"]],
                   help=f"comma-separated D values (default {DEFAULT['heads']})")
    p.add_argument("--delta", type=_list(float), default=[DEFAULT["delta"]],
                   help=f"comma-separated δ values (default {DEFAULT['delta']})")
    p.add_argument("--accept", type=_list(str), default=[DEFAULT["accept"]],
                   help=f"comma-separated acceptance rules: {', '.join(SETTINGS['accept'].values)} "
                   f"(default {DEFAULT['accept']})")
    p.add_argument("--seeds", type=int, default=1, help="seeds per input (default 1; >= 3 adds quality mean ± std)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    precision.add_argument(p)
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"token cap per mesh (default {DEFAULT['max_tokens']}; --ar-vs-naive: per sequence, default 1500)")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature (default {DEFAULT['temperature']})")
    p.add_argument("--compare", type=_list(str), default=[], metavar="CKPT[,CKPT]",
                   help="also run the AR and speculative variants on these checkpoints in the same interleaved trials "
                        "(e.g. the pre-LoRA model, or one with MLP heads); rows are marked @<file name>")
    p.add_argument("--compare-precision", type=_list(str), default=[], metavar="P[,P]",
                   help="also run the AR and speculative variants (or, with --step-cost, the step timings) with the "
                        "same checkpoint at these weight precisions (fp32, int8, bf16) in the same interleaved trials; "
                        "rows are marked @<precision>")
    p.add_argument("--precision-check", action="store_true",
                   help="instead: teacher-forced top-1 agreement of the backbone (and each head) at --precision with "
                        "fp32, on --count validation shapes")
    p.add_argument("--adaptive", action="store_true",
                   help="also run every speculative configuration with an adaptive draft length (rows 'spec adaptive')")
    p.add_argument("--tree", choices=("on", "off", "both"), default="on" if DEFAULT["tree"] else "off",
                   help="the draft tree (the drafter's runner-up for the first draft verified too): on, off, or both "
                        "side by side (rows '+tree' have it; default: the decode default)")
    p.add_argument("--confidence", type=_list(float), default=[DEFAULT["confidence"]], metavar="C[,C]",
                   help="comma-separated confidence stops: a step's drafts end after one the drafter gives less "
                        f"probability than C (0: always D drafts; default {DEFAULT['confidence']}; rows 'c=C')")
    p.add_argument("--naive", action="store_true", help="also run the naive reference loop (our AR vs naive)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw speedup/SCR/CD against δ and D to this PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--step-cost", action="store_true",
                   help="instead: time one speculative step (draft D + verify D+1) against one AR step for each D")
    p.add_argument("--cache-lengths", type=_list(int), default=[500, 1500],
                   help="--step-cost: cache lengths to time at (default 500,1500)")
    p.add_argument("--repeats", type=int, default=50, help="--step-cost: timed repetitions (default 50)")
    p.add_argument("--ar-vs-naive", action="store_true",
                   help="instead: tokens/s of our AR loop against the naive published-code-style loop on the same "
                        "batch of inputs, per batch size (--batch; trials: --seeds; length: --max-tokens)")
    p.add_argument("--batch", type=_list(int), default=[1, 8, 16],
                   help="--ar-vs-naive: comma-separated batch sizes B (default 1,8,16)")
    p.set_defaults(func=run)


def _engines(args):
    """The engine at --precision, and {precision: engine} for each --compare-precision (and fp32 for
    --precision-check), all from the same weights."""
    import tempfile

    from xspecmesh.model.checkpoint import write_random_checkpoint
    from xspecmesh.decoding.engine import Engine
    from xspecmesh.errors import SettingsError

    wanted = list(args.compare_precision) + (["fp32"] if args.precision_check else [])
    for p in wanted:
        if p not in precision.PRECISIONS[1:]:
            raise SettingsError(f"--compare-precision: {p!r} is not one of {', '.join(precision.PRECISIONS[1:])}")

    def load(path):
        engine = Engine.load(path, args.device, args.precision)
        return engine, {p: engine.at_precision(p) for p in wanted if p != engine.precision}

    if args.random is None:
        return load(args.checkpoint)
    if args.checkpoint is not None:
        raise SettingsError("use either --checkpoint or --random, not both")
    with tempfile.TemporaryDirectory() as tmp:  # siblings load while the file exists
        engine, siblings = load(write_random_checkpoint(f"{tmp}/random-{args.random}.safetensors", args.random,
                                                        heads=6))
    for e in (engine, *siblings.values()):
        e.ckpt.path = f"random:{args.random}"
    return engine, siblings


def _compare_name(path: Path, taken) -> str:
    """A --compare checkpoint's row label: its file name, or its folder's for a run's model.safetensors."""
    name = path.parent.name if path.stem == "model" else path.stem
    return name if name and name not in taken else str(path)


def run(args: argparse.Namespace) -> int:
    from xspecmesh.benchmarks import bench, loop_bench, step_cost
    from xspecmesh.decoding.engine import Engine
    from xspecmesh.errors import SettingsError
    from xspecmesh.training.data import ShapeConfig

    if args.count < 1:
        raise SettingsError("--count must be at least 1")
    if args.repeats < 1:
        raise SettingsError("--repeats must be at least 1")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SettingsError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    engine, siblings = _engines(args)
    if args.step_cost:
        result = step_cost.step_cost(engine, range(1, 7), args.cache_lengths, args.repeats,
                                     progress=not args.no_progress, others=siblings)
        print(json.dumps(result) if args.json else step_cost.step_cost_markdown(result))
        return 0
    if args.precision_check:
        from xspecmesh.benchmarks import precision_check

        if engine.precision == "fp32":
            raise SettingsError("--precision-check compares --precision int8 or bf16 with fp32; pick one of those")
        pairs = precision_check.validation_pairs_for(engine, args)
        result = precision_check.agreement(siblings["fp32"], engine, pairs)
        print(json.dumps(result) if args.json else precision_check.markdown(result))
        return 0
    if args.ar_vs_naive:
        if args.seeds < 1:
            raise SettingsError("--seeds (trials) must be at least 1")
        max_tokens = 1500 if args.max_tokens is None else args.max_tokens
        result = loop_bench.ar_vs_naive(engine, args.batch, max_tokens, args.seeds,
                                        temperature=DEFAULT["temperature"] if args.temperature is None else args.temperature,
                                        progress=not args.no_progress)
        print(json.dumps(result) if args.json else loop_bench.ar_vs_naive_markdown(result))
        return 0
    num_points = engine.model.cfg.encoder.num_points
    skipped = []
    if args.meshes:
        inputs, skipped = bench.mesh_inputs(args.meshes, args.count, num_points)
    else:
        shapes = ShapeConfig.trained_on(engine.ckpt.meta, args.families, args.max_faces)
        inputs = bench.procedural_inputs(args.count, num_points, shapes=shapes)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    sampling = {} if args.temperature is None else {"temperature": args.temperature}
    trees = {"on": (True,), "off": (False,), "both": (False, True)}[args.tree]
    main = bench.variants(args.heads, args.delta, args.accept, args.naive, args.adaptive, trees, args.confidence)
    variants, others = list(main), dict(siblings)
    for name, sibling in siblings.items():
        variants += bench.on_model(main, name, sibling.max_heads)
    for path in args.compare:
        name = _compare_name(Path(path), others)
        others[name] = Engine.load(path, args.device, args.precision)
        variants += bench.on_model(main, name, others[name].max_heads)
    max_tokens = DEFAULT["max_tokens"] if args.max_tokens is None else args.max_tokens
    result = bench.run_bench(engine, inputs, variants, args.seeds, max_tokens, sampling,
                             progress=not args.no_progress, others=others)
    result["source"] = args.meshes or "procedural validation shapes"
    result["skipped"] = skipped
    if args.plot:
        bench.plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(bench.markdown(result))
        for run_ in result["runs"]:
            if run_.get("error"):
                print(f"failed: {run_['input']} seed {run_['seed']} {run_['label']}: {run_['error']}", file=sys.stderr)
    return 0
