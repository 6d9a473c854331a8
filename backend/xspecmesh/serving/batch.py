"""`xspecmesh batch`: retopologize every mesh file under a folder, B objects per decoding batch.

Each input `IN/a/b.obj` becomes `OUT/a/b_retopo.obj`, written atomically (a hidden temporary file in the same folder,
then a rename), so an output that exists is whole and is skipped: a killed run, restarted, resumes where it stopped.
Objects go through `Engine.stream_batch`, B decoding at once; when one finishes, the next file takes its place in the
batch (continuous batching, AR and speculative; docs/BENCHMARKS.md measures it against refilling between rounds;
`--mode naive` goes in rounds of B). Files are loaded CHUNK × B at a time. A file that cannot be read or decoded is
logged as failed and the run goes on. With several processes (torchrun) each takes every WORLD_SIZE-th file of the
sorted list.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from xspecmesh.errors import XSpecMeshError

SUFFIXES = (".obj", ".ply", ".stl", ".off", ".glb")
TAG = "_retopo"
CHUNK = 8  # files loaded ahead per slot: batches drain (slots idle) only at the end of each chunk (naive ones at the
# end of each round of B as well)


@dataclass
class Task:
    source: Path
    output: Path

    @property
    def name(self) -> str:
        return str(self.source)


@dataclass
class Report:
    """What one process did; `merge` adds another's (rank 0 merges every rank's)."""

    objects: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)  # {"input", "reason"}
    tokens: int = 0
    steps: int = 0
    scr: list[float] = field(default_factory=list)  # per object decoded
    seconds: float = 0.0  # wall time (the longest process's, once merged)
    decode_seconds: float = 0.0  # summed over processes

    def merge(self, other: "Report") -> "Report":
        return Report(self.objects + other.objects, self.done + other.done, self.skipped + other.skipped,
                      self.failures + other.failures, self.tokens + other.tokens, self.steps + other.steps,
                      self.scr + other.scr, max(self.seconds, other.seconds),
                      self.decode_seconds + other.decode_seconds)

    def summary(self) -> dict:
        return {"objects": self.objects, "done": self.done, "skipped": self.skipped, "failed": len(self.failures),
                "failures": self.failures, "seconds": round(self.seconds, 3),
                "objects_per_minute": round(60 * self.done / self.seconds, 3) if self.seconds > 0 else 0.0,
                "tokens": self.tokens,
                "tokens_per_second": round(self.tokens / self.decode_seconds, 2) if self.decode_seconds > 0 else 0.0,
                "mean_scr": round(float(np.mean(self.scr)), 4) if self.scr else None}


def find_tasks(inp, out) -> list[Task]:
    """Every mesh file under `inp` (recursive, sorted), with its output path under `out`; files already under
    `out` (when it lies inside `inp`) and our own temporaries are left out."""
    inp, out = Path(inp), Path(out)
    if not inp.is_dir():
        raise XSpecMeshError(f"{inp}: not a folder")
    out_abs = out.resolve()
    tasks = []
    for path in sorted(inp.rglob("*")):
        if path.suffix.lower() not in SUFFIXES or not path.is_file() or path.name.startswith("."):
            continue
        if out_abs == path.resolve().parent or out_abs in path.resolve().parents:
            continue
        rel = path.relative_to(inp)
        tasks.append(Task(path, out / rel.parent / f"{rel.stem}{TAG}{rel.suffix}"))
    return tasks


def write_atomically(path: Path, vertices, faces) -> None:
    from xspecmesh.geometry.mesh import save_mesh

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # same suffix: the writer's format
    try:
        save_mesh(tmp, vertices, faces)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Runner:
    """Decodes tasks B at a time with one engine, writes results, logs one JSON line per object."""

    def __init__(self, engine, settings, batch: int, log=None, progress=None):
        self.engine, self.settings, self.batch = engine, settings, batch
        self.log = log  # a text file opened for appending, or None
        self.progress = progress  # a tqdm bar (or anything with update/set_postfix), or None
        self.report = Report()

    def record(self, task: Task, status: str, **extra) -> None:
        if status == "failed":
            self.report.failures.append({"input": task.name, "reason": extra.get("reason", "")})
        if self.log is not None:  # one write per line: lines of several processes do not interleave
            self.log.write(json.dumps({"input": task.name, "output": str(task.output), "status": status, **extra})
                           + "\n")
            self.log.flush()

    def run(self, tasks: list[Task]) -> Report:
        start = time.perf_counter()
        self.report.objects += len(tasks)
        todo = []
        for task in tasks:
            if task.output.exists():
                self.report.skipped += 1
                self.record(task, "skipped")
            else:
                todo.append(task)
        if self.progress is not None:
            self.progress.reset(total=len(todo))
        queue = iter(todo)
        while True:
            group = self._next_group(queue)
            if not group:
                break
            self._decode(group)
            self.report.seconds = time.perf_counter() - start
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _next_group(self, queue) -> list[tuple[Task, np.ndarray, object, object]]:
        """Up to CHUNK × B objects that load and sample; those that do not are failed here and replaced."""
        from xspecmesh.geometry.mesh import load_input

        group = []
        for task in queue:
            try:
                points, norm = load_input(task.source, self.engine.model.cfg.encoder.num_points, self.settings.seed)
                group.append((task, points, norm, self.engine.condition(points, self.settings.seed)))
            except Exception as exc:  # a bad file never stops the run
                self._fail(task, exc)
            if len(group) == CHUNK * self.batch:
                break
        return group

    def _fail(self, task: Task, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, XSpecMeshError) else f"{type(exc).__name__}: {exc}"
        self.record(task, "failed", reason=reason)
        if self.progress is not None:
            self.progress.update(1)

    def _decode(self, group) -> None:
        tris: list[list[np.ndarray]] = [[] for _ in group]
        settings = [replace(self.settings) for _ in group]
        t0, tokens0 = time.perf_counter(), self.report.tokens
        try:
            for i, upd in self.engine.stream_batch([g[3] for g in group], settings, slots=self.batch,
                                                   points=[g[1] for g in group]):
                tris[i].append(upd.triangles)
                if upd.done:
                    self.report.tokens += upd.stats["tokens"]
                    self.report.decode_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    mesh = upd.fitted if upd.fitted is not None else np.concatenate(tris[i])
                    self._finish(group[i], mesh, upd.stats)
                    if self.progress is not None:
                        rate = (self.report.tokens - tokens0) / max(1e-9, upd.stats["seconds"])
                        self.progress.set_postfix(faces=upd.stats["faces"], tok_s=f"{rate:.0f}")
        except Exception as exc:  # the batch as a whole failed (a bug, out of memory): its unfinished objects fail
            for task, *_ in group:
                if not task.output.exists() and not any(f["input"] == task.name for f in self.report.failures):
                    self._fail(task, exc)

    def _finish(self, item, triangles: np.ndarray, stats: dict) -> None:
        from xspecmesh.geometry.mesh import welded

        task, _, norm, _ = item
        try:
            vertices, faces = welded(triangles, norm, stats["tokens"])
            write_atomically(task.output, vertices, faces)
        except Exception as exc:
            self._fail(task, exc)
            return
        self.report.done += 1
        self.report.steps += stats["steps"]
        self.report.scr.append(stats["scr"])
        keep = ("tokens", "steps", "scr", "faces", "complete", "stalled", "seconds", "tokens_per_second", "batch")
        self.record(task, "done", **{k: stats[k] for k in keep if k in stats}, vertices=int(len(vertices)),
                    **{k: v for k, v in stats.items() if k.startswith("fit_")})
        if self.progress is not None:
            self.progress.update(1)
