"""`xspecmesh batch IN -o OUT`: every mesh under IN retopologized to the same relative path under OUT (`_retopo` added),
B objects per decoding batch; resumable; shards across processes under torchrun (xspecmesh/serving/batch.py)."""
from __future__ import annotations

import json
import os
import sys

from xspecmesh.commands import generate


def register(sub) -> None:
    p = sub.add_parser("batch", help="retopologize every mesh file under a folder (resumable; torchrun shards it)")
    p.add_argument("input", help="folder searched recursively for obj/ply/stl/off/glb files")
    p.add_argument("-o", "--output", required=True, help="output folder: the same relative paths, '_retopo' added")
    p.add_argument("--batch", type=int, default=8, help="objects decoded together (B)")
    p.add_argument("--log", default=None, help="per-object JSON lines (appended; default OUT/batch_log.jsonl)")
    generate.add_decode_options(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def distributed() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment; (0, 1, 0, 1) without it."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)))


def run(args) -> int:
    import torch

    from xspecmesh.decoding.engine import Engine
    from xspecmesh.errors import SettingsError
    from xspecmesh.serving.batch import Report, Runner, find_tasks

    if args.batch < 1:
        raise SettingsError("--batch must be at least 1")
    settings = generate.settings_from_args(args)
    rank, world, local_rank, local_world = distributed()
    device = args.device
    if world > 1:
        torch.distributed.init_process_group("gloo")
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if not device.startswith("cuda"):  # the processes of one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        tasks = find_tasks(args.input, args.output)[rank::world]
        engine = Engine.load(args.checkpoint, device, args.precision)
        generate.fit_heads(settings, engine)
        os.makedirs(args.output, exist_ok=True)
        log_path = args.log or os.path.join(args.output, "batch_log.jsonl")
        progress = None
        if not args.no_progress and rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=len(tasks), unit="obj", desc="xspecmesh batch" + (f" (rank 0 of {world})"
                                                                                   if world > 1 else ""))
        with open(log_path, "a", encoding="utf-8") as log:
            report = Runner(engine, settings, args.batch, log, progress).run(tasks)
        if progress is not None:
            progress.close()
        if world > 1:
            reports: list = [None] * world
            torch.distributed.all_gather_object(reports, report)
            report = Report()
            for r in reports:
                report = report.merge(r)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    summary = report.summary() | {"processes": world, "batch": args.batch, "log": log_path}
    if rank == 0:
        with open(os.path.join(args.output, "batch_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed of "
                  f"{summary['objects']} in {summary['seconds']:.1f} s ({summary['objects_per_minute']:.2f} objects/min, "
                  f"{summary['tokens_per_second']:.0f} tokens/s)")
            for f in summary["failures"]:
                print(f"xspecmesh: failed: {f['input']}: {f['reason']}", file=sys.stderr)
    return 1 if summary["failed"] else 0
